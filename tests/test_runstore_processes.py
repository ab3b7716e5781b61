"""
The run lock and resume with real processes: a second `af2 caption` / `af2 eval` into an output a first one is
writing is refused at once, naming it; after the first is killed with SIGKILL its lock is taken over and the run
resumes with every row once; a resume after the weights changed is refused.

The first run is stopped (SIGSTOP) once it has written rows, so that it is certainly still holding the output
when the second starts, whatever the machine's load; nothing waits a fixed time.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from safetensors.torch import load_file, save_file
from test_eval_tasks import build_mmau

REPO_ROOT = Path(__file__).resolve().parents[1]
NUM_CLIPS = 40


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT / "src"), env.get("PYTHONPATH")) if p)
    return env


def _af2(*args):
    return [sys.executable, "-m", "transformers_af2", *map(str, args)]


def _wait_for(condition, process, what, timeout=300):
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            pytest.fail(f"the first run ended before {what}: {process.stderr.read().decode()[-2000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"no {what} within {timeout} s")
        time.sleep(0.05)


def _lines(paths) -> int:
    return sum(path.read_bytes().count(b"\n") for path in paths)


@pytest.fixture
def stopped_then_killed():
    """Processes the test stops; each is killed and reaped at the end whatever happens."""
    processes = []
    yield processes
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
        process.wait()
        if process.stderr:
            process.stderr.close()


def test_caption_second_run_refused_then_killed_run_taken_over(converted_fixture, tmp_path, stopped_then_killed):
    folder = tmp_path / "clips"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for index in range(NUM_CLIPS):
        sf.write(folder / f"c{index:02d}.wav", (rng.standard_normal(8000) * 0.1).astype("float32"), 16000)
    out = tmp_path / "captions.jsonl"
    command = _af2("caption", folder, "--model", converted_fixture.repo, "--prompt", "Describe the audio.", "-o", out,
                   "--max-new-tokens", "2", "--device", "cpu", "--batch-size", "4", "--lookahead", "4",
                   "--num-workers", "0")  # fmt: skip
    first = subprocess.Popen(command, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    stopped_then_killed.append(first)
    parts = Path(f"{out}.parts")
    _wait_for(lambda: parts.is_dir() and _lines(parts.glob("rows-*.jsonl")) >= 8, first, "8 rows")
    first.send_signal(signal.SIGSTOP)  # holds the lock, writes nothing more

    second = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=300)
    assert second.returncode == 2
    error = second.stderr.strip().splitlines()[-1]
    assert error.startswith(f"af2 caption: error: {out} is being written by another run: pid {first.pid} on host ")
    assert f"(af2 caption {folder} --model" in error  # the running command is named

    first.send_signal(signal.SIGKILL)
    first.wait()
    kept = _lines(parts.glob("rows-*.jsonl"))
    third = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=600)
    assert third.returncode == 0, third.stderr[-3000:]
    assert f"taking over from a run that ended without finishing: pid {first.pid} on host " in third.stderr
    assert f"af2: resuming: {kept} rows already done, {NUM_CLIPS - kept} clips to do" in third.stderr
    assert third.stdout.strip() == (
        f"af2 caption: {NUM_CLIPS - kept} done, 0 failed, {kept} skipped as already done; {NUM_CLIPS} rows in {out}"
    )
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [row["path"] for row in rows] == sorted(str(p) for p in folder.glob("*.wav"))
    assert Path(f"{out}.lock").read_text() == ""  # released by a run that ended properly


def test_eval_second_run_refused_and_resume_after_weights_change_refused(converted_fixture, tmp_path,
                                                                         stopped_then_killed):  # fmt: skip
    repo = tmp_path / "model"
    shutil.copytree(converted_fixture.repo, repo)
    data, _, ids = build_mmau(tmp_path / "data")
    out = tmp_path / "out"
    command = _af2("eval", "--task", "mmau", "--data", data, "--model", repo, "--output", out, "--batch-size", "1",
                   "--max-new-tokens", "8", "--device", "cpu", "--engine", "loop")  # fmt: skip
    first = subprocess.Popen(command, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    stopped_then_killed.append(first)
    predictions = out / "predictions.jsonl"
    _wait_for(lambda: predictions.is_file() and _lines([predictions]) >= 1, first, "a prediction")
    first.send_signal(signal.SIGSTOP)

    second = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=300)
    assert second.returncode == 2
    assert f"{out} is being written by another run: pid {first.pid}" in second.stderr

    first.send_signal(signal.SIGKILL)
    first.wait()
    kept = _lines([predictions])
    assert 1 <= kept < len(ids)
    # The weights replaced in place before the resume: refused, nothing added to the predictions.
    [weights] = sorted(repo.glob("*.safetensors"))
    original = weights.read_bytes()
    tensors = load_file(weights)
    name = sorted(tensors)[0]
    tensors[name] = tensors[name] * 2 + 1
    save_file(tensors, weights, metadata={"format": "pt"})
    refused = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2
    assert f"model.files.{weights.name}: was " in refused.stderr
    assert _lines([predictions]) == kept
    # The original weights back (same bytes, new mtime): the same model, so the run resumes.
    weights.write_bytes(original)
    resumed = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"af2 eval: resuming: {kept} rows already done, {len(ids) - kept} items to do" in resumed.stderr
    assert [json.loads(line)["id"] for line in predictions.read_text().splitlines()] == ids
    assert "| accuracy |" in resumed.stdout
