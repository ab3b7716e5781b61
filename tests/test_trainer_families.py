"""Fine-tuning Audio Flamingo 3 and Music Flamingo: the collator's labels against an independent construction, the
loss against a hand-computed cross-entropy, padding that does not leak into the loss, and `af2 train` runs (LoRA on
the language model) as real processes: the loss falls, the saved adapter gives the trained model's logits back, and
a run resumed from a checkpoint repeats the uninterrupted one. Tiny random models from `families_fixtures` (no
downloads)."""

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from families_fixtures import (
    IM_END_ID,
    PAD_ID,
    SOUND_BOS_ID,
    SOUND_EOS_ID,
    SOUND_ID,
    noise_clip,
    save_tiny_checkpoint,
    tiny_model,
    tiny_processor,
)

from transformers_af2.families import family_class
from transformers_af2.trainer import TrainingDataCollator, load_lora
from transformers_af2.trainer.cli import add_train_parser

FAMILIES = ("audioflamingo3", "musicflamingo")
# The tokens transformers' processors count as audio (their `mm_token_type_ids`).
AUDIO_IDS = {"audioflamingo3": {SOUND_ID}, "musicflamingo": {SOUND_ID, SOUND_BOS_ID, SOUND_EOS_ID}}
SRC = Path(__file__).resolve().parents[1] / "src"
EXAMPLES = [
    ("What is the sound?", "dog bark"),
    ("Describe the audio.", "piano and guitar in the rain"),
]


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clips")
    return [str(noise_clip(folder / "a.wav", 2.0, seed=1)), str(noise_clip(folder / "b.wav", 3.5, seed=2))]


def _examples(clips):
    return [{"audio": clip, "prompt": q, "answer": a} for clip, (q, a) in zip(clips, EXAMPLES)]


def _collator(model_type, **options):
    return TrainingDataCollator(family_class(model_type)(tiny_processor(model_type)), **options)


def _by_hand(processor, prompt, answer, clip):
    """`(input_ids, labels, text)` of one example built without the collator: the processor's inference prompt (the
    chat template's user turn with its audio tokens expanded) followed by the answer's tokens and `<|im_end|>`;
    every prompt position -100. `text`: the whole example as the chat template writes it."""
    chat_prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "audio"}, {"type": "text", "text": prompt}]}],
        tokenize=False,
        add_generation_prompt=True,
    )
    prompt_ids = processor(text=[chat_prompt], audio=[_wave(clip)], return_tensors="pt")["input_ids"][0].tolist()
    answer_ids = processor.tokenizer(answer, add_special_tokens=False)["input_ids"] + [IM_END_ID]
    return prompt_ids + answer_ids, [-100] * len(prompt_ids) + answer_ids, chat_prompt + answer + "<|im_end|>"


def _wave(clip):
    from transformers_af2.families.base import decode_mono

    return decode_mono(clip, None, 16000, 600)[0]


@pytest.mark.parametrize("model_type", FAMILIES)
def test_collator_labels_match_an_independent_construction(model_type, clips):
    processor = tiny_processor(model_type)
    batch = _collator(model_type)(_examples(clips))
    lengths = []
    for row, (clip, (prompt, answer)) in enumerate(zip(clips, EXAMPLES)):
        ids, labels, text = _by_hand(processor, prompt, answer, clip)
        lengths.append(len(ids))
        assert batch["input_ids"][row, : len(ids)].tolist() == ids
        assert batch["labels"][row, : len(ids)].tolist() == labels
        # Right padding: pad ids, mask 0, label -100.
        assert (batch["input_ids"][row, len(ids) :] == PAD_ID).all()
        assert (batch["labels"][row, len(ids) :] == -100).all()
        assert batch["attention_mask"][row].tolist() == [1] * len(ids) + [0] * (batch["input_ids"].shape[1] - len(ids))
        # The trained tokens are the answer and its end of turn, nothing else.
        kept = [token for token in labels if token != -100]
        assert processor.tokenizer.decode(kept) == answer + "<|im_end|>"
        # transformers' own output_labels masks only the audio and the padding (the collator masks the prompt too):
        # on the same text its labels are the ids but at the audio tokens, so they agree with ours on the answer.
        own = processor(text=[text], audio=[_wave(clip)], output_labels=True)["labels"][0].tolist()
        assert own == [-100 if token in AUDIO_IDS[model_type] else token for token in ids]
        assert own[-len(kept) :] == kept
    assert batch["input_ids"].shape[1] == max(lengths)
    # One <sound> per encoder frame: 2 s = 200 mel frames, halved by the stride-2 convolution (100) and by the
    # pooling (50); 3.5 s: 350 -> 175 -> 87. The longer clip makes the batch really padded.
    assert (batch["input_ids"] == SOUND_ID).sum(dim=1).tolist() == [50, 87]
    assert lengths[1] > lengths[0]
    # 2 s and 3.5 s clips: one 30 s window each.
    assert batch["input_features"].shape == (2, 128, 3000) and batch["input_features_mask"].shape == (2, 3000)


@pytest.mark.parametrize("model_type", FAMILIES)
def test_loss_is_the_mean_cross_entropy_of_the_answer_tokens(model_type, clips):
    model = tiny_model(model_type)
    processor = tiny_processor(model_type)
    batch = _collator(model_type)([_examples(clips)[0]])
    ids, labels, _ = _by_hand(processor, EXAMPLES[0][0], EXAMPLES[0][1], clips[0])
    with torch.no_grad():
        output = model(**batch)
    # Position t predicts token t + 1; only the answer tokens (and <|im_end|>) count.
    logits = output.logits[0, :-1]
    targets = torch.tensor(ids[1:])
    supervised = torch.tensor(labels[1:]) != -100
    assert int(supervised.sum()) == len(processor.tokenizer(EXAMPLES[0][1])["input_ids"]) + 1
    by_hand = torch.nn.functional.cross_entropy(logits[supervised], targets[supervised])
    assert output.loss.item() == pytest.approx(by_hand.item(), rel=1e-6)
    assert output.loss.item() > 1.0  # a random model: a real loss, not a masked-out 0


@pytest.mark.parametrize("model_type", FAMILIES)
def test_padding_does_not_leak_into_the_loss(model_type, clips):
    """The loss of a padded batch of 2 is the token-weighted mean of each example's own loss (the Trainer's
    definition: sum of token losses / number of trained tokens)."""
    model = tiny_model(model_type)
    collator = _collator(model_type)
    examples = _examples(clips)
    batch = collator(examples)
    with torch.no_grad():
        together = model(**batch).loss.item()
        alone = [model(**collator([example])).loss.item() for example in examples]
    counts = [int((collator([example])["labels"] != -100).sum()) for example in examples]
    assert counts == [int(c) for c in (batch["labels"] != -100).sum(dim=1)]
    expected = sum(loss * count for loss, count in zip(alone, counts)) / sum(counts)
    assert together == pytest.approx(expected, rel=1e-5)
    assert abs(alone[0] - alone[1]) > 1e-3  # different losses: the weighting is really tested


def test_an_over_long_sample_keeps_its_audio_and_trains_nothing(clips):
    collator = _collator("audioflamingo3", max_length=60)
    example = _examples(clips)[0]
    tokens, trainable = collator.check(example)
    assert tokens > 60 and trainable == 0
    batch = collator([example])
    # The prompt (with all its audio tokens) is kept whole, the answer cut, nothing trained on.
    assert int((batch["input_ids"] == SOUND_ID).sum()) == int(
        (_collator("audioflamingo3")([example])["input_ids"] == SOUND_ID).sum()
    )
    assert (batch["labels"] == -100).all()


def _cli(argv):
    parser = argparse.ArgumentParser(prog="af2")
    add_train_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.handler(args)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, clips):
    root = tmp_path_factory.mktemp("families_train")
    for model_type in FAMILIES:
        save_tiny_checkpoint(root / model_type, model_type)
    # One example, repeated: the loss must fall as it is learnt.
    example = _examples(clips)[0]
    (root / "train.jsonl").write_text("\n".join(json.dumps(example) for _ in range(4)) + "\n")
    return root


@pytest.mark.parametrize(
    "options, refusal",
    [
        (
            [],
            "stage 'finetune' is AF2's recipe (its audio transformer, cross-attention, CLAP tower); this family trains with --stage none (LoRA: --lora language_model)",
        ),
        (["--stage", "pretrain", "--lora", "language_model"], "stage 'pretrain'"),
        (["--lora", "cross_attention"], "--lora cross_attention: LoRA targets for this family are language_model"),
        (["--lora", "language_model", "--train-embeddings", "new"], "--train-embeddings new is AF2's"),
        (["--lora", "language_model", "--weight-decay", "0.1"], "add --weight-decay-scope default"),
    ],
)
def test_what_af2_alone_has_is_refused_in_one_line(checkpoints, tmp_path, options, refusal):
    argv = ["train", "--model", str(checkpoints / "musicflamingo"), "--train-file", str(checkpoints / "train.jsonl")]
    argv += ["--output-dir", str(tmp_path / "out"), "--use-cpu", "true", "--report-to", "none", *options]
    with pytest.raises(ValueError) as error:
        _cli(argv)
    message = str(error.value)
    assert "\n" not in message and message.startswith(f"--model {checkpoints / 'musicflamingo'} is Music Flamingo: ")
    assert refusal in message
    assert not (tmp_path / "out").exists()  # refused before anything is read or written


def _train(checkpoints, model_type, output_dir, *extra):
    command = [
        sys.executable, "-m", "transformers_af2.trainer.cli", "train",
        "--model", str(checkpoints / model_type),
        "--train-file", str(checkpoints / "train.jsonl"),
        "--eval-file", str(checkpoints / "train.jsonl"),
        "--output-dir", str(output_dir),
        "--lora", "language_model", "--lora-r", "4", "--lora-dropout", "0",
        "--per-device-train-batch-size", "2", "--learning-rate", "2e-2", "--lr-scheduler-type", "constant",
        "--seed", "5", "--use-cpu", "true", "--logging-steps", "1", "--report-to", "none", "--disable-tqdm", "true",
        *extra,
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((Path(output_dir) / "trainer_state.json").read_text())["log_history"], done.stderr


@pytest.fixture(scope="module")
def trained(checkpoints, tmp_path_factory):
    """`trained(model_type)`: `(log history, stderr, output folder)` of one `af2 train` LoRA run of 4 steps,
    checkpoints at steps 2 and 4, the merged model written; run once per family and shared by the tests below."""
    runs = {}

    def run(model_type):
        if model_type not in runs:
            folder = tmp_path_factory.mktemp(f"run-{model_type}")
            history, stderr = _train(
                checkpoints, model_type, folder, "--max-steps", "4", "--save-steps", "2", "--merge-lora"
            )
            runs[model_type] = history, stderr, folder
        return runs[model_type]

    return run


@pytest.mark.parametrize("model_type", FAMILIES)
def test_af2_train_lora_learns_saves_and_the_adapter_loads_back(model_type, trained, checkpoints, clips):
    history, stderr, run = trained(model_type)
    assert "LoRA on language_model (stage none)" in stderr
    losses = [entry["loss"] for entry in history if "loss" in entry]
    assert len(losses) == 4
    # The same example 2 x 4 times: each step lowers the loss, and the last is well under the first.
    assert all(later < earlier for earlier, later in zip(losses, losses[1:])), losses
    assert losses[-1] < 0.7 * losses[0], losses
    eval_loss = json.loads((run / "eval_results.json").read_text())["eval_loss"]

    # The adapter holds only LoRA weights of the language model, and loaded on a fresh base it gives the loss the
    # trained model had in the run (its eval on the same example).
    from safetensors.torch import load_file

    weights = load_file(run / "adapter_model.safetensors")
    assert weights and all(".language_model.layers." in name and "lora_" in name for name in weights)
    model, processor = family_class(model_type).load(str(checkpoints / model_type), dtype="float32")
    loaded = load_lora(model, str(run))
    batch = TrainingDataCollator(family_class(model_type)(processor))(_examples(clips)[:1])
    with torch.no_grad():
        loss = loaded(**batch).loss.item()
        base_loss = loaded.get_base_model()  # the same module; with the adapter disabled below
        with loaded.disable_adapter():
            untrained = base_loss(**batch).loss.item()
    assert loss == pytest.approx(eval_loss, rel=1e-4)
    assert loss < 0.7 * untrained
    # The merged model the run wrote (adapters folded in, a plain model of the family) gives the adapter's logits.
    merged, _ = family_class(model_type).load(str(run / "merged"), dtype="float32")
    assert type(merged) is family_class(model_type).model_class()
    with torch.no_grad():
        difference = (merged(**batch).logits - loaded(**batch).logits).abs().max().item()
    assert difference < 1e-4


def test_weight_decay_on_a_continued_adapter_without_cross_attention_is_refused(trained, checkpoints, tmp_path):
    """Continuing a saved AF3 adapter skips the family checks of a fresh run (the adapter decides what trains), so the
    trainer itself refuses --weight-decay with the cross-attention scope on a model that has none: it would decay
    nothing, silently. With --weight-decay-scope default the same continuation trains."""
    _, _, run = trained("audioflamingo3")
    argv = ["train", "--model", str(run), "--train-file", str(checkpoints / "train.jsonl"), "--use-cpu", "true",
            "--report-to", "none", "--max-steps", "1", "--weight-decay", "0.1"]  # fmt: skip
    with pytest.raises(ValueError) as error:
        _cli([*argv, "--output-dir", str(tmp_path / "refused")])
    message = str(error.value)
    assert "weight_decay=0.1 with weight_decay_scope='cross_attention'" in message
    assert "--weight-decay-scope default" in message
    assert _cli([*argv, "--output-dir", str(tmp_path / "decayed"), "--weight-decay-scope", "default"]) == 0
    assert (tmp_path / "decayed" / "adapter_model.safetensors").is_file()


def test_af2_train_resumes_an_af3_lora_run(trained, checkpoints, tmp_path):
    """A run resumed from step 2's checkpoint logs steps 3 and 4 as the uninterrupted run did and writes the same
    adapter (a kill -9 during a save is tested for AF2 in test_trainer_runs; the checkpoint logic is shared)."""
    from safetensors.torch import load_file

    full, _, full_run = trained("audioflamingo3")
    # The run as it stood after step 2's save: its checkpoint-2, without what steps 3 and 4 wrote.
    shutil.copytree(full_run / "checkpoint-2", tmp_path / "resumed" / "checkpoint-2")
    resumed, stderr = _train(
        checkpoints, "audioflamingo3", tmp_path / "resumed", "--max-steps", "4", "--save-steps", "2",
        "--resume-from-checkpoint", "last",
    )  # fmt: skip
    full_losses = {entry["step"]: entry["loss"] for entry in full if "loss" in entry}
    resumed_losses = {entry["step"]: entry["loss"] for entry in resumed if "loss" in entry}
    assert sorted(full_losses) == [1, 2, 3, 4]
    for step in (3, 4):
        assert resumed_losses[step] == pytest.approx(full_losses[step], rel=1e-5)
    a = load_file(full_run / "adapter_model.safetensors")
    b = load_file(tmp_path / "resumed" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    assert max((a[name] - b[name]).abs().max().item() for name in a) < 1e-6


def test_qlora_on_an_8bit_audio_flamingo_3_is_the_same_code_path(checkpoints, clips, tmp_path):
    """A model loaded in 8 bits (bitsandbytes on CPU) takes the same `apply_lora` and trainer as a float one: the
    adapters move, the quantized weights do not, the loss falls."""
    pytest.importorskip("bitsandbytes", reason="bitsandbytes is a training extra: pip install transformers-af2[train]")
    import datasets
    from test_trainer import _args
    from transformers import BitsAndBytesConfig

    from transformers_af2.trainer import AudioFlamingo2Trainer, apply_lora

    family = family_class("audioflamingo3")
    model, processor = family.load(
        str(checkpoints / "audioflamingo3"), dtype="float32", quantization_config=BitsAndBytesConfig(load_in_8bit=True)
    )
    quantized = {n: p.detach().clone() for n, p in model.named_parameters() if p.dtype == torch.int8}
    assert any(".language_model.layers." in name for name in quantized)
    model = apply_lora(model, "language_model", r=4)
    trainer = AudioFlamingo2Trainer(
        model=model,
        args=_args(tmp_path, max_steps=3, learning_rate=2e-2),
        data_collator=TrainingDataCollator(family(processor)),
        train_dataset=datasets.Dataset.from_list(_examples(clips)[:1] * 2),
        weight_decay_scope="default",
    )
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 3 and losses[-1] < 0.8 * losses[0], losses
    after = {
        name.replace("base_model.model.", "", 1).replace(".base_layer.", "."): param
        for name, param in model.named_parameters()
        if param.dtype == torch.int8
    }
    assert after.keys() == quantized.keys()
    assert all(torch.equal(after[name], quantized[name]) for name in quantized)


def test_every_row_is_checked_with_the_familys_front_end(clips, tmp_path):
    """The row check before training reads each row as the collator will: a file that is not audio and a row over
    max_length are reported (and dropped with skip_bad_rows), the good row is kept; the length column counts the
    family's 30 s windows."""
    import datasets

    from transformers_af2.trainer import check_training_data, from_hf_dataset

    not_audio = tmp_path / "notes.wav"
    not_audio.write_text("not a sound")
    collator = _collator("audioflamingo3", max_length=110)
    rows = _examples(clips) + [{"audio": str(not_audio), "prompt": "What?", "answer": "rain"}]
    dataset = from_hf_dataset(datasets.Dataset.from_list(rows), family=collator.family)
    assert dataset["num_windows"] == [1, 1, 1]
    kept, report = check_training_data(dataset, collator, skip_bad_rows=True)
    assert report.rows == 3 and report.kept == 1 and report.over_long == 1
    assert [(entry["row"], entry["kind"]) for entry in report.dropped] == [
        (1, "no trainable label"),
        (2, "unreadable audio"),
    ]
    assert "over max_length=110" in report.dropped[0]["reason"] and "notes.wav" in report.dropped[1]["reason"]
    assert kept["answer"] == ["dog bark"]
