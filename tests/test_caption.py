"""`af2 caption` in one process on the converted parity fixture: rows equal one-at-a-time `generate`, the batch
inputs equal the processor's, every input kind and output format, bad clips, settings checks, torn part files."""

import csv
import json
import os

import numpy as np
import pytest
import soundfile as sf
import torch

from transformers_af2.caption import RunStore, caption, discover_clips, jobs_for_clips, row_id
from transformers_af2.caption.engine import BatchGenerator, ClipReader, length_grouped_batches, stop_reasons
from transformers_af2.commands import main
from transformers_af2.runstore import model_fingerprint, read_jsonl_lines

PROMPT = "Describe the audio."
NEW_TOKENS = 3


def _noise(path, seconds, seed, rate=16000):
    rng = np.random.default_rng(seed)
    sf.write(path, (rng.standard_normal(int(seconds * rate)) * 0.1).astype("float32"), rate)
    return path


def _read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _run(loaded, inputs, output, **options):
    _, model, processor = loaded
    options.setdefault("prompts", [PROMPT])
    options.setdefault("max_new_tokens", NEW_TOKENS)
    options.setdefault("num_workers", 0)
    return caption(inputs, output, model=model, processor=processor, progress=False, **options)


def _one_at_a_time(model, processor, prompt, audio):
    inputs = processor(text=[prompt], audio=[str(audio)])
    with torch.inference_mode():
        generated = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    new = generated[0, inputs["input_ids"].shape[1] :]
    return processor.decode_answers(new)[0], new


@pytest.fixture(scope="module")
def mixed_clips(loaded, tmp_path_factory):
    """The fixture's 23 s (3 windows) and 7 s (1 window) clips, and a generated 125 s one (12 windows, 5 s dropped)."""
    fixture = loaded[0]
    folder = tmp_path_factory.mktemp("mixed")
    long_clip = _noise(folder / "long.wav", 125.0, seed=3)
    return [fixture.wav(0), fixture.wav(1), long_clip]


def test_rows_equal_one_at_a_time_generate(loaded, mixed_clips, tmp_path):
    _, model, processor = loaded
    prompts = [PROMPT, "What is the Sound in this audio?"]
    summary = _run(loaded, [str(p) for p in mixed_clips], tmp_path / "out.jsonl", prompts=prompts, batch_size=4)
    assert (summary.done, summary.failed, summary.skipped, summary.total_rows) == (6, 0, 0, 6)
    rows = _read_jsonl(tmp_path / "out.jsonl")
    assert [(r["path"], r["prompt"]) for r in rows] == [(str(p), q) for p in mixed_clips for q in prompts]
    assert [r["windows"] for r in rows] == [3, 3, 1, 1, 12, 12]
    assert [r["seconds_dropped"] for r in rows] == [0.0, 0.0, 0.0, 0.0, 5.0, 5.0]
    for row in rows:
        answer, new_tokens = _one_at_a_time(model, processor, row["prompt"], row["path"])
        assert row["answer"] == answer
        assert row["tokens"] == len(new_tokens) == NEW_TOKENS
        assert row["stop_reason"] == "length"
        # A file's clip id is its resolved path (the fixture's folder is reached through a symlink).
        assert row["clip_id"] == os.path.realpath(row["path"])
        assert row["id"] == row_id(row["clip_id"], row["prompt"])
        assert "_source" not in row  # kept in the parts only
    provenance = json.loads((tmp_path / "out.jsonl.meta.json").read_text())["provenance"]
    assert provenance["generation"] == {"max_new_tokens": NEW_TOKENS, "do_sample": False, "num_beams": 1}
    assert provenance["model"]["dtype"] == "float32"
    assert set(provenance["versions"]) == {"transformers_af2", "transformers", "torch"}


def test_batch_inputs_equal_the_processors(loaded, mixed_clips):
    _, model, processor = loaded
    clips = discover_clips([str(p) for p in mixed_clips])
    generator = BatchGenerator(model, processor, {})
    reader = ClipReader(clips, generator.family)
    read = [reader[i] for i in range(len(clips))]
    prompts = ["a", "What is the Sound in this audio?  ", PROMPT]
    batch = generator.inputs(prompts, [item["clip"] for item in read])
    expected = processor(text=prompts, audio=[str(p) for p in mixed_clips])
    assert set(batch) == set(expected)
    for key in expected:
        torch.testing.assert_close(batch[key], expected[key], rtol=0, atol=0)


def test_stop_reasons_and_token_counts():
    eos, pad = 7, 9
    new_tokens = torch.tensor([[1, 2, eos, pad, pad], [1, 2, 3, 4, 5], [eos, pad, pad, pad, pad], [3, 3, 3, 3, eos]])
    counts, reasons = stop_reasons(new_tokens, [eos, 8])
    assert counts == [3, 5, 1, 5]
    assert reasons == ["eos", "length", "eos", "eos"]


def test_length_grouped_batches_keep_window_counts_together():
    windows = [1, 12, 3, 1, 12, 3, 1, 12]
    batches = length_grouped_batches(list(range(8)), 3, lambda i: windows[i])
    assert [[windows[i] for i in batch] for batch in batches] == [[1, 1, 1], [3, 3, 12], [12, 12]]
    assert sorted(i for batch in batches for i in batch) == list(range(8))


def test_inputs_of_every_kind(tmp_path):
    clips_dir = tmp_path / "clips"
    (clips_dir / "b").mkdir(parents=True)
    a = _noise(clips_dir / "a.wav", 0.5, 0)
    b = _noise(clips_dir / "b" / "c.flac", 0.5, 1)
    (clips_dir / "notes.md").write_text("not audio")
    assert [c.clip_id for c in discover_clips([clips_dir])] == [str(a), str(b)]
    assert [c.clip_id for c in discover_clips([clips_dir], extensions=("flac",))] == [str(b)]

    listing = tmp_path / "list.txt"
    listing.write_text("# clips\nclips/a.wav\n\nclips/b/c.flac\n")
    assert [c.path for c in discover_clips([listing])] == [str(a), str(b)]

    with open(tmp_path / "m.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "path", "prompt"])
        writer.writerow(["first", "clips/a.wav", "Is it loud?"])
        writer.writerow(["second", str(b), ""])
    clips = discover_clips([tmp_path / "m.csv"])
    assert [(c.clip_id, c.path, c.index, c.prompt) for c in clips] == [
        ("first", str(a), 0, "Is it loud?"),
        ("second", str(b), 1, None),
    ]
    jobs = jobs_for_clips(clips, [PROMPT, "Other?"])
    assert [(j.clip.clip_id, j.prompt) for j in jobs] == [
        ("first", "Is it loud?"),
        ("second", PROMPT),
        ("second", "Other?"),
    ]
    with pytest.raises(ValueError, match="second.*no prompt"):
        jobs_for_clips(clips, [])

    (tmp_path / "m.jsonl").write_text(json.dumps({"file": "clips/a.wav"}) + "\n")
    assert [c.clip_id for c in discover_clips([tmp_path / "m.jsonl"])] == [str(a)]
    (tmp_path / "bad.csv").write_text("name,x\nclips/a.wav,1\n")
    with pytest.raises(ValueError, match=r"bad.csv: no path column among \['name', 'x'\]"):
        discover_clips([tmp_path / "bad.csv"])
    with pytest.raises(FileNotFoundError, match="missing.wav: no such file"):
        discover_clips([tmp_path / "missing.wav"])
    # The same clip listed twice is one clip.
    assert len(discover_clips([a, clips_dir, listing])) == 2


def test_manifest_prompts_into_parquet_and_csv(loaded, tmp_path):
    pq = pytest.importorskip("pyarrow.parquet", reason="Parquet output needs pyarrow (the [caption] extra)")
    a = _noise(tmp_path / "a.wav", 0.7, 0)
    b = _noise(tmp_path / "b.wav", 1.2, 1)
    manifest = tmp_path / "m.parquet"
    import pyarrow as pa

    pq.write_table(
        pa.table({"id": ["x", "y"], "audio_path": ["a.wav", "b.wav"], "prompt": ["Is it loud?", None]}), manifest
    )
    out = tmp_path / "out.parquet"
    summary = _run(loaded, [manifest], out)
    assert summary.done == 2
    table = pq.read_table(out).to_pylist()
    assert [(r["clip_id"], r["path"], r["index"], r["prompt"]) for r in table] == [
        ("x", str(a), 0, "Is it loud?"),
        ("y", str(b), 1, PROMPT),
    ]
    out_csv = tmp_path / "out.csv"
    _run(loaded, [manifest], out_csv)
    with open(out_csv, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["clip_id"], r["answer"]) for r in rows] == [(r["clip_id"], r["answer"]) for r in table]


def test_saved_dataset_input(loaded, tmp_path):
    datasets = pytest.importorskip("datasets", reason="dataset input needs the datasets package")
    paths = [str(_noise(tmp_path / f"d{i}.wav", 0.6 + i * 0.2, i)) for i in range(3)]
    dataset = datasets.Dataset.from_dict({"sound": paths}).cast_column("sound", datasets.Audio())
    datasets.DatasetDict({"test": dataset}).save_to_disk(tmp_path / "ds")
    with pytest.raises(ValueError, match=r"splits \['test'\]; choose one with --split"):
        _run(loaded, [tmp_path / "ds"], tmp_path / "x.jsonl", audio_column="sound")
    with pytest.raises(ValueError, match="no audio column 'audio'"):
        _run(loaded, [tmp_path / "ds"], tmp_path / "x.jsonl", split="test")
    summary = _run(loaded, [tmp_path / "ds"], tmp_path / "out.jsonl", split="test", audio_column="sound")
    assert summary.done == 3
    rows = _read_jsonl(tmp_path / "out.jsonl")
    assert [r["index"] for r in rows] == [0, 1, 2]
    assert [r["clip_id"] for r in rows] == [f"{tmp_path / 'ds'}[test]#{i}" for i in range(3)]
    _, model, processor = loaded
    assert rows[1]["answer"] == _one_at_a_time(model, processor, PROMPT, paths[1])[0]


def test_unreadable_clips_go_to_the_errors_file(loaded, tmp_path, capsys):
    good = _noise(tmp_path / "good.wav", 0.8, 0)
    (tmp_path / "corrupt.wav").write_bytes(b"RIFF not really")
    sf.write(tmp_path / "empty.wav", np.zeros(0, dtype="float32"), 16000)
    listing = tmp_path / "list.txt"
    listing.write_text("good.wav\ncorrupt.wav\nempty.wav\nmissing.wav\n")
    out = tmp_path / "out.jsonl"
    code = main(["caption", str(listing), "--model", str(loaded[0].repo), "--prompt", PROMPT, "-o", str(out),
                     "--max-new-tokens", "2", "--num-workers", "1", "--device", "cpu"])  # fmt: skip
    assert code == 0
    captured = capsys.readouterr()
    # Not a terminal: progress as lines (about one per 5 %), here one per clip, the last one complete.
    progress = [line for line in captured.err.splitlines() if line.startswith("af2: ") and "clips (" in line]
    assert [line.split()[1] for line in progress] == ["1/4", "2/4", "3/4", "4/4"]
    assert captured.out.strip() == (
        f"af2 caption: 1 done, 3 failed, 0 skipped as already done; 1 rows in {out}; reasons of failures in "
        f"{out}.errors.jsonl"
    )
    assert [r["path"] for r in _read_jsonl(out)] == [str(good)]
    errors = {r["path"].rsplit("/", 1)[1]: r["error"] for r in _read_jsonl(tmp_path / "out.jsonl.errors.jsonl")}
    assert set(errors) == {"corrupt.wav", "empty.wav", "missing.wav"}
    assert errors["corrupt.wav"].startswith(f"ValueError: {tmp_path / 'corrupt.wav'}: cannot decode this audio")
    for name, error in errors.items():  # the clip named once at the start, not "path: path: ..."
        assert error.split(": ", 2)[1:] != [str(tmp_path / name)] * 2 and f"{tmp_path / name}: {tmp_path}" not in error
    assert "the audio is empty" in errors["empty.wav"]
    assert "no such audio file" in errors["missing.wav"]

    # Once a clip is repaired, the next run generates it and the errors file goes.
    _noise(tmp_path / "corrupt.wav", 0.5, 1)
    _noise(tmp_path / "empty.wav", 0.5, 2)
    _noise(tmp_path / "missing.wav", 0.5, 3)
    summary = _run(loaded, [listing], out, max_new_tokens=2)
    assert (summary.done, summary.failed, summary.skipped, summary.total_rows) == (3, 0, 1, 4)
    assert not (tmp_path / "out.jsonl.errors.jsonl").exists()


def test_other_settings_into_the_same_output_are_an_error(loaded, tmp_path, capsys):
    clip = _noise(tmp_path / "a.wav", 0.5, 0)
    out = tmp_path / "out.jsonl"
    _run(loaded, [clip], out)
    with pytest.raises(ValueError, match=r"other settings or data: generation.max_new_tokens: was 3, now 5\. "):
        _run(loaded, [clip], out, max_new_tokens=5)
    code = main(["caption", str(clip), "--model", str(loaded[0].repo), "--prompt", PROMPT, "-o", str(out),
                     "--max-new-tokens", "3", "--dtype", "bfloat16", "--device", "cpu"])  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the weight-loading bar
    assert err.startswith("af2 caption: error: ") and "model.dtype: was 'float32', now 'bfloat16'" in err
    # The same settings again: everything is skipped, nothing duplicated.
    summary = _run(loaded, [clip], out)
    assert (summary.done, summary.skipped, summary.total_rows) == (0, 1, 1)
    assert len(_read_jsonl(out)) == 1


def test_a_resume_with_another_original_config_is_refused(loaded, tmp_path, monkeypatch):
    """An original-layout checkpoint is converted with the `--config` YAML (its sizes and base model): the YAML's
    content is part of the run's model, so a resume with other YAML content is refused naming it, and the same
    content under another name resumes."""
    fixture = loaded[0]
    monkeypatch.setenv("AF2_CACHE", str(tmp_path / "cache"))
    clip = _noise(tmp_path / "a.wav", 0.5, 0)
    out = tmp_path / "out.jsonl"
    options = {"model": str(fixture.fixture_dir / "original"), "prompts": [PROMPT], "max_new_tokens": NEW_TOKENS,
               "num_workers": 0, "progress": False, "device": "cpu"}  # fmt: skip
    assert caption([clip], out, config=str(fixture.yaml_path), **options).done == 1
    edited = tmp_path / "edited.yaml"
    edited.write_text(fixture.yaml_path.read_text() + "\n# edited\n")
    with pytest.raises(ValueError, match=r"other settings or data: model\.original_config: was '\d+:[0-9a-f]{64}', "):
        caption([clip], out, config=str(edited), **options)
    renamed = tmp_path / "renamed.yaml"
    renamed.write_text(fixture.yaml_path.read_text())
    summary = caption([clip], out, config=str(renamed), **options)
    assert (summary.done, summary.skipped) == (0, 1)
    # Loaded from a hub id through the conversion cache, a model is fingerprinted by its parameters: the YAML, which
    # also sets what is not a parameter (the processor's windows), is part of that fingerprint too.
    by_parameters = model_fingerprint(loaded[1], "af2test/original-layout", fixture.yaml_path)
    assert (
        "parameters" in by_parameters
        and by_parameters["original_config"]
        == model_fingerprint(loaded[1], str(fixture.fixture_dir / "original"), fixture.yaml_path)["original_config"]
    )
    # A loaded model was not loaded with a YAML: naming one is a mistake, not a setting.
    with pytest.raises(ValueError, match="takes no config"):
        _run(loaded, [clip], tmp_path / "other.jsonl", config=str(fixture.yaml_path))


def test_torn_last_line_is_dropped_and_regenerated(loaded, tmp_path):
    clips = [_noise(tmp_path / f"c{i}.wav", 0.5, i) for i in range(3)]
    out = tmp_path / "out.jsonl"
    _run(loaded, clips, out)
    complete = _read_jsonl(out)
    store = RunStore(out)
    merged = store.parts / "rows-merged.jsonl"
    # What kill -9 in the middle of a write leaves: the last row cut short.
    text = merged.read_bytes()
    merged.write_bytes(text[: len(text) - 20])
    assert [r["id"] for r in read_jsonl_lines(merged)] == [r["id"] for r in complete[:2]]
    summary = _run(loaded, clips, out)
    assert (summary.done, summary.skipped) == (1, 2)
    assert _read_jsonl(out) == complete
    # A broken line that is not the last is corruption, not a crash: an error naming the file and line.
    lines = merged.read_text().splitlines()
    merged.write_text("\n".join([lines[0], "{broken", *lines[1:]]) + "\n")
    with pytest.raises(ValueError, match=r"rows-merged.jsonl, line 2: not a JSON row"):
        store.read_rows()


def test_help_lists_the_options(capsys):
    with pytest.raises(SystemExit):
        main(["caption", "--help"])
    text = capsys.readouterr().out
    for option in ("--prompt", "--output", "--batch-size", "--dtype", "--split", "--audio-column", "torchrun"):
        assert option in text


def test_prompts_given_twice_are_asked_once_and_bad_prompts_fail_before_the_run(loaded, tmp_path):
    clip = _noise(tmp_path / "a.wav", 0.5, 0)
    summary = _run(loaded, [clip], tmp_path / "out.jsonl", prompts=[PROMPT, PROMPT])
    assert (summary.done, summary.total_rows) == (1, 1)
    with pytest.raises(ValueError, match=r"prompt '<audio><audio>twice'.* holds 2 <audio>"):
        _run(loaded, [clip], tmp_path / "bad.jsonl", prompts=["<audio><audio>twice"])
    assert not (tmp_path / "bad.jsonl.parts").exists()


def test_batches_group_clips_of_equal_window_count(loaded, tmp_path, monkeypatch):
    _, model, _ = loaded
    clips = [_noise(tmp_path / f"c{i}.wav", seconds, i) for i, seconds in enumerate([1.0, 25.0, 2.0, 21.0])]
    window_counts = []
    real_generate = model.generate

    def recording_generate(**inputs):
        window_counts.append(inputs["input_features_mask"].sum(dim=1).tolist())
        return real_generate(**inputs)

    monkeypatch.setattr(model, "generate", recording_generate)
    summary = _run(loaded, clips, tmp_path / "out.jsonl", batch_size=2, lookahead=4)
    assert summary.done == 4
    assert window_counts == [[1, 1], [3, 3]]  # not the input order's [1, 3], [1, 3]
    assert [r["windows"] for r in _read_jsonl(tmp_path / "out.jsonl")] == [1, 3, 1, 3]  # rows in input order
