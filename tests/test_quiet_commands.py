"""`af2` as a user runs it (the console script's module, in a fresh interpreter): reading the command line imports
neither torch nor transformers, and a command imports none of the packages it does not use (bitsandbytes, peft,
datasets, gradio), so none of their import-time notices reach its output."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
HEAVY = ("torch", "transformers")
UNUSED_BY_INFERENCE = ("bitsandbytes", "peft", "datasets", "gradio")

# Runs af2's console script with the given arguments and writes, at exit (`--help` exits through SystemExit), which
# of the watched packages got imported.
_RUN_AF2 = """
import atexit, json, sys
watched, report, sys.argv = sys.argv[1], sys.argv[2], ["af2", *sys.argv[3:]]
atexit.register(lambda: open(report, "w").write(json.dumps([m for m in json.loads(watched) if m in sys.modules])))
import af2_entry
sys.exit(af2_entry.main())
"""


def _af2(args, tmp_path, watched=HEAVY + UNUSED_BY_INFERENCE, timeout=600):
    """(exit code, stdout, stderr, the watched packages that got imported)."""
    report = tmp_path / "imported.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run(
        [sys.executable, "-c", _RUN_AF2, json.dumps(watched), str(report), *map(str, args)],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return done.returncode, done.stdout, done.stderr, json.loads(report.read_text())


# Every command but `train`, whose options are transformers' TrainingArguments fields (read from the class, which
# imports torch); its help imports no package it does not use (test_train_help_prints_only_the_help).
QUIET_COMMANDS = ["generate", "convert", "caption", "eval", "demo", "serve", "fast-settings"]


@pytest.mark.parametrize("command", [[]] + [[name] for name in QUIET_COMMANDS], ids=lambda c: c[0] if c else "af2")
def test_help_imports_neither_torch_nor_transformers(command, tmp_path):
    code, out, err, imported = _af2([*command, "--help"], tmp_path)
    assert code == 0 and out.startswith("usage: af2") and err == "", err
    assert imported == [], f"af2 {' '.join(command)} --help imported {imported}"


def test_usage_errors_and_unknown_commands_answer_without_importing_torch(tmp_path):
    code, out, err, imported = _af2(["generat"], tmp_path)
    assert code == 2 and "invalid choice: 'generat'" in err and imported == []
    code, out, err, imported = _af2(["generate", "--prompt", "q"], tmp_path)
    assert code == 2 and "the following arguments are required: --audio" in err and imported == []
    code, out, err, imported = _af2(["caption", "clips/"], tmp_path)
    assert code == 2 and "the following arguments are required: --output" in err and imported == []
    # af2 caption checks its sampling options as af2 generate does (commands.options.add_sampling_arguments).
    code, out, err, imported = _af2(["caption", "clips/", "-o", "out.jsonl", "--sample", "--top-p", "1.5"], tmp_path)
    assert code == 2 and "argument --top-p: must be in (0, 1], got 1.5" in err and imported == []
    code, out, err, imported = _af2(["eval", "--task", "no-such-task"], tmp_path)
    assert code == 2 and "argument --task: invalid choice: 'no-such-task'" in err and imported == []
    code, out, err, imported = _af2(["serve", "--max-batch-size", "0"], tmp_path)
    assert code == 2 and "argument --max-batch-size: must be a positive integer, got 0" in err and imported == []
    # Each of serve's limits says what it needs: a word, or an infinite limit, is refused by name.
    code, out, err, imported = _af2(["serve", "--max-queue", "many"], tmp_path)
    assert code == 2 and "argument --max-queue: must be a positive integer, got 'many'" in err and imported == []
    code, out, err, imported = _af2(["serve", "--request-timeout", "inf"], tmp_path)
    assert code == 2 and "argument --request-timeout: must be a finite number, got inf" in err and imported == []
    code, out, err, imported = _af2(["serve", "--max-audio-mb", "0"], tmp_path)
    assert code == 2 and "argument --max-audio-mb: must be greater than 0, got 0" in err and imported == []


@pytest.mark.skipif(
    any(__import__("importlib").util.find_spec(name) is None for name in ("peft", "bitsandbytes")),
    reason="the [train] extra (peft, bitsandbytes) is what made the commands noisy",
)
@pytest.mark.parametrize("command", ["generate", "caption"])
def test_inference_imports_no_training_or_demo_package_and_prints_no_foreign_line(
    command, converted_fixture, tmp_path
):
    model = ["--model", converted_fixture.repo, "--max-new-tokens", "2", "--device", "cpu"]
    if command == "generate":
        args = ["generate", "--audio", converted_fixture.wav(0), "--prompt", "What is this?", *model]
    else:
        args = ["caption", converted_fixture.wav(0), "--prompt", "Describe.", "-o", tmp_path / "out.jsonl", *model]
    code, out, err, imported = _af2(args, tmp_path, watched=UNUSED_BY_INFERENCE)
    assert code == 0, err
    assert imported == [], f"af2 {command} imported {imported}"
    for package in (*UNUSED_BY_INFERENCE, "gemm_4bit"):
        assert package not in err, err


@pytest.mark.skipif(
    __import__("importlib").util.find_spec("peft") is None, reason="needs the [train] extra, as `af2 train` does"
)
def test_train_help_prints_only_the_help(tmp_path):
    # transformers' TrainingArguments imports peft, which imports bitsandbytes: its notice about a kernel it could not
    # fetch from the hub is dropped (transformers_af2.trainer.cli); datasets and gradio are not imported.
    code, out, err, imported = _af2(["train", "--help"], tmp_path, watched=("datasets", "gradio"))
    assert code == 0 and "--learning-rate" in out, err
    assert err == "" and imported == [], (err, imported)
