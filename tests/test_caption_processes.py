"""`af2 caption` as real processes: a run killed with SIGKILL mid-way and resumed has every row exactly once; two
processes under torchrun (gloo, CPU), resuming a one-process run, give the rows of a one-process run. Each runs with
AF2 (the converted parity fixture) and with a tiny random Audio Flamingo 3 checkpoint saved to a folder."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from conftest import free_port
from families_fixtures import save_tiny_checkpoint

from transformers_af2.commands import main

REPO_ROOT = Path(__file__).resolve().parents[1]
PROMPT = "Describe the audio."
NUM_CLIPS = 200


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
    # The child processes import this checkout, whatever is installed.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT / "src"), env.get("PYTHONPATH")) if p)
    return env


def _caption_args(model_repo, inputs, output, *extra):
    return ["caption", *map(str, inputs), "--model", str(model_repo), "--prompt", PROMPT, "-o", str(output),
            "--max-new-tokens", "2", "--device", "cpu", *extra]  # fmt: skip


@pytest.fixture(scope="module", params=["af2", "af3"])
def model_repo(request, converted_fixture, tmp_path_factory):
    """A checkpoint folder of each family `af2 caption` detects from its config.json."""
    if request.param == "af2":
        return converted_fixture.repo
    return save_tiny_checkpoint(tmp_path_factory.mktemp("af3"), "audioflamingo3")


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    """A few hundred short noise clips (0.5-1.5 s, one window each) in nested folders."""
    folder = tmp_path_factory.mktemp("clips")
    rng = np.random.default_rng(0)
    for index in range(NUM_CLIPS):
        sub = folder / f"part{index % 4}"
        sub.mkdir(exist_ok=True)
        samples = int(rng.uniform(0.5, 1.5) * 16000)
        sf.write(sub / f"clip{index:03d}.wav", (rng.standard_normal(samples) * 0.1).astype("float32"), 16000)
    return folder


def _complete_lines(folder: Path) -> int:
    return sum(path.read_bytes().count(b"\n") for path in folder.glob("rows-*.jsonl")) if folder.is_dir() else 0


def test_killed_run_resumes_with_every_row_once(model_repo, clip_folder, tmp_path, capsys):
    out = tmp_path / "captions.jsonl"
    argv = _caption_args(model_repo, [clip_folder], out, "--batch-size", "8", "--lookahead", "8")
    process = subprocess.Popen([sys.executable, "-m", "transformers_af2", *argv], env=_env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    parts = Path(f"{out}.parts")
    deadline = time.monotonic() + 300
    try:
        while _complete_lines(parts) < 24 and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert process.poll() is None, f"the run ended before it could be killed: {process.stderr.read()[-2000:]}"
        process.send_signal(signal.SIGKILL)
    finally:
        process.kill()
        process.wait()
        process.stderr.close()
    assert process.returncode == -signal.SIGKILL
    kept = _complete_lines(parts)
    assert 24 <= kept < NUM_CLIPS
    assert not out.exists()  # nothing merged yet

    # The same command again.
    assert main(argv) == 0
    assert capsys.readouterr().out.strip() == (
        f"af2 caption: {NUM_CLIPS - kept} done, 0 failed, {kept} skipped as already done; {NUM_CLIPS} rows in {out}"
    )
    text = out.read_text()
    assert text.endswith("\n")
    rows = [json.loads(line) for line in text.splitlines()]
    expected = sorted(str(p) for p in clip_folder.rglob("*.wav"))
    assert [row["path"] for row in rows] == expected  # every clip once, in the input's order
    assert len({row["id"] for row in rows}) == NUM_CLIPS
    assert all(row["tokens"] == 2 and row["windows"] == 1 and row["answer"] for row in rows)
    assert sorted(p.name for p in parts.iterdir()) == ["errors-merged.jsonl", "rows-merged.jsonl"]


def test_two_processes_resume_a_one_process_run_and_equal_it(model_repo, clip_folder, tmp_path, capsys):
    clips = sorted(clip_folder.rglob("*.wav"))[:24]
    all_list, first_list = tmp_path / "all.txt", tmp_path / "first.txt"
    all_list.write_text("".join(f"{p}\n" for p in clips))
    first_list.write_text("".join(f"{p}\n" for p in clips[:8]))
    one, two = tmp_path / "one.jsonl", tmp_path / "two.jsonl"
    assert main(_caption_args(model_repo, [all_list], one, "--num-workers", "0")) == 0
    assert main(_caption_args(model_repo, [first_list], two, "--num-workers", "0")) == 0
    capsys.readouterr()

    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
                "--master-port", str(free_port()), "-m", "transformers_af2"]  # fmt: skip
    result = subprocess.run(
        [
            *launcher,
            *_caption_args(model_repo, [all_list], two, "--batch-size", "4", "--num-workers", "1"),
        ],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    # Rank 0 reports the counts of both processes: the 16 new rows split between them, none twice.
    assert result.stdout.strip().splitlines()[-1] == (
        f"af2 caption: 16 done, 0 failed, 8 skipped as already done; 24 rows in {two}"
    )
    assert two.read_text() == one.read_text()
