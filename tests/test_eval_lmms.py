"""
AF2 inside lmms-eval: the real `lmms-eval` command finds `--model af2` through the `lmms_eval.models` entry point and
runs a tiny local audio task; its answers are AF2's and its score is what they earn.
"""

import glob
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

pytest.importorskip("lmms_eval", reason="the lmms-eval plugin needs the [lmms-eval] extra")

from transformers_af2.evaluation import BatchedAnswerGenerator  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]

TASK_YAML = """\
task: af2_tiny
dataset_path: json
dataset_kwargs:
  data_files:
    test: {docs}
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_audio
doc_to_text: !function utils.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: 4
  temperature: 0
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
    ignore_case: true
    ignore_punctuation: true
metadata:
  version: 0.0
"""

# What lmms-eval's own audio tasks hand the model: a datasets Audio value with "array" and "sampling_rate".
TASK_UTILS = """\
import soundfile as sf


def doc_to_audio(doc):
    array, rate = sf.read(doc["audio_path"], dtype="float32")
    return [{"array": array, "sampling_rate": rate}]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]
"""


def entry_point_dir(root: Path) -> Path:
    """A distribution declaring the entry point exactly as pyproject.toml does, for an uninstalled checkout."""
    info = root / "af2_lmms_entry_point-0.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: af2-lmms-entry-point\nVersion: 0.0\n")
    (info / "entry_points.txt").write_text("[lmms_eval.models]\naf2 = transformers_af2.lmms_eval_af2:model_manifest\n")
    return root


def _lmms_eval_command() -> str:
    command = shutil.which("lmms-eval", path=str(Path(sys.executable).parent)) or shutil.which("lmms-eval")
    assert command is not None, "lmms_eval is importable but its lmms-eval command is not installed"
    return command


def _lmms_env(tmp_path):
    python_path = [str(REPO_ROOT / "src"), str(entry_point_dir(tmp_path / "entry_points"))]
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(python_path + [os.environ.get("PYTHONPATH", "")]),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_DATASETS_CACHE": str(tmp_path / "datasets_cache"),
    }


def _finished_run(output: Path, task: str, docs: int) -> tuple[dict, list[dict]]:
    """The results and samples of a run that really scored `task`: lmms-eval exits 0 even when a task fails, so
    success is read from its files."""
    results_files = glob.glob(str(output / "*" / "*_results.json"))
    samples_files = glob.glob(str(output / "*" / f"*_samples_{task}.jsonl"))
    assert len(results_files) == 1 and len(samples_files) == 1, f"lmms-eval wrote no results for {task}"
    results = json.loads(Path(results_files[0]).read_text())["results"]
    samples = sorted(map(json.loads, Path(samples_files[0]).read_text().splitlines()), key=lambda s: s["doc_id"])
    assert task in results and len(samples) == docs, f"{task} did not score every doc: {results}"
    return results[task], samples


def _readme_lmms_command() -> list[str]:
    """The lmms-eval command of the README, as printed (continuation lines joined)."""
    readme = (REPO_ROOT / "README.md").read_text()
    block = re.search(r"```bash\n(lmms-eval --model af2 .*?)\n```", readme, re.S)
    assert block is not None, "the README's lmms-eval example is gone"
    return shlex.split(block.group(1).replace("\\\n", " "))


def _write_tiny_task(task_dir: Path, clips: list[str], question: str, targets: list[str]) -> None:
    task_dir.mkdir(exist_ok=True)
    with open(task_dir / "docs.jsonl", "w") as handle:
        for index, (clip, target) in enumerate(zip(clips, targets)):
            handle.write(json.dumps({"id": index, "audio_path": clip, "question": question, "answer": target}) + "\n")
    (task_dir / "af2_tiny.yaml").write_text(TASK_YAML.format(docs=task_dir / "docs.jsonl"))
    (task_dir / "utils.py").write_text(TASK_UTILS)


def _tones(folder: Path, frequencies) -> list[str]:
    folder.mkdir(exist_ok=True)
    clips = []
    for index, frequency in enumerate(frequencies):
        rate = 22050
        t = np.arange(int(1.5 * rate)) / rate
        path = folder / f"clip{index}.wav"
        sf.write(path, (0.4 * np.sin(2 * np.pi * frequency * t)).astype(np.float32), rate)
        clips.append(str(path))
    return clips


def test_the_readme_command_runs_as_printed(converted_fixture, tmp_path):
    """
    The README's command with its every option as printed (model_args batch_size=8 beside lmms-eval's own
    --batch_size, dtype, --log_samples); only the model path, the device (no GPU here), the tasks (no hub here, so a
    local task) and the output folder are this machine's.
    """
    argv = _readme_lmms_command()
    assert argv[:3] == ["lmms-eval", "--model", "af2"]
    model_args = dict(pair.split("=", 1) for pair in argv[argv.index("--model_args") + 1].split(","))
    assert model_args["batch_size"] == "8"  # the case that failed: batch_size in --model_args too
    model_args.update(pretrained=str(converted_fixture.repo), device="cpu")
    argv[argv.index("--model_args") + 1] = ",".join(f"{k}={v}" for k, v in model_args.items())
    clips = _tones(tmp_path / "task", (300, 1200, 500))
    _write_tiny_task(tmp_path / "task", clips, "Is there a tone in this audio?", ["x", "y", "z"])
    argv[argv.index("--tasks") + 1] = "af2_tiny"
    argv[argv.index("--output_path") + 1] = str(tmp_path / "out")
    argv = [_lmms_eval_command(), *argv[1:], "--include_path", str(tmp_path / "task")]
    result = subprocess.run(argv, env=_lmms_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "multiple values" not in result.stderr
    scores, samples = _finished_run(tmp_path / "out", "af2_tiny", 3)
    assert all(isinstance(s["filtered_resps"], str) for s in samples)
    assert scores["exact_match,none"] == 0.0  # the targets are words the tiny model cannot answer alone


def test_lmms_eval_runs_af2_on_a_local_audio_task(loaded, converted_fixture, tmp_path):
    _, model, processor = loaded
    command = _lmms_eval_command()
    task_dir = tmp_path / "task"
    clips = _tones(task_dir, (300, 1200, 500))
    question = "Is there a tone in this audio?"
    # AF2's own answers with the task's settings (greedy, 4 tokens): the reference for lmms-eval's.
    expected = BatchedAnswerGenerator(model, processor, {"do_sample": False, "num_beams": 1, "max_new_tokens": 4})(
        clips, [question] * len(clips)
    )
    # Targets: AF2's answer for the first two clips, a wrong one for the third -> exact_match 2/3.
    _write_tiny_task(task_dir, clips, question, [expected[0], expected[1], expected[2] + " never"])
    env = _lmms_env(tmp_path)
    result = subprocess.run(
        [command, "--model", "af2", "--model_args", f"pretrained={converted_fixture.repo},device=cpu"]
        + ["--tasks", "af2_tiny", "--include_path", str(task_dir), "--batch_size", "2"]
        + ["--output_path", str(tmp_path / "out"), "--log_samples"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    scores, samples = _finished_run(tmp_path / "out", "af2_tiny", 3)
    assert [s["filtered_resps"] for s in samples] == expected
    assert [s["input"] for s in samples] == [question] * 3
    assert scores["exact_match,none"] == pytest.approx(2 / 3)


def test_unknown_model_args_are_refused(converted_fixture):
    from transformers_af2.lmms_eval_af2 import AudioFlamingo2LmmsEval, model_manifest

    assert model_manifest().model_id == "af2"
    with pytest.raises(ValueError, match=r"unknown argument\(s\) \['temperature'\]"):
        AudioFlamingo2LmmsEval(pretrained=str(converted_fixture.repo), device="cpu", temperature="0.7")


def test_fast_and_quantization_model_args_load_as_the_commands_do(converted_fixture):
    """`fast` and `quantization` in --model_args go through the commands' `model_loading_options`: `fast=true` takes
    this device's `--fast` dtype, `quantization=int8` quantizes the language model's linears and keeps the audio
    side plain, and a wrong value is refused naming it."""
    import importlib.util

    import torch

    from transformers_af2.lmms_eval_af2 import AudioFlamingo2LmmsEval
    from transformers_af2.presets import fast_settings

    fast = AudioFlamingo2LmmsEval(pretrained=str(converted_fixture.repo), device="cpu", fast="true")
    assert fast.model.dtype == getattr(torch, fast_settings("cpu").dtype)
    with pytest.raises(ValueError, match=r"fast='maybe'; write fast=true or fast=false"):
        AudioFlamingo2LmmsEval(pretrained=str(converted_fixture.repo), device="cpu", fast="maybe")
    with pytest.raises(ValueError, match=r"--quantization 'int3' is not supported"):
        AudioFlamingo2LmmsEval(pretrained=str(converted_fixture.repo), device="cpu", quantization="int3")
    if importlib.util.find_spec("torchao") is None:
        pytest.skip("torchao is not installed")
    quantized = AudioFlamingo2LmmsEval(pretrained=str(converted_fixture.repo), device="cpu", quantization="int8")
    inner = quantized.model.model
    layer = inner.language_model.layers[0]
    assert type(layer.self_attn.q_proj.weight) is not torch.nn.Parameter  # a torchao tensor: quantized
    tower_linears = [m for m in inner.audio_tower.modules() if isinstance(m, torch.nn.Linear)]
    assert tower_linears and all(type(m.weight) is torch.nn.Parameter for m in tower_linears)
