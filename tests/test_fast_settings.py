"""
`af2 fast-settings` and `--fast` (transformers_af2.presets): the candidates are measured on the parity fixture's
converted model with its own audio and prompts, the record names the model's files and the machine, and `--fast`
takes the recorded choice for that model only.
"""

import contextlib
import io
import json
import shutil

import pytest
import torch

from transformers_af2.commands import main
from transformers_af2.loading import load_model_and_processor, model_loading_options
from transformers_af2.presets import (
    RECORDS_FILE,
    choose_setting,
    fast_settings,
    machine_identity,
    measured_record,
    model_files_identity,
    write_record,
)

NEW_TOKENS = 6


def _measurement(setting: str, seconds: float, agreement: float) -> dict:
    dtype, _, scheme = setting.partition("+")
    return {
        "setting": setting,
        "dtype": dtype,
        "quantization": scheme or None,
        "seconds": seconds,
        "agreement": {"tokens": agreement},
    }


@pytest.mark.parametrize(
    "measured, chosen",
    [
        # The fastest of those that keep >= 97% of float32's tokens.
        ([("float32", 10.0, 1.0), ("bfloat16", 5.0, 1.0), ("bfloat16+int8", 3.0, 0.98)], "bfloat16+int8"),
        # Faster but below the rule: left out, whatever its speed.
        ([("float32", 10.0, 1.0), ("bfloat16", 5.0, 0.99), ("bfloat16+int4", 1.0, 0.969)], "bfloat16"),
        # Not faster by the margin (5%) than the best more precise one: the more precise one stays.
        ([("float32", 10.0, 1.0), ("bfloat16", 5.0, 1.0), ("bfloat16+int8", 4.9, 1.0)], "bfloat16"),
        # Nothing else keeps the answers: float32.
        ([("float32", 10.0, 1.0), ("bfloat16", 5.0, 0.5)], "float32"),
        # A slower candidate is never taken, even when it agrees.
        ([("float32", 10.0, 1.0), ("bfloat16", 12.0, 1.0)], "float32"),
    ],
)
def test_choose_setting_takes_the_fastest_that_keeps_the_answers(measured, chosen):
    assert choose_setting([_measurement(*entry) for entry in measured])["setting"] == chosen


@pytest.fixture(scope="module")
def measured(converted_fixture, tmp_path_factory):
    """`af2 fast-settings` run once on the fixture's converted model (two of its clips and its first prompt), with the
    records in a temporary cache: (fixture, record printed by --json, cache directory)."""
    cache = tmp_path_factory.mktemp("af2-cache")
    fixture = converted_fixture
    argv = [
        "fast-settings", "--model", str(fixture.repo), "--device", "cpu", "--audio", str(fixture.wav(0)),
        "--audio", str(fixture.wav(1)), "--prompt", fixture.reference["prompts"][0], "--new-tokens", str(NEW_TOKENS),
        "--candidates", "bfloat16", "bfloat16+int8", "--json",
    ]  # fmt: skip
    out = io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(out):
        patch.setenv("AF2_CACHE", str(cache))
        assert main(argv) == 0
    return fixture, json.loads(out.getvalue()), cache


def test_fast_settings_measures_each_candidate_against_float32(measured):
    """Every candidate answered the same clips; float32's answer to the fixture's first clip is the original's greedy
    answer; each agreement is the share of float32's tokens the candidate matched, position by position."""
    fixture, record, _ = measured
    settings = [entry["setting"] for entry in record["measurements"]]
    assert settings == ["float32", "bfloat16", "bfloat16+int8"]
    reference = record["measurements"][0]["clips"]
    assert list(reference) == [str(fixture.wav(0)), str(fixture.wav(1))]
    prompt_length = fixture.ids("s0.prompt_ids").shape[1]
    expected = fixture.ids("s0.greedy_ids")[0, prompt_length:].tolist()[:NEW_TOKENS]
    assert reference[str(fixture.wav(0))]["tokens"] == expected
    for entry in record["measurements"]:
        same = total = 0
        for clip, answer in entry["clips"].items():
            want = reference[clip]["tokens"]
            same += sum(a == b for a, b in zip(answer["tokens"], want))
            total += len(want)
            assert answer["prefill_s"] > 0 and answer["step_s"] > 0
        assert entry["agreement"]["tokens"] == pytest.approx(same / total)
        assert entry["seconds"] > 0
    assert record["measurements"][0]["agreement"]["tokens"] == 1.0


def test_the_record_holds_the_rules_choice_for_this_model_and_machine(measured):
    """The recorded choice is what `choose_setting` (tested above with explicit numbers) makes of the measurements,
    for the model's files and this machine, in the cache's records file."""
    fixture, record, cache = measured
    chosen = choose_setting(record["measurements"])
    assert record["choice"] == {"dtype": chosen["dtype"], "quantization": chosen["quantization"],
                                "setting": chosen["setting"]}  # fmt: skip
    assert record["model"] == model_files_identity(fixture.repo) and "files" in record["model"]
    assert record["machine"] == machine_identity("cpu")
    (stored,) = json.loads((cache / RECORDS_FILE).read_text())["records"]
    assert stored["choice"] == record["choice"] and stored["model"] == record["model"]


def test_fast_takes_the_record_for_this_model_only(measured, tmp_path, monkeypatch, capsys):
    fixture, record, cache = measured
    monkeypatch.setenv("AF2_CACHE", str(cache))
    choice = record["choice"]
    settings = fast_settings("cpu", model_id=str(fixture.repo))
    assert (settings.dtype, settings.quantization) == (choice["dtype"], choice["quantization"])
    assert settings.reason.startswith("measured for this model on this machine")
    assert main(["fast-settings", "--model", str(fixture.repo), "--device", "cpu", "--show"]) == 0
    assert f": {choice['setting']} (measured for this model" in capsys.readouterr().out

    # The same files elsewhere are the same model; one changed byte in a weight file is another model.
    copy = tmp_path / "copy"
    shutil.copytree(fixture.repo, copy)
    assert measured_record(copy, "cpu") is not None
    weights = next(copy.glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert measured_record(copy, "cpu") is None
    assert fast_settings("cpu", model_id=str(copy)).reason.startswith("CPU")

    # Another thread count is another machine.
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(threads + 1)
        assert measured_record(fixture.repo, "cpu") is None
    finally:
        torch.set_num_threads(threads)


def test_a_recorded_quantization_is_loaded_by_fast_with_its_dtype_only(measured, tmp_path, monkeypatch, caplog):
    """A record that chose bfloat16 + int8 (written here: which setting a machine measures fastest is its own) makes
    `--fast` load int8 weights in bfloat16; an explicit --dtype or --quantization wins over it."""
    pytest.importorskip("torchao")
    fixture, record, cache = measured
    cache = tmp_path / "cache"
    shutil.copytree(measured[2], cache)
    path = cache / RECORDS_FILE
    records = json.loads(path.read_text())
    (entry,) = records["records"]
    entry["choice"] = {"dtype": "bfloat16", "quantization": "int8", "setting": "bfloat16+int8"}
    path.write_text(json.dumps(records))
    monkeypatch.setenv("AF2_CACHE", str(cache))

    with caplog.at_level("INFO", logger="transformers_af2.loading"):
        options = model_loading_options("cpu", "auto", True, None, model_id=str(fixture.repo))
    assert (options["dtype"], options["quantization"]) == (torch.bfloat16, "int8")
    assert "--fast: bfloat16+int8 (measured for this model on this machine" in caplog.text
    model, _ = load_model_and_processor(str(fixture.repo), device="cpu", **options)
    assert model.hf_quantizer is not None and model.dtype == torch.bfloat16

    explicit = model_loading_options("cpu", "float32", True, None, model_id=str(fixture.repo))
    assert (explicit["dtype"], explicit["quantization"]) == (torch.float32, None)
    other = model_loading_options("cpu", "auto", True, "int4", model_id=str(fixture.repo))
    assert (other["dtype"], other["quantization"]) == (torch.bfloat16, "int4")
    without_fast = model_loading_options("cpu", "auto", False, None, model_id=str(fixture.repo))
    assert (without_fast["dtype"], without_fast["quantization"]) == (torch.float32, None)


def test_a_command_says_what_fast_took_before_a_refused_resume(measured, tmp_path, monkeypatch, capsys):
    """`--fast` on a command prints what it took and why: here a caption run started in float32 and resumed with
    `--fast` after a measurement chose bfloat16 + int8 is refused, and the line before the refusal says that the
    record made the change."""
    pytest.importorskip("torchao")
    fixture, _, _ = measured
    cache = tmp_path / "cache"
    write_record({**_RECORD, "model": model_files_identity(fixture.repo), "machine": machine_identity("cpu")}, cache)
    monkeypatch.setenv("AF2_CACHE", str(cache))
    out = tmp_path / "captions.jsonl"
    argv = ["caption", str(fixture.wav(1)), "--model", str(fixture.repo), "--prompt", "Describe the audio.", "-o",
            str(out), "--max-new-tokens", "2", "--device", "cpu", "--num-workers", "0", "--quiet"]  # fmt: skip
    assert main(argv) == 0
    capsys.readouterr()
    import logging
    import sys

    # A caller whose own logging prints INFO lines (as a notebook's or a job script's may) still sees the line once.
    callers = logging.StreamHandler(sys.stderr)
    logging.getLogger().addHandler(callers)
    root_level = logging.getLogger().level
    logging.getLogger().setLevel(logging.INFO)
    try:
        assert main([*argv, "--fast"]) == 2
    finally:
        logging.getLogger().removeHandler(callers)
        logging.getLogger().setLevel(root_level)
    err = capsys.readouterr().err
    took = "af2 caption: --fast: bfloat16+int8 (measured for this model on this machine (2026-12-07 08:00:00))"
    assert err.count("--fast: bfloat16+int8") == 1 and took in err
    refusal = next(line for line in err.splitlines() if line.startswith("af2 caption: error: "))
    assert err.index(took) < err.index(refusal) and "model.dtype: was 'float32', now 'bfloat16 quantized " in refusal


def test_hub_ids_are_named_by_their_snapshot_commit(tmp_path, monkeypatch):
    """A hub id in the local hub cache is named by its snapshot's commit; one not in the cache has no record (it was
    never measured here) and nothing is downloaded to find out."""
    from huggingface_hub import constants
    from test_hub_ids import COMMIT, publish

    snapshot = publish(tmp_path / "hub", "af2test/fast", {"config.json": b"{}"})
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert model_files_identity("af2test/fast") == {"hub_revision": COMMIT}
    assert model_files_identity(snapshot) == {"hub_revision": COMMIT}
    assert model_files_identity("af2test/not-downloaded") is None
    assert measured_record("af2test/not-downloaded", "cpu", cache_dir=tmp_path) is None


def test_fast_settings_refuses_what_it_cannot_measure(converted_fixture, tmp_path, capsys):
    """A setting that is not DTYPE[+SCHEME] is a usage error naming it; an unreadable clip is refused before any
    model is loaded, naming the file."""
    with pytest.raises(SystemExit) as raised:
        main(["fast-settings", "--candidates", "float64"])
    assert raised.value.code == 2
    assert "setting 'float64': write DTYPE or DTYPE+SCHEME" in capsys.readouterr().err
    missing = tmp_path / "missing.wav"
    argv = ["fast-settings", "--model", str(converted_fixture.repo), "--device", "cpu", "--audio", str(missing)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("af2 fast-settings: error: --audio ") and str(missing) in err


def test_a_directory_named_like_a_snapshot_is_named_by_its_files(converted_fixture, tmp_path):
    """Only a snapshot inside a hub cache (`models--*/snapshots/<commit>`) is named by its commit: another folder
    called `snapshots/latest`, whose files can be rewritten, is named by them."""
    first, second = tmp_path / "a" / "snapshots" / "latest", tmp_path / "b" / "snapshots" / "latest"
    shutil.copytree(converted_fixture.repo, first)
    shutil.copytree(converted_fixture.repo, second)
    (second / "config.json").write_text((second / "config.json").read_text().replace("{", '{"note": 1, ', 1))
    assert "files" in model_files_identity(first)
    assert model_files_identity(first) != model_files_identity(second)


_RECORD = {"model": {"files": {"m": "1:ab"}}, "machine": {"device": "cpu"}, "measured": "2026-12-07 08:00:00",
           "choice": {"dtype": "bfloat16", "quantization": "int8", "setting": "bfloat16+int8"}}  # fmt: skip


@pytest.mark.parametrize(
    "content",
    [
        "not json at all",
        json.dumps({"records": 5}),
        json.dumps([_RECORD]),
        json.dumps({"records": [{**_RECORD, "measured": None}]}),
        json.dumps({"records": [{**_RECORD, "choice": "bfloat16"}]}),
        json.dumps({"records": [{**_RECORD, "choice": {"dtype": "bfloat16", "quantization": "evil"}}]}),
        json.dumps({"records": [{**_RECORD, "choice": {"dtype": "float64", "quantization": None}}]}),
    ],
    ids=[
        "not-json",
        "records-not-a-list",
        "a-list",
        "no-date",
        "choice-not-a-dict",
        "unknown-scheme",
        "unknown-dtype",
    ],
)
def test_a_damaged_records_file_leaves_fast_on_the_device_table(converted_fixture, tmp_path, caplog, content):
    """A records file that is not one, or an entry that is not a record (hand-edited), never breaks a command or
    applies a setting it does not name: `--fast` warns naming the file and takes the device table; the next
    measurement keeps a damaged file aside and starts a new one."""
    path = tmp_path / RECORDS_FILE
    path.write_text(content)
    repo = str(converted_fixture.repo)
    with caplog.at_level("WARNING", logger="transformers_af2.presets"):
        settings = fast_settings("cpu", model_id=repo, cache_dir=tmp_path)
    assert settings.reason.startswith("CPU") and settings.quantization is None
    assert str(path) in caplog.text
    record = {**_RECORD, "model": model_files_identity(repo), "machine": machine_identity("cpu")}
    with caplog.at_level("WARNING", logger="transformers_af2.presets"):
        write_record(record, tmp_path)
    assert measured_record(repo, "cpu", cache_dir=tmp_path)["choice"] == _RECORD["choice"]
    kept = list(tmp_path.glob(f"{RECORDS_FILE}.unreadable-*"))
    if content == "not json at all" or '"records": 5' in content or content.startswith("["):
        assert [k.read_text() for k in kept] == [content]  # the damaged file is kept, not overwritten
    else:
        assert kept == []  # a valid file: its bad entries are left out


def test_the_config_yaml_is_part_of_the_models_identity(converted_fixture, tmp_path):
    """An original-layout checkpoint is loaded with its `--config` YAML: a record measured with one YAML is taken with
    the same content only (under any name), not with other content or without it; a YAML that does not exist names
    nothing."""
    repo, yaml_path = str(converted_fixture.repo), converted_fixture.yaml_path
    renamed, edited = tmp_path / "renamed.yaml", tmp_path / "edited.yaml"
    renamed.write_text(yaml_path.read_text())
    edited.write_text(yaml_path.read_text() + "\n# edited\n")
    identity = model_files_identity(repo, yaml_path)
    assert identity == {**model_files_identity(repo), "original_config": identity["original_config"]}
    write_record({**_RECORD, "model": identity, "machine": machine_identity("cpu")}, tmp_path)
    assert measured_record(repo, "cpu", tmp_path, yaml_path)["choice"] == _RECORD["choice"]
    assert measured_record(repo, "cpu", tmp_path, renamed) is not None
    assert measured_record(repo, "cpu", tmp_path, edited) is None
    assert measured_record(repo, "cpu", tmp_path) is None
    assert model_files_identity(repo, tmp_path / "missing.yaml") is None
    assert model_files_identity(repo, tmp_path) is None  # a directory: the loading says what is wrong
    assert fast_settings("cpu", model_id=repo, cache_dir=tmp_path, original_config=edited).reason.startswith("CPU")


_WRITER = """
import os, sys, time
from pathlib import Path
from transformers_af2.presets import write_record
cache, name, other = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
(cache / f"{name}.ready").touch()
while not (cache / f"{other}.ready").exists():  # start together: both are importing until then
    time.sleep(0.001)
for index in range(100):
    write_record({"model": {"files": {name: str(index)}}, "machine": {"device": "cpu"}, "measured": "now",
                  "choice": {"dtype": "float32", "quantization": None, "setting": "float32"}}, cache)
"""


def test_measurements_finishing_together_keep_each_others_records(tmp_path):
    """Two processes each writing 100 records for other models into one records file at the same time: all 200
    are kept (without the lock, each read-change-write loses the other's records written meanwhile)."""
    import subprocess
    import sys

    names = ("first", "second")
    writers = [
        subprocess.Popen([sys.executable, "-c", _WRITER, str(tmp_path), name, other])
        for name, other in (names, names[::-1])
    ]
    assert [writer.wait(timeout=300) for writer in writers] == [0, 0]
    records = json.loads((tmp_path / RECORDS_FILE).read_text())["records"]
    assert sorted(next(iter(r["model"]["files"].items())) for r in records) == sorted(
        (name, str(index)) for name in names for index in range(100)
    )


def test_show_names_a_model_that_does_not_exist(capsys, tmp_path):
    missing = tmp_path / "no-such-model"
    assert main(["fast-settings", "--model", str(missing), "--device", "cpu", "--show"]) == 2
    assert f"--model {missing}: no such directory, and not a hub id" in capsys.readouterr().err
