"""`af2 train` runs as a user starts them: data checked before the model loads, 2 real processes (torchrun, gloo)
against one, seeded adapters, LoRA defaults, continuing an adapter, resuming after a real kill -9 during a save,
and freezing without hooks. The commands in `trainer/README.md` are the ones run here.

Tiny random model and character tokenizer from `test_trainer.py`; a few steps each.
"""

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from test_trainer import _args, _cli, _losses, audio_files, tiny_model, tiny_processor  # noqa: F401  (fixtures)

from transformers_af2.trainer import (
    AudioFlamingo2DataCollator,
    AudioFlamingo2Trainer,
    check_training_data,
    continue_lora,
    from_hf_dataset,
    last_complete_checkpoint,
    set_trainable_parameters,
)
from transformers_af2.trainer.lora import adapter_config_of

SRC = Path(__file__).resolve().parents[1] / "src"
README = SRC / "transformers_af2" / "trainer" / "README.md"

# The commands of trainer/README.md, run here as written there, in a folder holding `tiny/` (a model and its
# processor) and `train.jsonl`.
QUIET = "--logging-steps 1 --report-to none --disable-tqdm true"
CPU_RUN = (
    "af2 train --model tiny --train-file train.jsonl --output-dir runs/one --use-cpu true --stage pretrain "
    "--per-device-train-batch-size 2 --max-steps 3 --train-sampling-strategy sequential --learning-rate 1e-2 "
    f"--seed 3 --save-strategy no {QUIET}"
)
TWO_PROCESSES = (
    "torchrun --standalone --nproc-per-node 2 -m transformers_af2.trainer.cli train --model tiny "
    "--train-file train.jsonl --output-dir runs/two --stage pretrain --per-device-train-batch-size 1 --max-steps 3 "
    f"--train-sampling-strategy sequential --learning-rate 1e-2 --seed 3 --save-strategy no {QUIET}"
)
LONG_RUN = (
    "python -m transformers_af2.trainer.cli train --model tiny --train-file train.jsonl --output-dir runs/full "
    f"--use-cpu true --stage full --max-steps 40 --save-steps 1 --learning-rate 1e-3 {QUIET}"
)
RESUME = (
    "af2 train --model tiny --train-file train.jsonl --output-dir runs/full --use-cpu true --stage full "
    "--max-steps {step} --learning-rate 1e-3 --save-strategy no --resume-from-checkpoint last " + QUIET
)
LORA_RUN = (
    "af2 train --model tiny --train-file train.jsonl --output-dir runs/lora --use-cpu true --lora language_model "
    f"--lora-r 2 --seed 7 --max-steps 2 --learning-rate 1e-2 --save-strategy no {QUIET}"
)
CONTINUE_ADAPTER = (
    "af2 train --model runs/lora --train-file train.jsonl --output-dir runs/lora-more --use-cpu true "
    f"--max-steps 1 --learning-rate 1e-2 --save-strategy no {QUIET}"
)
BAD_ROWS = (
    "af2 train --model tiny --train-file messy.jsonl --output-dir runs/messy --use-cpu true --max-length 40 "
    f"--per-device-train-batch-size 3 --max-steps 2 --save-strategy no {QUIET} --skip-bad-rows"
)


def _run(command: str, **replace) -> int:
    """Runs an `af2 train ...` command line in this process (the parser of the `af2` executable)."""
    argv = shlex.split(command)
    assert argv[:2] == ["af2", "train"], command
    for old, new in replace.items():
        argv[argv.index(old) + 1] = new
    return _cli(argv[1:])


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, tiny_processor, audio_files):  # noqa: F811
    """A folder as a user has it: `tiny/` (model + processor) and `train.jsonl` (6 good rows, audio beside it)."""
    root = tmp_path_factory.mktemp("af2_train")
    tiny_model(tiny_processor, seed=1, gates=0.5).save_pretrained(root / "tiny")
    tiny_processor.save_pretrained(root / "tiny")
    names = ["1s", "12s", "3s", "1s", "25s", "3s"]
    rows = [
        {"audio": audio_files[name], "prompt": f"question {i}?", "answer": f"answer number {i}"}
        for i, name in enumerate(names)
    ]
    (root / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return root


def _env():
    env = dict(
        os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])
    )
    env.pop("WORLD_SIZE", None)
    return env


def _logged_losses(output_dir):
    state = json.loads((Path(output_dir) / "trainer_state.json").read_text())
    return {entry["step"]: entry["loss"] for entry in state["log_history"] if "loss" in entry}


# ---------------------------------------------------------------------------------------------------------------
# Data checked before the model loads
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def messy_file(workdir, audio_files):  # noqa: F811
    """2 good rows, 1 empty answer (kept), and 4 bad: no answer, missing file, corrupt file, answer cut by max_length."""
    corrupt = workdir / "corrupt.wav"
    corrupt.write_bytes(b"RIFF\x00\x00\x00\x00WAVEnot really audio")
    rows = [
        {"audio": audio_files["1s"], "prompt": "good one", "answer": "fine"},
        {"audio": audio_files["3s"], "prompt": "no answer field"},
        {"audio": str(workdir / "missing.wav"), "prompt": "where", "answer": "nowhere"},
        {"audio": str(corrupt), "prompt": "broken", "answer": "noise"},
        {"audio": audio_files["12s"], "prompt": "x" * 80, "answer": "cut"},
        {"audio": audio_files["1s"], "prompt": "empty", "answer": ""},
        {"audio": audio_files["3s"], "prompt": "good two", "answer": "also fine"},
    ]
    path = workdir / "messy.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_bad_rows_stop_the_run_before_the_model_loads(workdir, messy_file, tmp_path, monkeypatch):
    # A model folder without weights: the run must fail on the data, before it ever tries to load the model.
    (tmp_path / "no_weights").mkdir()
    for name in os.listdir(workdir / "tiny"):
        if not name.endswith(".safetensors"):
            (tmp_path / "no_weights" / name).write_bytes((workdir / "tiny" / name).read_bytes())
    monkeypatch.chdir(workdir)
    without_skip = BAD_ROWS.replace(" --skip-bad-rows", "")
    with pytest.raises(ValueError) as raised:
        _run(without_skip, **{"--model": str(tmp_path / "no_weights"), "--output-dir": str(tmp_path / "run")})
    message = str(raised.value)
    print(message)
    assert "7 rows, 3 kept, 4 bad" in message
    assert "row 1 (" in message and "'answer' is missing" in message
    assert "row 2 (" in message and "no such audio file" in message
    assert "row 3 (" in message and "cannot decode" in message
    assert "row 4 (" in message and "over max_length=40" in message
    assert "1 with an empty answer" in message and "1 longer than max_length=40" in message
    assert "--skip-bad-rows" in message
    assert not (tmp_path / "run").exists()


def test_skip_bad_rows_drops_them_and_lists_each(workdir, messy_file, capsys, monkeypatch):
    monkeypatch.chdir(workdir)
    assert _run(BAD_ROWS) == 0
    out = workdir / "runs" / "messy"
    dropped = [json.loads(line) for line in (out / "dropped_rows.jsonl").read_text().splitlines()]
    assert [(entry["row"], entry["kind"]) for entry in dropped] == [
        (1, "missing field"),
        (2, "unreadable audio"),
        (3, "unreadable audio"),
        (4, "no trainable label"),
    ]
    assert dropped[1]["audio"].endswith("missing.wav") and dropped[2]["audio"].endswith("corrupt.wav")
    assert "7 rows, 3 kept, 4 bad" in capsys.readouterr().err
    losses = _logged_losses(out)
    assert len(losses) == 2 and all(loss > 0.5 for loss in losses.values()), losses  # a real loss, never 0


def test_missing_answer_is_not_the_text_none(workdir, tiny_processor):  # noqa: F811
    """The reader keeps a missing field missing (it trained on the literal "None" before)."""
    from transformers_af2.trainer import load_training_data

    path = workdir / "no_answer.jsonl"
    path.write_text(
        json.dumps({"audio": "x.wav", "prompt": "p", "answer": "a"})
        + "\n"
        + json.dumps({"audio": "y.wav", "prompt": "q"})
        + "\n"
    )
    dataset = load_training_data(path, compute_lengths=False)
    assert dataset["answer"] == ["a", None]
    collator = AudioFlamingo2DataCollator(tiny_processor)
    kept, report = check_training_data(dataset, collator, skip_bad_rows=True)
    assert len(kept) == 0 and [entry["kind"] for entry in report.dropped] == ["unreadable audio", "missing field"]


def test_batch_without_trainable_label_raises_not_loss_zero(tiny_processor, audio_files, tmp_path):  # noqa: F811
    """Every answer cut by max_length: the label rule keeps nothing. The run stops instead of logging loss 0."""
    rows = [{"audio": audio_files["1s"], "prompt": "a long question " * 3, "answer": "yes"}] * 2
    model = tiny_model(tiny_processor, gates=0.5)
    trainer = AudioFlamingo2Trainer(
        model=model,
        args=_args(tmp_path, max_steps=1),
        trainable=set_trainable_parameters(model, "pretrain"),
        data_collator=AudioFlamingo2DataCollator(tiny_processor, max_length=12),
        train_dataset=from_hf_dataset(datasets.Dataset.from_list(rows)),
    )
    with pytest.raises(ValueError, match="no trainable label"):
        trainer.train()
    assert _losses(trainer) == []


# ---------------------------------------------------------------------------------------------------------------
# Several processes: torchrun with 2 CPU processes (gloo DDP) = 1 process with the same global batch
# ---------------------------------------------------------------------------------------------------------------
def test_two_processes_match_one_process(workdir, monkeypatch):
    """torchrun, 2 CPU processes of 1 sample each (af2 train puts them on gloo DDP by itself) = 1 process of 2."""
    command = shlex.split(TWO_PROCESSES)
    command[0] = str(Path(sys.executable).parent / "torchrun")
    done = subprocess.run(command, cwd=workdir, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    monkeypatch.chdir(workdir)
    assert _run(CPU_RUN) == 0
    one, two = workdir / "runs" / "one", workdir / "runs" / "two"
    one_losses, two_losses = _logged_losses(one), _logged_losses(two)
    print(f"1 process: {one_losses}\n2 processes: {two_losses}")
    assert sorted(two_losses) == [1, 2, 3]
    for step in (1, 2, 3):
        assert abs(two_losses[step] - one_losses[step]) <= 1e-4, (step, one_losses, two_losses)
    one_weights, two_weights = load_file(one / "model.safetensors"), load_file(two / "model.safetensors")
    assert max((one_weights[k] - two_weights[k]).abs().max().item() for k in one_weights) <= 1e-5
    assert one_losses[3] != one_losses[1]  # the weights moved between steps


def test_accelerate_launch_that_starts_one_of_several_processes_is_refused_before_loading(tmp_path):
    """`accelerate launch --num_processes 2` on a machine without GPUs starts 1 process (no --multi_gpu): refused in
    one line naming the launch to use, before the data or the model is read (both paths here do not exist: reading
    either would have been the error)."""
    command = [str(Path(sys.executable).parent / "accelerate"), "launch", "--num_processes", "2", "--cpu"]
    command += ["-m", "transformers_af2.trainer.cli", "train", "--model", str(tmp_path / "no-model")]
    command += ["--train-file", str(tmp_path / "no-data.jsonl"), "--output-dir", str(tmp_path / "out")]
    done = subprocess.run(command, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
    ours = [line for line in done.stderr.splitlines() if line.startswith("af2 train: error:")]
    assert done.returncode != 0 and len(ours) == 1, done.stderr[-3000:]
    assert "accelerate started 1 process" in ours[0] and "--multi_gpu --num_processes N" in ours[0]
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------------------
# LoRA: seeded, adapters only by default, continued, portable base reference
# ---------------------------------------------------------------------------------------------------------------
def test_seeded_lora_runs_are_bit_identical_and_train_adapters_only(workdir, monkeypatch):
    monkeypatch.chdir(workdir)  # the model given as a relative path, as typed in a shell

    def run(name, seed):
        assert _run(LORA_RUN, **{"--output-dir": f"runs/{name}", "--seed": str(seed)}) == 0
        return workdir / "runs" / name

    first, second, other_seed = run("lora", 7), run("lora-again", 7), run("lora-seed8", 8)
    assert (first / "adapter_model.safetensors").read_bytes() == (second / "adapter_model.safetensors").read_bytes()
    assert (first / "adapter_model.safetensors").read_bytes() != (
        other_seed / "adapter_model.safetensors"
    ).read_bytes()

    config = json.loads((first / "adapter_config.json").read_text())
    assert config["modules_to_save"] is None and config.get("trainable_token_indices") is None
    saved = load_file(first / "adapter_model.safetensors")
    assert saved and all(".lora_A." in name or ".lora_B." in name for name in saved), sorted(saved)[:5]
    assert config["base_model_name_or_path"] == str(workdir / "tiny")  # absolute, though typed relative


def test_adapter_folder_as_model_is_continued(workdir, tmp_path, monkeypatch):
    monkeypatch.chdir(workdir)
    start = workdir / "runs" / "lora"
    if not (start / "adapter_model.safetensors").is_file():  # this test run on its own
        assert _run(LORA_RUN) == 0
    initial = load_file(start / "adapter_model.safetensors")

    # lr 0: the continued adapter is the saved one, not a new one drawn at random.
    assert _run(CONTINUE_ADAPTER, **{"--output-dir": "runs/lora-same", "--learning-rate": "0"}) == 0
    kept = load_file(workdir / "runs" / "lora-same" / "adapter_model.safetensors")
    assert kept.keys() == initial.keys() and all(torch.equal(kept[k], initial[k]) for k in kept)
    assert adapter_config_of(workdir / "runs" / "lora-same")["base_model_name_or_path"] == str(workdir / "tiny")

    # As in the README: the same adapter trains on.
    assert _run(CONTINUE_ADAPTER) == 0
    moved = load_file(workdir / "runs" / "lora-more" / "adapter_model.safetensors")
    assert moved.keys() == initial.keys()
    delta = max((moved[k] - initial[k]).abs().max().item() for k in moved)
    assert 0 < delta < 0.1, delta
    with pytest.raises(ValueError, match="other targets"):
        _run(CONTINUE_ADAPTER + " --lora audio_transformer")

    # The adapter names its base absolutely: it loads, trainable, from any folder.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    model = continue_lora(start)
    trainable = {name for name, param in model.named_parameters() if param.requires_grad}
    assert trainable and all("lora_" in name for name in trainable)


# ---------------------------------------------------------------------------------------------------------------
# Resume from the newest complete checkpoint after kill -9 during a save
# ---------------------------------------------------------------------------------------------------------------
def _kill_during_a_save(command, cwd, out, deadline_s=180):
    """Starts the run, SIGKILLs it while it writes checkpoint-N (N >= 2, so one complete checkpoint is before it):
    once the weights are written, before the trainer state. Returns N, or None when the kill landed after that
    save finished."""
    process = subprocess.Popen(command, cwd=cwd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + deadline_s
        while time.monotonic() < deadline and process.poll() is None:
            if out.is_dir():
                steps = [int(n.split("-")[1]) for n in os.listdir(out) if n.startswith("checkpoint-")]
                newest = out / f"checkpoint-{max(steps, default=0)}"
                if (
                    len(steps) >= 2
                    and (newest / "model.safetensors").exists()
                    and not (newest / "trainer_state.json").exists()
                ):
                    process.send_signal(signal.SIGKILL)
                    process.wait()
                    return None if (newest / "trainer_state.json").exists() else max(steps)
            time.sleep(0.0005)
        raise AssertionError(f"the run never reached a second save: {process.stderr.read()[-2000:]!r}")
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_resume_last_skips_a_checkpoint_killed_while_saving(workdir, caplog, monkeypatch):
    command = shlex.split(LONG_RUN)
    command[0] = sys.executable
    out = workdir / "runs" / "full"
    for _attempt in range(5):
        shutil.rmtree(out, ignore_errors=True)
        killed_at = _kill_during_a_save(command, workdir, out)
        if killed_at is not None:
            break
    else:
        pytest.fail("5 runs in a row finished their save before SIGKILL arrived")
    print(f"killed while saving checkpoint-{killed_at}: {sorted(os.listdir(out / f'checkpoint-{killed_at}'))}")
    assert last_complete_checkpoint(out) == str(out / f"checkpoint-{killed_at - 1}")

    monkeypatch.chdir(workdir)
    assert _run(RESUME.format(step=killed_at + 1)) == 0
    assert f"checkpoint-{killed_at}: incomplete checkpoint" in caplog.text
    losses = _logged_losses(out)
    assert sorted(losses) == list(range(1, killed_at + 2))  # the steps of checkpoint-(N-1), then N and N+1 again


def test_trainer_resume_true_skips_an_incomplete_checkpoint(tiny_processor, audio_files, tmp_path, caplog):  # noqa: F811
    """The library path (`trainer.train(resume_from_checkpoint=True)`), on a folder as a killed save leaves it."""
    rows = [{"audio": audio_files["1s"], "prompt": f"q{i}", "answer": f"answer {i}"} for i in range(3)]
    dataset = from_hf_dataset(datasets.Dataset.from_list(rows))

    def trainer(max_steps, seed):
        model = tiny_model(tiny_processor, seed=seed, gates=0.5)
        return AudioFlamingo2Trainer(
            model=model,
            args=_args(
                tmp_path, per_device_train_batch_size=1, max_steps=max_steps, save_strategy="steps", save_steps=1
            ),
            trainable=set_trainable_parameters(model, "pretrain"),
            data_collator=AudioFlamingo2DataCollator(tiny_processor),
            train_dataset=dataset,
        )

    first = trainer(2, seed=4)
    first.train()
    out = tmp_path / "out"
    (out / "checkpoint-2" / "trainer_state.json").unlink()  # what a kill between the weights and the state leaves
    # Another initialisation: only a real resume from checkpoint-1 reproduces the first run's step 2.
    resumed = trainer(3, seed=5)
    resumed.train(resume_from_checkpoint=True)
    assert "checkpoint-2: incomplete checkpoint" in caplog.text
    before = {entry["step"]: entry["loss"] for entry in first.state.log_history if "loss" in entry}
    after = {entry["step"]: entry["loss"] for entry in resumed.state.log_history if "loss" in entry}
    assert sorted(after) == [1, 2, 3] and after[1] == before[1]
    assert abs(after[2] - before[2]) <= 1e-5, (before, after)


def test_readme_shows_the_commands_run_here():
    text = " ".join(README.read_text().replace("\\\n", " ").split())
    for command in (CPU_RUN, TWO_PROCESSES, LONG_RUN, RESUME.format(step=8), LORA_RUN, CONTINUE_ADAPTER, BAD_ROWS):
        assert command in text, command


# ---------------------------------------------------------------------------------------------------------------
# Freezing without hooks or attributes on tensors (they do not survive FSDP's re-created parameters)
# ---------------------------------------------------------------------------------------------------------------
def test_freezing_needs_no_hooks_and_survives_recreated_parameters(tiny_processor, audio_files, tmp_path):  # noqa: F811
    rows = [
        {"audio": audio_files["1s"], "prompt": "what?", "answer": "a dog"},
        {"audio": audio_files["12s"], "prompt": "and?", "answer": "rain"},
    ]
    model = tiny_model(tiny_processor, gates=0.5)
    summary = set_trainable_parameters(model, "pretrain")
    tower = model.model.audio_tower
    embeddings = model.get_input_embeddings()
    assert not tower._forward_pre_hooks and not tower._forward_hooks
    assert embeddings.weight._backward_hooks is None and not vars(embeddings.weight)
    assert not [name for name in vars(tower) if name.startswith("_af2")]

    # What FSDP does to a parameter: a new tensor object in its place (tied head re-tied to it).
    fresh = torch.nn.Parameter(embeddings.weight.detach().clone(), requires_grad=True)
    embeddings.weight = fresh
    model.lm_head.weight = fresh
    before = fresh.detach().clone()
    stats = tower.batch_norm.running_mean.clone()
    trainer = AudioFlamingo2Trainer(
        model=model,
        args=_args(tmp_path, max_steps=2, weight_decay=0.1),
        trainable=summary,
        data_collator=AudioFlamingo2DataCollator(tiny_processor),
        train_dataset=from_hf_dataset(datasets.Dataset.from_list(rows)),
    )
    trainer.train()
    moved = (before != model.get_input_embeddings().weight.detach()).any(dim=1).nonzero().flatten().tolist()
    assert moved == sorted(summary.embedding_rows)
    assert torch.equal(tower.batch_norm.running_mean, stats)  # the frozen tower ran in eval mode
    assert tower.training is False and model.model.audio_transformer.training is True


def test_evaluate_and_predict_hand_only_logits_to_compute_metrics(tiny_processor, audio_files, tmp_path):  # noqa: F811
    rows = [
        {"audio": audio_files["1s"], "prompt": "what?", "answer": "a dog"},
        {"audio": audio_files["3s"], "prompt": "and?", "answer": "rain"},
    ]
    dataset = from_hf_dataset(datasets.Dataset.from_list(rows))
    seen = []

    def compute_metrics(prediction):
        seen.append(prediction.predictions)
        assert isinstance(prediction.predictions, np.ndarray), type(prediction.predictions)
        return {"label_tokens": float((prediction.label_ids != -100).sum())}

    model = tiny_model(tiny_processor, gates=0.5)
    trainer = AudioFlamingo2Trainer(
        model=model,
        args=_args(tmp_path, per_device_eval_batch_size=2, prediction_loss_only=False),
        data_collator=AudioFlamingo2DataCollator(tiny_processor),
        eval_dataset=dataset,
        compute_metrics=compute_metrics,
    )
    metrics = trainer.evaluate()
    assert metrics["eval_label_tokens"] == len("a dog") + 2 + len("rain") + 2
    output = trainer.predict(dataset)
    assert isinstance(output.predictions, np.ndarray)
    assert output.predictions.shape[0] == 2 and output.predictions.shape[-1] == len(tiny_processor.tokenizer)
    assert len(seen) == 2
