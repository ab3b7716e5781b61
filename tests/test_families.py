"""
The model families behind the shared commands, with tiny random Audio Flamingo 3 and Music Flamingo checkpoints
(tests/families_fixtures.py): detection from config.json, batch inputs equal to the processor's, batched generation
through `af2 caption`'s engine equal to one-at-a-time generation with transformers' own processor (float32, greedy,
clips of 3 s to past the model's limit), answers of "think" checkpoints, `af2 eval` on MMAU with AF3's prompt.
AF2's batched == one-at-a-time check through the engine is tests/test_caption.py's (the parity fixture).
"""

import json

import numpy as np
import pytest
import soundfile as sf
import torch
from families_fixtures import (
    IM_END_ID,
    PAD_ID,
    save_tiny_checkpoint,
    tiny_model,
    tiny_processor,
)
from transformers import AutoProcessor

from transformers_af2.caption import caption
from transformers_af2.commands import main
from transformers_af2.evaluation.scoring import mmau_string_match
from transformers_af2.families import (
    AudioFlamingo2Family,
    AudioFlamingo3Family,
    MusicFlamingoFamily,
    detect_family,
    family_for,
    split_thinking,
)

FAMILY_TYPES = ["audioflamingo3", "musicflamingo"]
NEW_TOKENS = 6
# The tiny processors hear at most 60 s (2 windows of 30 s) so that a clip past the limit stays cheap.
MAX_AUDIO_SECONDS = 60
# 3 s and 7 s (one window), 33 s (two windows, the second part-filled), 75 s (two windows, 15 s dropped).
CLIP_SECONDS = [7.0, 33.0, 3.0, 75.0]


def _noise(path, seconds, seed, rate=16000):
    rng = np.random.default_rng(seed)
    sf.write(path, (rng.standard_normal(int(seconds * rate)) * 0.1).astype("float32"), rate)
    return path


@pytest.fixture(scope="module", params=FAMILY_TYPES)
def tiny(request):
    model_type = request.param
    processor = tiny_processor(model_type)
    processor.max_audio_len = MAX_AUDIO_SECONDS
    return model_type, tiny_model(model_type), processor


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clips")
    return [_noise(folder / f"clip{i}.wav", seconds, seed=i) for i, seconds in enumerate(CLIP_SECONDS)]


def _reference_answer(model, processor, question, path, max_new_tokens=NEW_TOKENS):
    """One clip at a time with transformers' own chat template, processor and generate (no family code)."""
    waveform, rate = sf.read(path, dtype="float32")
    waveform = waveform[: MAX_AUDIO_SECONDS * rate]
    conversation = [{"role": "user", "content": [{"type": "audio"}, {"type": "text", "text": question}]}]
    text = processor.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    inputs = processor(text=[text], audio=[waveform])
    with torch.inference_mode():
        generated = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    new_tokens = generated[0, inputs["input_ids"].shape[1] :].tolist()
    if IM_END_ID in new_tokens:
        new_tokens = new_tokens[: new_tokens.index(IM_END_ID)]
    return processor.tokenizer.decode(new_tokens, skip_special_tokens=True).strip(), inputs


def test_detected_from_config_json(tmp_path, converted_fixture):
    for model_type, family in [("audioflamingo3", AudioFlamingo3Family), ("musicflamingo", MusicFlamingoFamily)]:
        folder = tmp_path / model_type
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({"model_type": model_type}))  # no weights needed
        assert detect_family(str(folder)) is family
    assert detect_family(str(converted_fixture.repo)) is AudioFlamingo2Family
    assert detect_family(str(converted_fixture.fixture_dir / "original")) is AudioFlamingo2Family  # no config.json
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text(json.dumps({"model_type": "qwen2_audio"}))
    with pytest.raises(ValueError, match=r"'qwen2_audio' model; the supported families are Audio Flamingo 2"):
        detect_family(str(tmp_path / "other"))


def test_audio_coverage_per_family(tiny, converted_fixture):
    _, model, processor = tiny
    family = family_for(model, processor)
    assert (family.window_seconds, family.max_windows, family.max_seconds) == (30.0, 2, 60.0)
    assert [family.coverage(s) for s in CLIP_SECONDS] == [(1, 0.0), (2, 0.0), (1, 0.0), (2, 15.0)]
    # The released processors' own limits: AF3 10 min, Music Flamingo 20 min, in 30 s windows.
    released = tiny_processor(tiny[0])
    assert family_for(model, released).max_windows == {"audioflamingo3": 20, "musicflamingo": 40}[tiny[0]]
    af2 = AudioFlamingo2Family(AutoProcessor.from_pretrained(converted_fixture.repo))
    assert (af2.window_seconds, af2.max_windows) == (10.0, 12)
    assert af2.coverage(125.0) == (12, 5.0)


def test_batch_inputs_equal_the_processors(tiny, clips):
    _, model, processor = tiny
    family = family_for(model, processor)
    questions = ["Describe the audio.", "What is the sound?", "a", "Name the instrument."]
    waveforms = [sf.read(path, dtype="float32")[0][: MAX_AUDIO_SECONDS * 16000] for path in clips]
    batch = family.inputs(questions, [str(path) for path in clips])
    chat = [
        processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "audio"}, {"type": "text", "text": q}]}],
            tokenize=False,
            add_generation_prompt=True,
        )
        for q in questions
    ]
    expected = processor(text=chat, audio=waveforms)
    for key in ("input_ids", "attention_mask", "input_features", "input_features_mask"):
        torch.testing.assert_close(batch[key], expected[key], rtol=0, atol=0)
    assert batch["input_features"].shape[0] == 6  # 1 + 2 + 1 + 2 windows
    assert (batch["attention_mask"][:, 0] == 0).any() and (batch["attention_mask"][:, -1] == 1).all()  # left padding


def test_caption_rows_equal_one_at_a_time_generation(tiny, clips, tmp_path):
    """`af2 caption`'s engine, batches of 3 mixing one- and two-window clips, against transformers alone."""
    _, model, processor = tiny
    prompts = ["Describe the audio.", "What is the sound?"]
    summary = caption(
        [str(p) for p in clips],
        tmp_path / "out.jsonl",
        prompts=prompts,
        model=model,
        processor=processor,
        max_new_tokens=NEW_TOKENS,
        batch_size=3,
        num_workers=0,
        progress=False,
    )
    assert (summary.done, summary.failed, summary.total_rows) == (8, 0, 8)
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["windows"] for r in rows] == [1, 1, 2, 2, 1, 1, 2, 2]
    assert [r["seconds_dropped"] for r in rows] == [0.0] * 6 + [15.0, 15.0]
    answers = set()
    for row in rows:
        reference, inputs = _reference_answer(model, processor, row["prompt"], row["path"])
        assert row["answer"] == reference
        answers.add(row["answer"])
    assert len(answers) > 1, "every row answered the same: the check could not see rows leaking into each other"


def test_think_forms_and_end_of_turn(tiny):
    _, model, processor = tiny
    family = family_for(model, processor)
    assert split_thinking("<think>a dog, then a car</think> A dog barks.") == ("a dog, then a car", "A dog barks.")
    assert split_thinking("reasoning only</think>Rain.") == ("reasoning only", "Rain.")
    assert split_thinking("<think>cut by the token limit") == ("cut by the token limit", "")
    assert split_thinking(" Plain answer. ") == ("", "Plain answer.")
    tokenizer = processor.tokenizer
    row = tokenizer("<think>hmm</think>Rain.")["input_ids"] + [IM_END_ID, PAD_ID]
    tail = tokenizer(" ignored")["input_ids"]
    assert family.decode_answers([row + tail]) == ["Rain."]


def test_questions_holding_the_audio_token_are_refused(tiny):
    _, model, processor = tiny
    with pytest.raises(ValueError, match=r"renders with 2 <sound> tokens"):
        family_for(model, processor).check_questions(["fine", "<sound> twice"])


@pytest.mark.parametrize("engine", ["loop", "caption"])
def test_eval_mmau_with_af3_prompt(engine, tmp_path, capsys):
    """`af2 eval --task mmau` on a tiny AF3 folder: AF3's published multiple-choice instruction, recorded; the
    predictions equal one-at-a-time generation; the MMAU scorer counts them."""
    from test_eval_tasks import build_mmau

    folder = save_tiny_checkpoint(tmp_path / "af3", "audioflamingo3")
    data, _, ids = build_mmau(tmp_path / "data")
    out = tmp_path / "out"
    argv = ["eval", "--task", "mmau", "--data", str(data), "--model", str(folder), "--output", str(out)]
    argv += ["--max-new-tokens", str(NEW_TOKENS), "--device", "cpu", "--batch-size", "2", "--engine", engine]
    argv += ["--num-workers", "0"] if engine == "caption" else []
    assert main(argv) == 0
    capsys.readouterr()
    results = json.loads((out / "results.json").read_text())
    template = AudioFlamingo3Family.eval_prompts["mmau"].template
    assert results["prompt_template"] == template
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [row["id"] for row in rows] == ids
    assert rows[0]["prompt"] == (
        "Instruction: Based on the given audio, identify the source of the sound. Choose the correct option among "
        "the options below: (A) Man (B) Woman (C) Child (D) Robot."
    )
    model, processor = tiny_model("audioflamingo3"), tiny_processor("audioflamingo3")
    for row in rows:
        assert row["prediction"] == _reference_answer(model, processor, row["prompt"], row["audio"])[0]
    hits = sum(mmau_string_match(r["answer"], r["prediction"], r["choices"]) for r in rows)
    assert results["metrics"]["accuracy"] == pytest.approx(100.0 * hits / len(rows))
    assert results["metrics"]["count"] == 3


@pytest.mark.parametrize("model_type", FAMILY_TYPES)
def test_af2_train_refuses_af2_stages_for_other_families_naming_what_they_train(model_type, tmp_path, capsys):
    folder = save_tiny_checkpoint(tmp_path / model_type, model_type)
    train_file = tmp_path / "train.jsonl"
    train_file.write_text(json.dumps({"path": "clip.wav", "prompt": "Describe the audio.", "output": "rain"}) + "\n")
    argv = ["train", "--model", str(folder), "--train-file", str(train_file), "--output-dir", str(tmp_path / "out")]
    assert main([*argv, "--report-to", "none", "--use-cpu"]) == 2  # the command line's usage-error status
    error = capsys.readouterr().err
    name = {"audioflamingo3": "Audio Flamingo 3", "musicflamingo": "Music Flamingo"}[model_type]
    # Without --lora the stage is AF2's "finetune" (audio transformer, cross-attention, CLAP tower).
    assert f"--model {folder} is {name}: stage 'finetune' is AF2's recipe" in error
    assert "--stage none (LoRA: --lora language_model)" in error
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())  # refused before any work


def test_af2_generate_points_other_families_to_the_commands_that_take_them(tmp_path, capsys):
    folder = tmp_path / "mf"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "musicflamingo"}))  # refused before any weights
    clip = _noise(tmp_path / "clip.wav", 1.0, seed=0)
    assert main(["generate", "--model", str(folder), "--audio", str(clip), "--prompt", "What is it?"]) == 2
    assert f"--model {folder} is Music Flamingo; af2 generate runs AF2's pipeline" in capsys.readouterr().err
