"""
af2 eval end to end: each task's public file format written by the test with synthesised audio, read, prompted,
answered by the converted parity fixture, scored; resuming after an interrupted run; bad inputs.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from transformers_af2.evaluation import (
    GENERATION_SETTINGS,
    TASKS,
    BatchedAnswerGenerator,
    CaptionEngine,
    run_evaluation,
    score_items,
)
from transformers_af2.evaluation.runner import PREDICTIONS

REPO_ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {**GENERATION_SETTINGS, "max_new_tokens": 4}  # the original's settings, fewer tokens to stay fast


def tone(path: Path, frequency: float, seconds: float = 1.2, rate: int = 16000) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(seconds * rate)) / rate
    sf.write(path, (0.4 * np.sin(2 * np.pi * frequency * t)).astype(np.float32), rate)
    return path


def write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    import csv

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


# Each builder writes a mini set in the benchmark's public layout and returns (data, audio_root, expected ids).


def build_mmau(root: Path):
    entries = []
    for index, (answer, task) in enumerate([("Man", "sound"), ("Robot", "music"), ("Child", "speech")]):
        tone(root / "test-mini-audios" / f"q{index}.wav", 200 + 150 * index)
        entries.append(
            {
                "id": f"q{index}",
                "audio_id": f"./test-mini-audios/q{index}.wav",
                "question": "Based on the given audio, identify the source of the sound.",
                "choices": ["Man", "Woman", "Child", "Robot"],
                "answer": answer,
                "task": task,
                "difficulty": "easy",
                "sub-category": "Acoustic Source Inference",
            }
        )
    (root / "mmau-test-mini.json").write_text(json.dumps(entries))
    return root / "mmau-test-mini.json", None, ["q0", "q1", "q2"]


def build_clotho_aqa(root: Path):
    tone(root / "audio_files" / "rain.wav", 300)
    tone(root / "audio_files" / "birds.wav", 900)
    rows = [["rain.wav", "Is it raining?", "yes", "yes"]] * 3
    rows += [["birds.wav", "How many birds sing?", answer, "maybe"] for answer in ("two", "2", "three")]
    data = write_csv(root / "clotho_aqa_test.csv", ["file_name", "QuestionText", "answer", "confidence"], rows)
    return data, None, ["rain.wav|Is it raining?", "birds.wav|How many birds sing?"]


def build_clotho_caption(root: Path):
    tone(root / "evaluation" / "a.wav", 250)
    tone(root / "evaluation" / "b.wav", 700)
    header = ["file_name"] + [f"caption_{i}" for i in range(1, 6)]
    rows = [["a.wav"] + [f"rain falls on a roof {i}" for i in range(5)], ["b.wav"] + ["a bird sings loudly"] * 5]
    return write_csv(root / "clotho_captions_evaluation.csv", header, rows), None, ["a.wav", "b.wav"]


def build_audiocaps(root: Path):
    tone(root / "audio" / "Yabc.wav", 250)
    tone(root / "audio" / "xyz.flac", 600)
    rows = [[1, "abc", 30, "a dog barks"], [2, "xyz", 0, "an engine idles"], [3, "abc", 30, "a dog is barking"]]
    data = write_csv(root / "test.csv", ["audiocap_id", "youtube_id", "start_time", "caption"], rows)
    return data, root / "audio", ["abc", "xyz"]


def build_gtzan(root: Path):
    tone(root / "genres" / "blues" / "blues.00000.wav", 220)
    tone(root / "genres" / "jazz" / "jazz.00000.wav", 440)
    return root / "genres", None, ["blues/blues.00000.wav", "jazz/jazz.00000.wav"]


def build_us8k(root: Path):
    tone(root / "audio" / "fold1" / "100-1-0-0.wav", 500)
    tone(root / "audio" / "fold2" / "101-3-0-0.wav", 800)
    rows = [["100-1-0-0.wav", 100, 0, 1, 1, 1, 1, "car_horn"], ["101-3-0-0.wav", 101, 0, 1, 1, 2, 3, "dog_bark"]]
    header = ["slice_file_name", "fsID", "start", "end", "salience", "fold", "classID", "class"]
    data = write_csv(root / "metadata" / "UrbanSound8K.csv", header, rows)
    return data, None, ["fold1/100-1-0-0.wav", "fold2/101-3-0-0.wav"]


def build_cremad(root: Path):
    tone(root / "AudioWAV" / "1001_DFA_ANG_XX.wav", 300)
    tone(root / "AudioWAV" / "1002_IEO_SAD_HI.wav", 350)
    return root / "AudioWAV", None, ["1001_DFA_ANG_XX.wav", "1002_IEO_SAD_HI.wav"]


def build_fsd50k(root: Path):
    tone(root / "FSD50K.eval_audio" / "37199.wav", 400)
    tone(root / "FSD50K.eval_audio" / "175151.wav", 900)
    truth = root / "FSD50K.ground_truth"
    rows = [
        ["37199", "Bark,Dog,Domestic_animals_and_pets", "/m/05tny_,/m/0bt9lr,/m/068hy"],
        ["175151", "Rain", "/m/06mb1"],
    ]
    data = write_csv(truth / "eval.csv", ["fname", "labels", "mids"], rows)
    vocabulary = ["Bark", "Dog", "Domestic_animals_and_pets", "Rain", "Speech"]
    (truth / "vocabulary.csv").write_text("".join(f"{i},{label},/m/x{i}\n" for i, label in enumerate(vocabulary)))
    return data, None, ["37199", "175151"]


BUILDERS = {
    "mmau": build_mmau,
    "clotho_aqa": build_clotho_aqa,
    "clotho_caption": build_clotho_caption,
    "audiocaps_caption": build_audiocaps,
    "gtzan": build_gtzan,
    "us8k": build_us8k,
    "cremad": build_cremad,
    "fsd50k": build_fsd50k,
}


def test_every_task_has_a_mini_set():
    assert set(BUILDERS) == set(TASKS)


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_readers_parse_the_public_formats(name, tmp_path):
    data, audio_root, ids = BUILDERS[name](tmp_path)
    items = TASKS[name].read(data, audio_root)
    assert [item["id"] for item in items] == ids
    assert all(Path(item["audio"]).is_file() for item in items)


def test_reader_fields_and_prompts(tmp_path):
    mmau = TASKS["mmau"].read(*build_mmau(tmp_path / "mmau")[:2])
    assert TASKS["mmau"].build_prompt(mmau[1]) == (
        "Based on the given audio, identify the source of the sound. Choose the correct option from the following "
        "options:\n(A) Man\n(B) Woman\n(C) Child\n(D) Robot"
    )
    aqa = TASKS["clotho_aqa"].read(*build_clotho_aqa(tmp_path / "aqa")[:2])
    assert [item["answers"] for item in aqa] == [["yes", "yes", "yes"], ["two", "2", "three"]]
    assert TASKS["clotho_aqa"].build_prompt(aqa[0]) == "Is it raining?"
    caps = TASKS["audiocaps_caption"].read(*build_audiocaps(tmp_path / "ac")[:2])
    assert caps[0]["references"] == ["a dog barks", "a dog is barking"]  # rows of one clip grouped, as the original
    assert caps[1]["audio"].endswith("xyz.flac")
    us8k = TASKS["us8k"].read(*build_us8k(tmp_path / "us8k")[:2])
    assert [item["labels"] for item in us8k] == [["car horn"], ["dog bark"]]
    cremad = TASKS["cremad"].read(*build_cremad(tmp_path / "cremad")[:2])
    assert [item["labels"] for item in cremad] == [["angry"], ["sad"]]
    assert TASKS["cremad"].build_prompt(cremad[0]) == "what is the emotion of this speech?"
    fsd = TASKS["fsd50k"].read(*build_fsd50k(tmp_path / "fsd")[:2])
    assert fsd[0]["labels"] == ["Bark", "Dog", "Domestic animals and pets"]
    assert fsd[1]["label_set"] == ["Bark", "Dog", "Domestic animals and pets", "Rain", "Speech"]
    assert TASKS["clotho_caption"].build_prompt({"id": "x"}, "Describe {id}.") == "Describe x."
    with pytest.raises(ValueError, match=r"uses \{choices\}, which items of task gtzan lack"):
        TASKS["gtzan"].build_prompt({"id": "x"}, "{choices}")


def test_original_decoding_settings():
    # eval/inference.sh: temperature 0, 1 beam; inference.py: 256 new tokens, stop at eos.
    assert GENERATION_SETTINGS == {"do_sample": False, "num_beams": 1, "max_new_tokens": 256}


@pytest.fixture(scope="module")
def generator(loaded):
    _, model, processor = loaded
    return BatchedAnswerGenerator(model, processor, SETTINGS)


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_task_end_to_end(name, generator, tmp_path):
    if TASKS[name].scorer == "captioning":
        pytest.importorskip("aac_metrics", reason="captioning metrics need the [eval] extra (aac-metrics)")
    data, audio_root, ids = BUILDERS[name](tmp_path / "data")
    results = run_evaluation(name, data, tmp_path / "out", generator, audio_root=audio_root, model_name="fixture")
    rows = [json.loads(line) for line in (tmp_path / "out" / PREDICTIONS).read_text().splitlines()]
    assert [row["id"] for row in rows] == ids
    assert all(isinstance(row["prediction"], str) for row in rows)
    # results.json holds what the scorer computes from the written predictions.
    metrics, _ = score_items(TASKS[name].scorer, rows)
    assert results["metrics"] == metrics
    on_disk = json.loads((tmp_path / "out" / "results.json").read_text())
    assert on_disk["metrics"] == metrics and on_disk["generation"] == SETTINGS
    assert (tmp_path / "out" / "results.md").read_text().startswith(f"# {name}:")
    if TASKS[name].scorer == "captioning":
        assert "cider_d" in metrics and metrics["count"] == 2
        assert set(results["skipped"]) in (set(), {"spice", "spider"})


def test_answers_are_the_models(generator, loaded, tmp_path):
    """The predictions are what AF2 answers to the task's prompt, one by one, with the original's settings."""
    _, model, processor = loaded
    data, _, _ = build_mmau(tmp_path / "data")
    run_evaluation("mmau", data, tmp_path / "out", generator, batch_size=2)
    rows = [json.loads(line) for line in (tmp_path / "out" / PREDICTIONS).read_text().splitlines()]
    for row in rows:
        inputs = processor(text=row["prompt"], audio=row["audio"])
        expected_ids = processor.tokenizer(
            "<audio>" + row["prompt"].lower().strip() + "<SEP>", add_special_tokens=False
        ).input_ids
        assert inputs["input_ids"][0].tolist() == expected_ids
        out = model.generate(
            **inputs,
            **SETTINGS,
            eos_token_id=processor.tokenizer.eos_token_id,
            pad_token_id=processor.tokenizer.pad_token_id,
        )
        assert row["prediction"] == processor.decode_answers(out[:, inputs["input_ids"].shape[1] :])[0]


def test_resume_keeps_rows_and_redoes_a_torn_line(generator, tmp_path):
    data, _, ids = build_mmau(tmp_path / "data")
    out = tmp_path / "out"
    run_evaluation("mmau", data, out, generator, batch_size=1)
    lines = (out / PREDICTIONS).read_text().splitlines()
    first = json.loads(lines[0])
    first["prediction"] = "Man"  # a marker: a kept row is not generated again
    # The second row half written, the third missing: as a run killed mid-write leaves the file.
    (out / PREDICTIONS).write_text(json.dumps(first) + "\n" + lines[1][: len(lines[1]) // 2])
    results = run_evaluation("mmau", data, out, generator, batch_size=1)
    rows = [json.loads(line) for line in (out / PREDICTIONS).read_text().splitlines()]
    assert [row["id"] for row in rows] == ids
    assert rows[0]["prediction"] == "Man" and rows[1:] == [json.loads(line) for line in lines[1:]]
    assert results["metrics"]["count"] == 3


def test_resume_refuses_other_settings_or_data(generator, loaded, tmp_path):
    _, model, processor = loaded
    data, _, _ = build_mmau(tmp_path / "data")
    out = tmp_path / "out"
    run_evaluation("mmau", data, out, generator, limit=1)
    other = BatchedAnswerGenerator(model, processor, {**SETTINGS, "max_new_tokens": 5})
    with pytest.raises(ValueError, match="generation.max_new_tokens: was 4, now 5"):
        run_evaluation("mmau", data, out, other, limit=1)
    (out / PREDICTIONS).write_text('{"id": "elsewhere", "prediction": "x"}\n')
    with pytest.raises(ValueError, match="'elsewhere' is not in this data set"):
        run_evaluation("mmau", data, out, generator, limit=1)
    (out / PREDICTIONS).write_text('{"id": "q0"\n{"id": "q1", "prediction": "x"}\n')
    with pytest.raises(ValueError, match="line 1: not valid JSON"):
        run_evaluation("mmau", data, out, generator, limit=1)


def test_loop_engine_refuses_data_parallel(generator, monkeypatch):
    from transformers_af2.evaluation import LoopEngine

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="under torchrun / accelerate use the caption engine"):
        LoopEngine(generator)


@pytest.mark.parametrize(
    ("name", "damage", "message"),
    [
        ("mmau", lambda d: d.write_text(json.dumps([{"id": "a"}])), r"item 0: missing keys \['audio_id'"),
        (
            "mmau",
            lambda d: d.write_text(json.dumps([{**json.loads(d.read_text())[0], "answer": "Dog"}])),
            "answer 'Dog' is not among its choices",
        ),
        ("mmau", lambda d: d.write_text("[1, 2"), "not valid JSON"),
        ("clotho_aqa", lambda d: d.write_text("file_name,answer\nx.wav,yes\n"), r"missing \['QuestionText'\]"),
        ("clotho_caption", lambda d: (d.parent / "evaluation" / "b.wav").unlink(), r"b.wav does not exist"),
        ("us8k", lambda d: d.write_text(d.read_text().replace("dog_bark", "cat_meow")), "'cat_meow' is not one of"),
        ("cremad", lambda d: tone(d / "1003_DFA_XYZ_XX.wav", 100), "'XYZ' is not one of"),
        ("fsd50k", lambda d: d.write_text("fname,labels\n1,Meow\n"), r"labels \['Meow'\] are not in vocabulary.csv"),
    ],
)
def test_bad_inputs_name_the_problem(name, damage, message, tmp_path):
    data, audio_root, _ = BUILDERS[name](tmp_path)
    damage(data)
    with pytest.raises(ValueError, match=message):
        TASKS[name].read(data, audio_root)


def test_cli_resumes_after_kill_9(converted_fixture, tmp_path):
    """`af2 eval` killed with SIGKILL after its first answers, run again: every item once, same answers."""
    data, _, ids = build_mmau(tmp_path / "data")
    out = tmp_path / "out"
    command = [sys.executable, "-m", "transformers_af2", "eval", "--task", "mmau", "--data", str(data)]
    command += ["--model", str(converted_fixture.repo), "--output", str(out), "--batch-size", "1"]
    command += ["--max-new-tokens", "4", "--device", "cpu", "--engine", "loop"]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT / "src"), "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    predictions = out / PREDICTIONS
    deadline = time.monotonic() + 120
    while not (predictions.is_file() and predictions.read_text().count("\n") >= 1):
        assert process.poll() is None, process.stderr.read().decode()
        assert time.monotonic() < deadline, "no prediction written within 120 s"
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    kept = predictions.read_text().splitlines()
    assert 1 <= len(kept) <= len(ids)
    finished = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr
    rows = [json.loads(line) for line in predictions.read_text().splitlines()]
    assert [row["id"] for row in rows] == ids
    assert [json.dumps(row) for row in rows[: len(kept)]] == [json.dumps(json.loads(line)) for line in kept]
    assert "| accuracy |" in finished.stdout


def test_caption_engine_gives_the_loop_engines_predictions(generator, loaded, tmp_path):
    """af2 caption's engine (read-ahead, length-grouped, data-parallel) answers exactly as the plain loop does."""
    _, model, processor = loaded
    data, audio_root, ids = build_clotho_aqa(tmp_path / "data")
    loop = run_evaluation("clotho_aqa", data, tmp_path / "loop", generator, audio_root=audio_root, batch_size=1)
    engine = CaptionEngine(model, processor, SETTINGS, num_workers=0)
    engine_results = run_evaluation(
        "clotho_aqa", data, tmp_path / "engine", engine, audio_root=audio_root, batch_size=1
    )
    read = lambda folder: [json.loads(line) for line in (tmp_path / folder / PREDICTIONS).read_text().splitlines()]  # noqa: E731
    assert [row["id"] for row in read("engine")] == ids
    assert read("engine") == read("loop")
    assert engine_results["metrics"] == loop["metrics"]
    # A second run resumes from the engine's store: nothing is generated again, the same rows come out.
    again = run_evaluation("clotho_aqa", data, tmp_path / "engine", engine, audio_root=audio_root, batch_size=1)
    assert again["metrics"] == loop["metrics"] and read("engine") == read("loop")
    with pytest.raises(ValueError, match="engine: was 'CaptionEngine', now 'LoopEngine'"):
        run_evaluation("clotho_aqa", data, tmp_path / "engine", generator, audio_root=audio_root)


def test_data_parallel_eval_under_torchrun(generator, converted_fixture, tmp_path):
    """Two torchrun processes share the items through the caption engine; the first scores; same answers as one."""
    data, audio_root, ids = build_clotho_aqa(tmp_path / "data")
    single = run_evaluation("clotho_aqa", data, tmp_path / "single", generator, audio_root=audio_root, batch_size=1)
    with socket.socket() as probe:  # a free port on the loopback interface for the rendezvous
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    command += ["--master-addr", "127.0.0.1", "--master-port", str(port)]
    command += ["-m", "transformers_af2", "eval", "--task", "clotho_aqa", "--data", str(data)]
    command += ["--audio-root", str(audio_root or data.parent / "audio_files"), "--model", str(converted_fixture.repo)]
    command += ["--output", str(tmp_path / "dp"), "--engine", "caption", "--num-workers", "0", "--batch-size", "1"]
    command += ["--max-new-tokens", str(SETTINGS["max_new_tokens"]), "--device", "cpu"]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT / "src"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    # Its own session: on a timeout the launcher and both workers are killed together, none is left behind.
    launcher = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        stdout, stderr = launcher.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(launcher.pid, signal.SIGKILL)
        launcher.communicate()
        raise
    assert launcher.returncode == 0, stdout[-2000:] + stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "dp" / PREDICTIONS).read_text().splitlines()]
    assert [row["id"] for row in rows] == ids
    single_rows = [json.loads(line) for line in (tmp_path / "single" / PREDICTIONS).read_text().splitlines()]
    assert [r["prediction"] for r in rows] == [r["prediction"] for r in single_rows]
    assert json.loads((tmp_path / "dp" / "results.json").read_text())["metrics"] == single["metrics"]
    assert stdout.count("| accuracy_unanimous |") == 1  # printed once, by the first process


def test_mmau_test_split_is_answered_and_exported_for_submission(generator, tmp_path):
    """MMAU's test split withholds every answer ("answer": ""): answered, not scored, exported in the official
    format (the benchmark's items with `model_prediction`); the release is recorded by the file's digest."""
    data, _, ids = build_mmau(tmp_path / "data")
    entries = json.loads(data.read_text())
    data.write_text(json.dumps([{**entry, "answer": ""} for entry in entries]))
    results = run_evaluation("mmau", data, tmp_path / "out", generator)
    assert results["metrics"] == {"count": 3}
    assert "answers are withheld" in results["skipped"]["accuracy"]
    assert results["data"]["release"].startswith("unknown release: 3 items, test (answers withheld), sha256 ")
    rows = [json.loads(line) for line in (tmp_path / "out" / PREDICTIONS).read_text().splitlines()]
    submission = json.loads((tmp_path / "out" / "mmau-submission.json").read_text())
    assert [entry["id"] for entry in submission] == ids
    for entry, original, row in zip(submission, entries, rows):
        assert {k: v for k, v in entry.items() if not k.startswith("model_")} == {**original, "answer": ""}
        assert entry["model_prediction"] == entry["model_output"] == row["prediction"]
    # One item without its answer in a scored file is an error, not a silently withheld split.
    entries[1]["answer"] = ""
    data.write_text(json.dumps(entries))
    with pytest.raises(ValueError, match=r"item 1: answer '' is not among its choices \(only the test split"):
        TASKS["mmau"].read(data)


def test_mmau_results_print_the_official_groups(tmp_path):
    """results.md has the official script's task-wise, difficulty-wise and sub-category tables; the submission file
    of test-mini scores the same with the official rule."""
    from transformers_af2.evaluation import mmau_string_match

    data, _, _ = build_mmau(tmp_path / "data")
    answers = {"q0": "Man", "q1": "a robot, not a child", "q2": "Woman"}  # right, wrong (names a wrong choice), wrong

    class Fixed:
        settings = {"fixed": True}

        def __call__(self, audios, questions):
            return [answers[Path(a).stem] for a in audios]

    results = run_evaluation("mmau", data, tmp_path / "out", Fixed())
    assert results["metrics"]["accuracy"] == pytest.approx(100 / 3)
    markdown = (tmp_path / "out" / "results.md").read_text()
    assert "| task | accuracy | count |\n| --- | --- | --- |\n| music | 0.00 | 1 |\n| sound | 100.00 | 1 |" in markdown
    assert "| difficulty | accuracy | count |" in markdown and "| sub-category | accuracy | count |" in markdown
    submission = json.loads((tmp_path / "out" / "mmau-submission.json").read_text())
    official = [mmau_string_match(e["answer"], e["model_output"], e["choices"]) for e in submission]
    assert official == [True, False, False]
