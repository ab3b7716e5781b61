"""Fine-tuning AF2 with the transformers Trainer: collator parity with the original, stages, LoRA, resume, CLI.

Parity tests run on every `../shared/parity/fixture_*` (skipped when there is none); training tests use a tiny random
model, a character-level tokenizer with AF2's special tokens and synthetic audio, so they need no fixture.
"""

import argparse
import dataclasses
import json
import math
import string
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import fixture_params, write_original_config
from transformers import TrainingArguments
from transformers.trainer_pt_utils import BatchRebalanceSampler, LengthGroupedSampler

import transformers_af2  # noqa: F401  (registers the Auto classes)
from transformers_af2 import (
    AudioFlamingo2Config,
    AudioFlamingo2FeatureExtractor,
    AudioFlamingo2ForConditionalGeneration,
    AudioFlamingo2Processor,
)
from transformers_af2.trainer import (
    STAGES,
    AudioFlamingo2DataCollator,
    AudioFlamingo2Trainer,
    af2_labels,
    apply_lora,
    count_windows,
    from_hf_dataset,
    load_af2_json,
    load_lora,
    load_training_data,
    merge_lora,
    set_trainable_parameters,
)
from transformers_af2.trainer.cli import add_train_parser
from transformers_af2.trainer.stages import component_modules

LOSS_TOLERANCE = 1e-4
# transformers renamed gradient_checkpointing to activation_checkpointing (the old name is a deprecated alias since).
CHECKPOINTING = next(
    name
    for name in ("activation_checkpointing", "gradient_checkpointing")
    if name in {field.name for field in dataclasses.fields(TrainingArguments)}
)
COMPONENT_PREFIXES = {"audio_tower": "model.audio_tower.", "audio_transformer": "model.audio_transformer."}
SAMPLING_RATE = 16000


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """The tiny models gain nothing from intra-op threads, and on a busy 2-core machine OpenMP threads waiting on each
    other slow these tests several-fold; the previous setting is restored for the other test modules."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# ---------------------------------------------------------------------------------------------------------------
# Parity with the original's training batch (fixture_*: batch.input_ids / batch.labels / batch.loss)
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module", params=fixture_params())
def converted(request, tmp_path_factory):
    from safetensors.torch import load_file

    from transformers_af2.convert import convert_checkpoint

    fixture_dir = request.param
    work = tmp_path_factory.mktemp(f"trainer_{fixture_dir.name}")
    ref = json.loads((fixture_dir / "reference.json").read_text())
    write_original_config(fixture_dir, work / "inference.yaml")
    model, processor = convert_checkpoint(fixture_dir / "original", None, config=work / "inference.yaml")
    examples = [
        {"audio": str(fixture_dir / "audio" / name), "prompt": prompt, "answer": answer}
        for name, prompt, answer in zip(ref["audio_files"], ref["prompts"], ref["answers"])
    ]
    return {
        "dir": fixture_dir,
        "model": model.eval(),
        "processor": processor,
        "ref": ref,
        "tensors": load_file(fixture_dir / "reference.safetensors"),
        "examples": examples,
    }


def test_collator_matches_original_batch(converted):
    batch = AudioFlamingo2DataCollator(converted["processor"])(converted["examples"])
    tensors = converted["tensors"]
    assert torch.equal(batch["input_ids"], tensors["batch.input_ids"])
    assert torch.equal(batch["labels"], tensors["batch.labels"])
    assert torch.equal(batch["attention_mask"], tensors["batch.attention_mask"])
    assert torch.equal(batch["input_features_mask"].to(tensors["batch.audio_mask"].dtype), tensors["batch.audio_mask"])
    for row, sample in enumerate(("s0", "s1")):
        mel = tensors[f"{sample}.mel"]
        assert (batch["input_features"][row, : mel.shape[0]] - mel).abs().max().item() <= 0.02
    with torch.no_grad():
        loss = converted["model"](**batch).loss.item()
    assert abs(loss - converted["ref"]["batch.loss"]) <= LOSS_TOLERANCE


def test_collator_reads_every_audio_form_alike(converted, tmp_path):
    """Path, datasets dicts (path / bytes / array) and arrays give the same batch; audio_start skips seconds."""
    processor = converted["processor"]
    collator = AudioFlamingo2DataCollator(processor)
    examples = converted["examples"]
    reference = collator(examples)
    first, second = (Path(example["audio"]) for example in examples)
    data, rate = sf.read(second, dtype="float64")
    variants = [
        {**examples[0], "audio": {"path": str(first)}},
        {**examples[1], "audio": {"bytes": second.read_bytes(), "path": None}},
    ]
    assert torch.equal(collator(variants)["input_features"], reference["input_features"])
    array_batch = collator([examples[0], {**examples[1], "audio": {"array": data, "sampling_rate": rate}}])
    assert torch.equal(array_batch["input_features"], reference["input_features"])
    assert torch.equal(array_batch["labels"], reference["labels"])

    full, full_rate = sf.read(first, dtype="float64")
    shifted = collator([{**examples[0], "audio_start": 10.0}])
    expected = processor.feature_extractor([{"array": full[10 * full_rate :], "sampling_rate": full_rate}])
    assert shifted["input_features_mask"].sum().item() == 2
    assert torch.equal(shifted["input_features"], expected["input_features"])


# ---------------------------------------------------------------------------------------------------------------
# The label rule itself
# ---------------------------------------------------------------------------------------------------------------
IDS = {"audio_token_id": 90, "sep_token_id": 91, "end_of_chunk_token_id": 92, "eos_token_id": 93, "pad_token_id": 94}


def test_label_rule_keeps_answer_end_of_chunk_and_eos():
    ids = [90, 5, 6, 91, 7, 8, 92, 93, 94, 94]
    assert af2_labels(ids, **IDS) == [-100, -100, -100, -100, 7, 8, 92, 93, -100, -100]
    # eos inside the prompt counts too; a second <SEP> ... <|endofchunk|> span counts again.
    ids = [90, 93, 5, 91, 7, 92, 6, 91, 8, 92, 93]
    assert af2_labels(ids, **IDS) == [-100, 93, -100, -100, 7, 92, -100, -100, 8, 92, 93]


def test_label_rule_drops_truncated_answer():
    """A sample cut inside its answer (max_length) teaches nothing, as in the original."""
    ids = [90, 5, 6, 91, 7, 8, 9]
    assert af2_labels(ids, **IDS) == [-100] * 7


def test_collator_truncates_to_max_length(tiny_processor, audio_files):
    collator = AudioFlamingo2DataCollator(tiny_processor, max_length=12)
    batch = collator(
        [
            {"audio": audio_files["1s"], "prompt": "a very long question indeed", "answer": "yes"},
            {"audio": audio_files["12s"], "prompt": "q", "answer": "ok"},
        ]
    )
    assert batch["input_ids"].shape == (2, 12)
    assert (batch["labels"][0] == -100).all()
    assert batch["labels"][1].ne(-100).sum().item() == len("ok") + 2  # answer, <|endofchunk|>, eos
    assert batch["input_features_mask"].tolist() == [[1, 0], [1, 1]]


# ---------------------------------------------------------------------------------------------------------------
# Tiny random model, character tokenizer with AF2's tokens, synthetic audio
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_processor():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    chars = sorted(set(string.ascii_lowercase + string.digits + " .,?!'-"))
    vocab = {"<unk>": 0, **{c: i + 1 for i, c in enumerate(chars)}}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>")),
        unk_token="<unk>",
        eos_token="<|endoftext|>",
        pad_token="<|PAD_TOKEN|>",
        sep_token="<SEP>",
        additional_special_tokens=["<audio>", "<|endofchunk|>"],
    )
    return AudioFlamingo2Processor(feature_extractor=AudioFlamingo2FeatureExtractor(), tokenizer=tokenizer)


def tiny_model(processor, seed=0, gates=0.0):
    tok = processor.tokenizer
    torch.manual_seed(seed)
    config = AudioFlamingo2Config(
        audio_config={
            "patch_embeds_hidden_size": 8,
            "depths": [1, 1, 1, 1],
            "num_attention_heads": [1, 1, 2, 2],
            "enable_fusion": False,
            "drop_path_rate": 0.0,
            "hidden_dropout_prob": 0.0,
            "attention_probs_dropout_prob": 0.0,
        },
        text_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "vocab_size": len(tok),
            "max_position_embeddings": 256,
            "tie_word_embeddings": True,
            "pad_token_id": tok.pad_token_id,
            "eos_token_id": tok.eos_token_id,
        },
        audio_transformer_num_heads=2,
        audio_transformer_num_layers=1,
        audio_transformer_intermediate_size=32,
        cross_attention_num_heads=2,
        cross_attention_head_dim=8,
        audio_token_id=tok.convert_tokens_to_ids("<audio>"),
        end_of_chunk_token_id=tok.convert_tokens_to_ids("<|endofchunk|>"),
        sep_token_id=tok.sep_token_id,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        tie_word_embeddings=True,
    )
    model = AudioFlamingo2ForConditionalGeneration(config)
    if gates:
        with torch.no_grad():
            for layer in model.model.language_model.layers:
                if layer.cross_attn is not None:
                    layer.cross_attn.attn_gate.fill_(gates)
                    layer.cross_attn.ff_gate.fill_(gates)
    return model


@pytest.fixture(scope="module")
def audio_files(tmp_path_factory):
    """Noise-plus-tone WAVs: 1 s, 3 s (22.05 kHz), 12 s and 25 s."""
    folder = tmp_path_factory.mktemp("audio")
    rng = np.random.default_rng(0)
    files = {}
    for name, seconds, rate in (("1s", 1.0, 16000), ("3s", 3.0, 22050), ("12s", 12.0, 16000), ("25s", 25.0, 16000)):
        t = np.arange(int(seconds * rate)) / rate
        wave = 0.3 * np.sin(2 * np.pi * (200 + 40 * len(files)) * t) + 0.05 * rng.standard_normal(t.shape)
        files[name] = str(folder / f"{name}.wav")
        sf.write(files[name], wave.astype(np.float32), rate, subtype="PCM_16")
    return files


@pytest.fixture(scope="module")
def two_examples(audio_files):
    return [
        {"audio": audio_files["1s"], "prompt": "What is in this audio?", "answer": "a dog barks twice"},
        {"audio": audio_files["12s"], "prompt": "Describe the sound.", "answer": "rain on a tin roof"},
    ]


def _args(tmp_path, **overrides):
    values = {
        "output_dir": str(tmp_path / "out"),
        "per_device_train_batch_size": 2,
        "learning_rate": 3e-3,
        "max_steps": 2,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "use_cpu": True,
        "disable_tqdm": True,
        "seed": 0,
        "lr_scheduler_type": "constant",
        "dataloader_num_workers": 0,
    }
    values.update(overrides)
    return TrainingArguments(**values)


def _losses(trainer):
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def test_tiny_model_overfits_two_examples(tiny_processor, two_examples, tmp_path):
    model = tiny_model(tiny_processor)
    set_trainable_parameters(model, "full")
    trainer = AudioFlamingo2Trainer(
        model=model,
        args=_args(tmp_path, max_steps=40, learning_rate=1e-2),
        data_collator=AudioFlamingo2DataCollator(tiny_processor),
        train_dataset=from_hf_dataset(__import__("datasets").Dataset.from_list(two_examples)),
    )
    trainer.train()
    losses = _losses(trainer)
    assert len(losses) == 40
    print(f"overfit: loss {losses[0]:.4f} -> {losses[-1]:.4f} ({100 * (1 - losses[-1] / losses[0]):.1f}% lower)")
    assert losses[-1] <= 0.1 * losses[0], losses


@pytest.mark.parametrize("stage", ["pretrain", "finetune", "long-audio"])
def test_only_the_stage_parameters_change(tiny_processor, two_examples, tmp_path, stage):
    model = tiny_model(tiny_processor, gates=0.5)
    summary = set_trainable_parameters(model, stage)
    components = component_modules(model)
    owner = {}
    for component, modules in components.items():
        for module in modules:
            for param in module.parameters():
                owner.setdefault(id(param), component)
    names = {name: owner[id(param)] for name, param in model.named_parameters()}
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    trainer = AudioFlamingo2Trainer(
        model=model,
        args=_args(tmp_path, weight_decay=0.1),
        trainable=summary,
        data_collator=AudioFlamingo2DataCollator(tiny_processor),
        train_dataset=from_hf_dataset(__import__("datasets").Dataset.from_list(two_examples)),
    )
    trainer.train()
    after = model.state_dict()
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    expected = set(STAGES[stage])
    embed_name = "model.language_model.embed_tokens.weight"
    for name in changed - {embed_name, "lm_head.weight"}:
        # Parameters by their component; buffers (BatchNorm statistics) by their module's prefix.
        component = names.get(name) or next(
            (c for c in COMPONENT_PREFIXES if name.startswith(COMPONENT_PREFIXES[c])), name
        )
        assert component in expected, f"{name} ({component}) changed in stage {stage}"
    for name, component in names.items():
        if component in expected and name != embed_name and name.endswith("weight") and "norm" not in name:
            assert name in changed, f"{name} did not train in stage {stage}"
    # Embeddings: only the <audio> and <|endofchunk|> rows move (tied output head included), despite weight decay.
    rows = [model.config.audio_token_id, model.config.end_of_chunk_token_id]
    moved = (before[embed_name] != after[embed_name]).any(dim=1).nonzero().flatten().tolist()
    assert moved == sorted(rows)
    assert summary.embedding_rows == tuple(sorted(rows))
    # A frozen tower keeps its BatchNorm statistics (it runs in eval mode); a trained one updates them.
    stats_changed = not torch.equal(
        before["model.audio_tower.batch_norm.running_mean"], after["model.audio_tower.batch_norm.running_mean"]
    )
    assert stats_changed == ("audio_tower" in expected)


def test_apply_lora_refuses_options_beside_a_ready_config(tiny_processor):
    """A ready LoraConfig and LoRA options together would leave the options unused: refused, naming them."""
    from transformers_af2.trainer import lora_config

    model = tiny_model(tiny_processor)
    config = lora_config(targets="language_model", r=4, model=model)
    with pytest.raises(ValueError, match=r"both a ready config and LoRA options \['r'\]"):
        apply_lora(model, config=config, r=8)
    wrapped = apply_lora(model, config=config)
    assert wrapped.peft_config["default"].r == 4


def test_lora_save_reload_merge(tiny_processor, two_examples, tmp_path):
    base_dir = tmp_path / "base"
    tiny_model(tiny_processor, seed=1, gates=0.5).save_pretrained(base_dir)
    collator = AudioFlamingo2DataCollator(tiny_processor)
    batch = collator(two_examples)
    model = apply_lora(
        AudioFlamingo2ForConditionalGeneration.from_pretrained(base_dir), targets="both", r=4, train_embeddings=True
    )
    trainer = AudioFlamingo2Trainer(
        model=model,
        args=_args(tmp_path, max_steps=3, learning_rate=1e-2),
        data_collator=collator,
        train_dataset=from_hf_dataset(__import__("datasets").Dataset.from_list(two_examples)),
    )
    trainer.train()
    with pytest.raises(TypeError, match="apply_lora"):
        set_trainable_parameters(model, "pretrain")  # the stage of a LoRA model is apply_lora's business
    model.eval()
    with torch.no_grad():
        trained = model(**batch).logits
    model.save_pretrained(tmp_path / "adapter")

    fresh = AudioFlamingo2ForConditionalGeneration.from_pretrained(base_dir).eval()
    with torch.no_grad():
        untouched = fresh(**batch).logits
    assert (trained - untouched).abs().max().item() > 1e-2  # the adapter learned something
    reloaded = load_lora(fresh, str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        assert (reloaded(**batch).logits - trained).abs().max().item() <= 1e-6
    merged = merge_lora(reloaded)
    assert type(merged) is AudioFlamingo2ForConditionalGeneration
    assert not any("lora" in name for name, _ in merged.named_parameters())
    with torch.no_grad():
        assert (merged(**batch).logits - trained).abs().max().item() <= 1e-5


def test_resume_continues_the_same_loss_curve(tiny_processor, audio_files, tmp_path):
    examples = [
        {"audio": audio_files[name], "prompt": f"question {i}", "answer": f"answer number {i}"}
        for i, name in enumerate(["1s", "12s", "3s", "1s"])
    ]
    dataset = from_hf_dataset(__import__("datasets").Dataset.from_list(examples))

    def run(resume=None):
        model = tiny_model(tiny_processor, seed=2, gates=0.5)
        trainer = AudioFlamingo2Trainer(
            model=model,
            trainable=set_trainable_parameters(model, "pretrain"),
            args=_args(tmp_path, max_steps=6, save_strategy="steps", save_steps=3, learning_rate=1e-2),
            data_collator=AudioFlamingo2DataCollator(tiny_processor),
            train_dataset=dataset,
        )
        trainer.train(resume_from_checkpoint=resume)
        return {entry["step"]: entry["loss"] for entry in trainer.state.log_history if "loss" in entry}

    full = run()
    assert sorted(full) == [1, 2, 3, 4, 5, 6]
    resumed = run(str(tmp_path / "out" / "checkpoint-3"))
    for step in (4, 5, 6):
        assert math.isclose(resumed[step], full[step], rel_tol=0, abs_tol=1e-5), (step, resumed, full)


def _one_sgd_step(processor, examples, tmp_path, stage="finetune", **overrides):
    model = tiny_model(processor, seed=3, gates=0.5)
    trainer = AudioFlamingo2Trainer(
        model=model,
        trainable=set_trainable_parameters(model, stage),
        args=_args(
            tmp_path, max_steps=1, optim="sgd", learning_rate=1.0, train_sampling_strategy="sequential", **overrides
        ),
        data_collator=AudioFlamingo2DataCollator(processor),
        train_dataset=from_hf_dataset(__import__("datasets").Dataset.from_list(examples)),
    )
    trainer.train()
    return {name: p.detach().clone() for name, p in model.named_parameters()}, _losses(trainer)


def test_gradient_checkpointing_matches_plain_step(tiny_processor, two_examples, tmp_path):
    """Stage "finetune": the audio tower, audio transformer and cross-attention all recompute in the backward."""
    plain, plain_loss = _one_sgd_step(tiny_processor, two_examples, tmp_path)
    checkpointed, checkpointed_loss = _one_sgd_step(tiny_processor, two_examples, tmp_path, **{CHECKPOINTING: True})
    initial = dict(tiny_model(tiny_processor, seed=3, gates=0.5).named_parameters())
    moved = {n for n in plain if not torch.equal(plain[n], initial[n])}
    assert {n.split(".")[1] for n in moved} >= {"audio_tower", "audio_transformer", "language_model"}
    for name in plain:
        assert (checkpointed[name] - plain[name]).abs().max().item() <= 1e-6, name
    assert abs(checkpointed_loss[0] - plain_loss[0]) <= 1e-6


def test_gradient_accumulation_matches_one_big_batch(tiny_processor, two_examples, tmp_path):
    """Two micro-batches of one sample = one batch of two (the loss is normalised by all label tokens of the step).
    Stage "pretrain": a training audio tower's BatchNorm uses batch statistics, which differ by construction."""
    plain, plain_loss = _one_sgd_step(tiny_processor, two_examples, tmp_path, stage="pretrain")
    accumulated, accumulated_loss = _one_sgd_step(
        tiny_processor,
        two_examples,
        tmp_path,
        stage="pretrain",
        per_device_train_batch_size=1,
        gradient_accumulation_steps=2,
    )
    initial = dict(tiny_model(tiny_processor, seed=3, gates=0.5).named_parameters())
    assert max((plain[n] - initial[n]).abs().max().item() for n in plain) > 1e-3
    for name in plain:
        assert (accumulated[name] - plain[name]).abs().max().item() <= 1e-5, name
    assert abs(accumulated_loss[0] - plain_loss[0]) <= 1e-4


def test_bf16_mixed_precision_step(tiny_processor, two_examples, tmp_path):
    """bf16 autocast (CPU here; CUDA alike): fp32 master weights, loss within 5% of the fp32 loss."""
    batch = AudioFlamingo2DataCollator(tiny_processor)(two_examples)
    with torch.no_grad():
        fp32_loss = tiny_model(tiny_processor, seed=3, gates=0.5)(**batch).loss.item()
    params, bf16_loss = _one_sgd_step(tiny_processor, two_examples, tmp_path, bf16=True)
    initial = dict(tiny_model(tiny_processor, seed=3, gates=0.5).named_parameters())
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in params.values())
    assert any(not torch.equal(params[n], initial[n]) for n in params)
    assert bf16_loss[0] != fp32_loss and abs(bf16_loss[0] - fp32_loss) <= 0.05 * fp32_loss


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 mixed precision needs a CUDA device")
def test_fp16_mixed_precision_step_on_gpu(tiny_processor, two_examples, tmp_path):
    model = tiny_model(tiny_processor, gates=0.5)
    set_trainable_parameters(model, "finetune")
    trainer = AudioFlamingo2Trainer(
        model=model,
        args=_args(tmp_path, use_cpu=False, fp16=True, max_steps=3),
        data_collator=AudioFlamingo2DataCollator(tiny_processor),
        train_dataset=from_hf_dataset(__import__("datasets").Dataset.from_list(two_examples)),
    )
    trainer.train()
    assert all(math.isfinite(loss) for loss in _losses(trainer))


# ---------------------------------------------------------------------------------------------------------------
# Data readers and length-grouped batches
# ---------------------------------------------------------------------------------------------------------------
def test_readers_af2_json_jsonl_and_datasets(tiny_processor, audio_files, tmp_path):
    import datasets

    root = Path(audio_files["1s"]).parent
    af2 = {
        "split_path": ".",
        "flamingo_task": "AQA",
        "total_num": 3,
        "data": {
            "0": {"name": "25s.wav", "prompt": "Q0", "output": "A0"},
            "1": {"name": "12s.wav", "prompt": "Q1", "output": "A1", "audio_start": 5.0},
            "2": {"name": "3s.wav", "prompt": "Q2", "output": 7},
        },
    }
    (tmp_path / "train.json").write_text(json.dumps(af2))
    from_json = load_af2_json(tmp_path / "train.json", data_root=root)
    assert from_json["audio"] == [audio_files["25s"], audio_files["12s"], audio_files["3s"]]
    assert from_json["answer"] == ["A0", "A1", "7"]
    assert from_json["audio_start"] == [0.0, 5.0, 0.0]
    assert from_json["num_windows"] == [3, 1, 1]
    assert from_json["length"][0] == 3 * 4096 + len("Q0A0")

    lines = [{"audio": Path(audio_files[n]).name, "prompt": f"q{n}", "answer": f"a{n}"} for n in ("1s", "25s")]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(line) for line in lines))
    from_jsonl = load_training_data(tmp_path / "train.jsonl", data_root=root)
    assert from_jsonl["audio"] == [audio_files["1s"], audio_files["25s"]]
    assert from_jsonl["num_windows"] == [1, 3]

    hf = datasets.Dataset.from_dict(
        {"file": [audio_files["12s"], audio_files["3s"]], "question": ["a", "b"], "text": ["x", "y"]}
    ).cast_column("file", datasets.Audio())
    from_hf = from_hf_dataset(hf, audio_column="file", prompt_column="question", answer_column="text")
    assert from_hf.features["audio"].decode is False  # decoded by the collator, in the loader workers
    assert from_hf["num_windows"] == [2, 1]

    # Rows of every reader collate; audio is read in the data loader's worker processes.
    collator = AudioFlamingo2DataCollator(tiny_processor)
    loader = torch.utils.data.DataLoader(from_json, batch_size=3, collate_fn=collator, num_workers=1)
    batch = next(iter(loader))
    assert batch["input_features_mask"].sum(dim=1).tolist() == [3, 1, 1]
    assert collator([from_hf[0], from_jsonl[0]])["input_features_mask"].sum(dim=1).tolist() == [2, 1]
    assert count_windows({"array": np.zeros(int(10.5 * 8000)), "sampling_rate": 8000}) == 2


def test_length_grouped_and_rebalanced_batches_use_window_counts(tiny_processor, audio_files, tmp_path):
    names = ["1s", "25s", "12s", "3s"] * 16
    dataset = from_hf_dataset(
        __import__("datasets").Dataset.from_list(
            [{"audio": audio_files[n], "prompt": "q", "answer": "a" * (i % 7)} for i, n in enumerate(names)]
        )
    )
    model = tiny_model(tiny_processor)

    def padded_windows(order, batch_size=4):
        windows = [dataset["num_windows"][i] for i in order]
        batches = [windows[i : i + batch_size] for i in range(0, len(windows), batch_size)]
        return sum(max(batch) * len(batch) - sum(batch) for batch in batches)

    for strategy, sampler_type in (
        ("group_by_length", LengthGroupedSampler),
        ("batch_rebalance", BatchRebalanceSampler),
    ):
        trainer = AudioFlamingo2Trainer(
            model=model,
            args=_args(tmp_path, per_device_train_batch_size=4, train_sampling_strategy=strategy),
            data_collator=AudioFlamingo2DataCollator(tiny_processor),
            train_dataset=dataset,
        )
        sampler = trainer._get_train_sampler()
        assert isinstance(sampler, sampler_type)
        assert list(sampler.lengths) == dataset["length"]
        if strategy == "group_by_length":
            torch.manual_seed(0)
            grouped = padded_windows(list(sampler))
            shuffled = padded_windows(torch.randperm(len(dataset)).tolist())
            # 16-item mega-batches sorted by windows: almost no padded windows, against ~1 per sample at random.
            assert grouped * 3 <= shuffled, (grouped, shuffled)


# ---------------------------------------------------------------------------------------------------------------
# af2 train
# ---------------------------------------------------------------------------------------------------------------
def _cli(argv):
    parser = argparse.ArgumentParser(prog="af2")
    add_train_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.handler(args)


def test_cli_trains_resumes_and_trains_lora(tiny_processor, two_examples, tmp_path):
    model_dir = tmp_path / "tiny"
    tiny_model(tiny_processor, gates=0.5).save_pretrained(model_dir)
    tiny_processor.save_pretrained(model_dir)
    train_file = tmp_path / "train.jsonl"
    train_file.write_text("\n".join(json.dumps(example) for example in two_examples))
    common = [
        "train",
        "--model",
        str(model_dir),
        "--train-file",
        str(train_file),
        "--report-to",
        "none",
        "--use-cpu",
        "--per-device-train-batch-size",
        "2",
        "--logging-steps",
        "1",
        "--learning-rate",
        "1e-2",
        "--disable-tqdm",
        "true",
    ]
    out = tmp_path / "run"
    assert (
        _cli(
            common
            + ["--output-dir", str(out), "--stage", "pretrain", "--max-steps", "2", "--save-steps", "2"]
            + ["--activation-checkpointing"]  # the current name, on every supported transformers release
        )
        == 0
    )
    saved_args = torch.load(out / "training_args.bin", weights_only=False)
    assert saved_args.gradient_checkpointing is True  # both names, whichever this release calls it
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 2 and len([e for e in state["log_history"] if "loss" in e]) == 2
    assert (out / "checkpoint-2").is_dir() and (out / "model.safetensors").is_file()
    assert (out / "processor_config.json").is_file()

    assert (
        _cli(
            common
            + [
                "--output-dir",
                str(out),
                "--stage",
                "pretrain",
                "--max-steps",
                "3",
                "--resume-from-checkpoint",
                "last",
                "--eval-file",
                str(train_file),
            ]
        )
        == 0
    )
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 3
    assert json.loads((out / "eval_results.json").read_text())["eval_loss"] > 0

    lora_out = tmp_path / "lora"
    assert (
        _cli(
            common
            + [
                "--output-dir",
                str(lora_out),
                "--stage",
                "none",
                "--lora",
                "language_model,cross_attention",
                "--lora-r",
                "2",
                "--max-steps",
                "1",
                "--save-strategy",
                "no",
                "--merge-lora",
            ]
        )
        == 0
    )
    config = json.loads((lora_out / "adapter_config.json").read_text())
    assert config["r"] == 2 and (lora_out / "adapter_model.safetensors").is_file()
    assert (lora_out / "merged" / "model.safetensors").is_file()
