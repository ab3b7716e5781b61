"""The `af2` command line on the converted parity fixture: answers equal the original's greedy ids, help is complete,
errors are one line with exit status 2."""

import argparse
import json
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from transformers_af2.commands import build_parser, main
from transformers_af2.commands import generate as generate_command
from transformers_af2.generation_utils import AnswerStreamer

REPO_ROOT = Path(__file__).resolve().parents[1]

SAMPLES = ("s0", "s1")


def _new_ids(fixture, sample):
    prompt_length = fixture.ids(f"{sample}.prompt_ids").shape[1]
    return fixture.ids(f"{sample}.greedy_ids")[0, prompt_length:].tolist()


def _generate(fixture, *extra, index=0):
    return [
        "generate",
        "--model",
        str(fixture.repo),
        "--audio",
        str(fixture.wav(index)),
        "--prompt",
        fixture.reference["prompts"][index],
        "--greedy",
        "--max-new-tokens",
        str(fixture.reference["max_new_tokens"]),
        "--device",
        "cpu",
        *extra,
    ]


def _run(argv, capsys):
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# ---------------------------------------------------------------------------------------------------------------------
# af2 generate
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("index", [0, 1])
def test_generate_json_equals_direct_generate(converted_fixture, capsys, index):
    from transformers import AutoModel, AutoProcessor

    fixture = converted_fixture
    code, out, _ = _run(_generate(fixture, "--json", index=index), capsys)
    assert code == 0
    (entry,) = json.loads(out)
    expected = _new_ids(fixture, SAMPLES[index])
    assert entry["tokens"] == expected
    assert entry["audio"] == str(fixture.wav(index)) and entry["prompt"] == fixture.reference["prompts"][index]
    model = AutoModel.from_pretrained(fixture.repo).eval()
    processor = AutoProcessor.from_pretrained(fixture.repo)
    inputs = processor(text=fixture.reference["prompts"][index], audio=str(fixture.wav(index)))
    with torch.no_grad():
        direct = model.generate(**inputs, do_sample=False, max_new_tokens=fixture.reference["max_new_tokens"])
    new = direct[:, inputs["input_ids"].shape[1] :]
    assert new[0].tolist() == expected
    assert entry["answer"] == processor.batch_decode(new, skip_special_tokens=True)[0].strip()


def test_generate_batch_of_files_json(converted_fixture, capsys):
    fixture = converted_fixture
    argv = [
        "generate",
        "--model",
        str(fixture.repo),
        "--audio",
        str(fixture.wav(0)),
        "--audio",
        str(fixture.wav(1)),
        "--prompt",
        fixture.reference["prompts"][0],
        "--prompt",
        fixture.reference["prompts"][1],
        "--max-new-tokens",
        str(fixture.reference["max_new_tokens"]),
        "--batch-size",
        "2",
        "--json",
    ]
    code, out, _ = _run(argv, capsys)
    assert code == 0
    assert [entry["tokens"] for entry in json.loads(out)] == [_new_ids(fixture, s) for s in SAMPLES]


def test_generate_text_and_stream_print_the_same_answer(converted_fixture, capsys):
    fixture = converted_fixture
    code, out_json, _ = _run(_generate(fixture, "--json", index=1), capsys)
    answer = json.loads(out_json)[0]["answer"]
    code_text, out_text, _ = _run(_generate(fixture, index=1), capsys)
    code_stream, out_stream, _ = _run(_generate(fixture, "--stream", index=1), capsys)
    assert code == code_text == code_stream == 0
    assert out_text == answer + "\n"
    assert out_stream == answer + "\n"


def test_generate_original_layout_is_converted_and_cached(converted_fixture, capsys, monkeypatch, tmp_path):
    fixture = converted_fixture
    monkeypatch.setenv("AF2_CACHE", str(tmp_path / "cache"))
    argv = _generate(fixture, "--json", index=1)
    argv[argv.index("--model") + 1] = str(fixture.fixture_dir / "original")
    argv += ["--config", str(fixture.yaml_path)]
    for _ in range(2):  # converted the first time, read from the cache the second
        code, out, _ = _run(argv, capsys)
        assert code == 0
        assert json.loads(out)[0]["tokens"] == _new_ids(fixture, "s1")
    assert len(list((tmp_path / "cache").iterdir())) == 1


def test_generate_sampling_is_repeatable_with_a_seed(converted_fixture, capsys):
    fixture = converted_fixture
    argv = _generate(fixture, "--json", index=1)
    argv[argv.index("--greedy")] = "--sample"
    argv += ["--seed", "3", "--top-k", "50", "--temperature", "1.5"]
    first = json.loads(_run(argv, capsys)[1])[0]["tokens"]
    second = json.loads(_run(argv, capsys)[1])[0]["tokens"]
    assert first == second and first != _new_ids(fixture, "s1")


@pytest.mark.parametrize(
    "change, message",
    [
        (("--model", "/no/such/dir"), "model /no/such/dir: no such directory"),
        (("--device", "nope"), "--device 'nope' is not a device"),
        (("--device", ""), "--device '' is not a device"),
        (("--device", "meta"), "--device meta holds no weights"),
        (("--top-k", "5"), "--top-k, --top-p and --temperature apply to --sample only"),
        (("--prompt", "a", "--prompt", "b"), "got 1 --audio and 2 --prompt"),
        (("--stream", "--batch-size", "2"), "--batch-size does not apply"),
        (("--max-new-tokens", "4096"), "--max-new-tokens 4096 does not fit the model's context of 2048 positions"),
    ],
)
def test_generate_errors_are_one_line(converted_fixture, capsys, change, message):
    argv = _generate(converted_fixture)
    if change[0] in ("--audio", "--model", "--max-new-tokens") and change[0] in argv:
        argv[argv.index(change[0]) + 1] = change[1]
    elif change[0] == "--prompt":
        position = argv.index("--prompt")
        del argv[position : position + 2]
        argv += list(change)
    else:
        argv += list(change)
    code, out, err = _run(argv, capsys)
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert lines[-1].startswith("af2 generate: error: ") and message in lines[-1]
    assert not any("Traceback" in line for line in lines)


def test_argument_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as raised:
        main(["generate", "--prompt", "q"])  # --audio missing
    assert raised.value.code == 2
    assert "the following arguments are required: --audio" in capsys.readouterr().err
    with pytest.raises(SystemExit) as raised:
        main(["generate", "--audio", "a.wav", "--prompt", "q", "--stream", "--json"])
    assert raised.value.code == 2


@pytest.mark.parametrize(
    "extra, message",
    [
        (("--prompt", ""), "argument --prompt: the question must not be empty"),
        (("--prompt", "   "), "argument --prompt: the question must not be empty"),
        (("--prompt", "caf\udce9"), "argument --prompt: the question is not valid UTF-8 text: 'caf\\udce9'"),
        (("--audio", ""), "argument --audio: --audio must not be empty"),
        (("--model", ""), "argument --model: --model must not be empty"),
        (("--config", " "), "argument --config: --config must not be empty"),
        (("--max-new-tokens", "abc"), "argument --max-new-tokens: must be a positive integer, got 'abc'"),
        (("--max-new-tokens", ""), "argument --max-new-tokens: must be a positive integer, got ''"),
        (("--max-new-tokens", "0"), "argument --max-new-tokens: must be a positive integer, got 0"),
        (("--max-new-tokens", "-3"), "argument --max-new-tokens: must be a positive integer, got -3"),
        (("--batch-size", "0"), "argument --batch-size: must be a positive integer, got 0"),
        (("--top-k", "2.5"), "argument --top-k: must be a positive integer, got '2.5'"),
        (("--top-p", "0"), "argument --top-p: must be in (0, 1], got 0"),
        (("--top-p", "2"), "argument --top-p: must be in (0, 1], got 2"),
        (("--top-p", "-1"), "argument --top-p: must be in (0, 1], got -1"),
        (("--top-p", "nan"), "argument --top-p: must be a finite number, got nan"),
        (("--top-p", "abc"), "argument --top-p: must be a number, got 'abc'"),
        (("--temperature", "0"), "argument --temperature: must be greater than 0"),
        (("--temperature", "-1"), "argument --temperature: must be greater than 0"),
        (("--temperature", "nan"), "argument --temperature: must be a finite number, got nan"),
        (("--temperature", "inf"), "argument --temperature: must be a finite number, got inf"),
        (("--seed", "-1"), "argument --seed: must be an integer in [0, 4294967295], got -1"),
        (("--seed", str(2**32)), "argument --seed: must be an integer in [0, 4294967295], got 4294967296"),
        (("--seed", "x"), "argument --seed: must be an integer in [0, 4294967295], got 'x'"),
        (("--dtype", "float64"), "argument --dtype: invalid choice: 'float64'"),
        (("--prompt",), "argument --prompt: expected one argument"),
    ],
)
def test_bad_argument_values_are_argparse_errors(capsys, extra, message):
    """Each bad value stops before anything loads: exit 2, one line naming the option, the value and the rule."""
    argv = ["generate", "--audio", "a.wav", "--prompt", "q", "--sample", *extra]
    with pytest.raises(SystemExit) as raised:
        main(argv)
    err = capsys.readouterr().err
    assert raised.value.code == 2
    assert err.strip().splitlines()[-1] == f"af2 generate: error: {message}" or message in err.splitlines()[-1]
    assert "Traceback" not in err


def _answers_by_file(fixture, tmp_path):
    """Five inputs: two readable fixture files around an undecodable one, a missing one and a directory."""
    not_audio = tmp_path / "notes.wav"
    not_audio.write_text("not audio")
    folder = tmp_path / "folder.wav"
    folder.mkdir()
    return [str(fixture.wav(0)), str(not_audio), str(tmp_path / "missing.wav"), str(folder), str(fixture.wav(1))]


@pytest.mark.parametrize("batch_size", ["1", "2"])
def test_generate_json_keeps_every_answer_when_files_fail(converted_fixture, capsys, tmp_path, batch_size):
    fixture = converted_fixture
    files = _answers_by_file(fixture, tmp_path)
    questions = [fixture.reference["prompts"][0]] * 4 + [fixture.reference["prompts"][1]]
    argv = ["generate", "--model", str(fixture.repo), "--device", "cpu", "--json", "--batch-size", batch_size]
    argv += ["--max-new-tokens", str(fixture.reference["max_new_tokens"])]
    for audio, question in zip(files, questions):
        argv += ["--audio", audio, "--prompt", question]
    code, out, err = _run(argv, capsys)
    assert code == 1
    entries = json.loads(out)
    assert [entry["audio"] for entry in entries] == files
    assert entries[0]["tokens"] == _new_ids(fixture, "s0") and entries[4]["tokens"] == _new_ids(fixture, "s1")
    assert entries[0]["error"] is None and entries[4]["error"] is None
    assert [entry["answer"] for entry in entries[1:4]] == [None] * 3
    assert "notes.wav: cannot decode this audio" in entries[1]["error"]
    assert entries[2]["error"] == f"{files[2]}: no such audio file."
    assert entries[3]["error"] == f"{files[3]}: is a directory, not an audio file."
    lines = err.strip().splitlines()
    failures = [line for line in lines if line.startswith("af2 generate: error: ")]
    # Missing files and directories are reported before the model loads, the others as they fail.
    assert [line.split("] ")[0] for line in failures] == [f"af2 generate: error: [{i}" for i in (3, 4, 2)]
    assert all(entries[i]["error"] in failures[(i + 1) % 3] for i in (1, 2, 3))
    assert "Traceback" not in err


def test_generate_text_keeps_every_answer_when_files_fail(converted_fixture, capsys, tmp_path):
    fixture = converted_fixture
    files = _answers_by_file(fixture, tmp_path)
    argv = ["generate", "--model", str(fixture.repo), "--device", "cpu", "--prompt", fixture.reference["prompts"][1]]
    argv += ["--max-new-tokens", "4"]
    for audio in files:
        argv += ["--audio", audio]
    code, out, err = _run(argv, capsys)
    reference = json.loads(_run(_generate(fixture, "--json", "--max-new-tokens", "4", index=1), capsys)[1])
    answer = reference[0]["answer"]
    assert code == 1
    assert out.splitlines() == [f"[1] {files[0]}", answer, f"[5] {files[4]}", answer]
    assert len([line for line in err.splitlines() if line.startswith("af2 generate: error: ")]) == 3
    # Every file missing: nothing is loaded, each is reported, exit 1.
    code, out, err = _run(["generate", "--audio", files[2], "--audio", files[3], "--prompt", "q"], capsys)
    assert code == 1 and out == ""
    assert err.splitlines() == [
        f"af2 generate: error: [1] {files[2]}: no such audio file.",
        f"af2 generate: error: [2] {files[3]}: is a directory, not an audio file.",
    ]


def test_generate_names_the_file_whose_logits_are_nan(loaded, capsys, monkeypatch):
    """NaN logits for one file (a NaN embedding row of a token only its question holds): that file's error, the
    other file's answer, exit 1; in greedy and sampling mode."""
    from test_pipeline import _poisoned_copy

    fixture, _, processor = loaded
    questions = fixture.reference["prompts"]
    poisoned = _poisoned_copy(loaded, questions[1])
    monkeypatch.setattr(generate_command, "load_model_and_processor", lambda *args, **kwargs: (poisoned, processor))
    wavs = [str(fixture.wav(0)), str(fixture.wav(1))]
    for mode in ("--greedy", "--sample"):
        argv = ["generate", "--device", "cpu", "--json", "--batch-size", "2", "--max-new-tokens", "3", mode]
        argv += ["--audio", wavs[0], "--prompt", questions[0], "--audio", wavs[1], "--prompt", questions[1]]
        code, out, err = _run(argv, capsys)
        entries = json.loads(out)
        assert code == 1
        assert entries[0]["error"] is None and len(entries[0]["tokens"]) == 3
        assert entries[1]["answer"] is None and "generation stopped: batch row 0" in entries[1]["error"]
        assert f"(audio {wavs[1]!r}) has " in entries[1]["error"]
        assert err.strip().splitlines()[-1].startswith("af2 generate: error: [2] generation stopped: batch row 0")


def test_generate_non_utf8_file_name(converted_fixture, capsys, tmp_path):
    """A file name that is not UTF-8 (byte 0xe9) prints as \\udce9 (as the front end names it) in JSON and errors."""
    import os
    import shutil

    fixture = converted_fixture
    name = os.fsdecode(os.fsencode(str(tmp_path)) + b"/caf\xe9.wav")
    shutil.copy(fixture.wav(1), os.fsencode(name))
    shown = str(tmp_path) + "/caf\\udce9.wav"
    argv = ["generate", "--model", str(fixture.repo), "--device", "cpu", "--max-new-tokens", "3", "--json"]
    argv += ["--audio", str(fixture.wav(1)), "--audio", name, "--prompt", fixture.reference["prompts"][1]]
    code, out, err = _run(argv, capsys)
    out.encode("utf-8")  # printable on a UTF-8 stream
    entries = json.loads(out)
    assert entries[1]["audio"] == shown and entries[0]["error"] is None
    assert code == 0 and entries[1]["tokens"] == entries[0]["tokens"]  # read like the same audio under a UTF-8 name
    # A missing one is named the same way on stderr.
    argv[argv.index(name)] = name.replace(".wav", "-gone.wav")
    code, out, err = _run(argv, capsys)
    assert code == 1
    missing_line = f"af2 generate: error: [2] {shown.replace('.wav', '-gone.wav')}: no such audio file."
    assert missing_line in err.splitlines()


def _start(argv, **kwargs):
    import os

    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT / "src"), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, **kwargs)


@pytest.mark.parametrize("module", ["torch", "transformers"])
def test_ctrl_c_while_starting_exits_130_with_one_line(module):
    """A Ctrl-C that lands while `af2` still imports torch and transformers (seconds): exit 130, one line, no
    traceback. The interrupt is raised from inside that import, so the test does not race the machine's speed."""
    code = (
        "import builtins, sys\n"
        "real_import = builtins.__import__\n"
        "def interrupted(name, *args, **kwargs):\n"
        f"    if name == {module!r} or name.startswith({module + '.'!r}):\n"
        "        raise KeyboardInterrupt\n"
        "    return real_import(name, *args, **kwargs)\n"
        "builtins.__import__ = interrupted\n"
        "import af2_entry\n"
        "sys.argv = ['af2', 'generate', '--audio', 'a.wav', '--prompt', 'q']\n"
        "sys.exit(af2_entry.main())\n"
    )
    process = _start([sys.executable, "-c", code])
    out, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert err.strip().splitlines() == ["af2: interrupted"]
    assert out == ""


# ---------------------------------------------------------------------------------------------------------------------
# af2 convert
# ---------------------------------------------------------------------------------------------------------------------


def test_convert_writes_a_loadable_repository(converted_fixture, capsys, tmp_path):
    from transformers import AutoModel

    fixture = converted_fixture
    output = tmp_path / "converted"
    argv = [
        "convert",
        str(fixture.fixture_dir / "original"),
        str(output),
        "--config",
        str(fixture.yaml_path),
        "--quiet",
    ]
    code, out, _ = _run(argv, capsys)
    assert code == 0 and out == f"wrote {output}\n"
    model = AutoModel.from_pretrained(output)
    reference = AutoModel.from_pretrained(fixture.repo)
    for (name, mine), (_, theirs) in zip(model.state_dict().items(), reference.state_dict().items()):
        assert torch.equal(mine, theirs), name


def test_convert_error_is_one_line(capsys, tmp_path):
    code, _, err = _run(["convert", str(tmp_path / "absent"), str(tmp_path / "out"), "--quiet"], capsys)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and err.startswith("af2 convert: error: ")


# ---------------------------------------------------------------------------------------------------------------------
# help
# ---------------------------------------------------------------------------------------------------------------------


def _subcommands(parser):
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return action.choices


def test_help_of_every_command_is_complete(capsys):
    parser = build_parser()
    with pytest.raises(SystemExit) as raised:
        main(["--help"])
    assert raised.value.code == 0
    top = capsys.readouterr().out
    commands = _subcommands(parser)
    assert {"generate", "convert"} <= set(commands)
    for name, subparser in commands.items():
        assert name in top
        with pytest.raises(SystemExit) as raised:
            main([name, "--help"])
        assert raised.value.code == 0
        text = capsys.readouterr().out
        for action in subparser._actions:
            if name in ("generate", "convert"):  # `train` belongs to transformers_af2.trainer.cli
                assert action.help, f"af2 {name}: {action.option_strings or action.dest} has no help text"
            for option in action.option_strings:
                assert option in text, f"af2 {name} --help does not mention {option}"
            if not action.option_strings:
                assert action.dest in text


def test_entry_point_help_runs():
    result = subprocess.run(
        [sys.executable, "-m", "transformers_af2", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0 and "generate" in result.stdout and "convert" in result.stdout


def test_train_subcommand_comes_from_the_trainer_module(monkeypatch, capsys):
    calls = []

    def add_train_parser(subparsers):
        calls.append(subparsers)
        parser = subparsers.add_parser("train", help="fine-tune AF2")
        parser.set_defaults(handler=lambda args: 0)

    fake = types.ModuleType("transformers_af2.trainer.cli")
    fake.add_train_parser = add_train_parser
    monkeypatch.setitem(sys.modules, "transformers_af2.trainer.cli", fake)
    assert "train" in _subcommands(build_parser()) and len(calls) == 1
    assert main(["train"]) == 0


def test_stream_of_a_repaired_soundcot_answer_shows_both_passes(converted_fixture):
    """The streamer prints the first pass, then the repaired answer (its prompt's text after <SEP>, then the rest)."""
    import io

    from test_pipeline import ForceContinuations
    from transformers import AutoModel, AutoProcessor, LogitsProcessorList, pipeline

    from transformers_af2.soundcot import SOUNDCOT_REPAIR_SUFFIX

    fixture = converted_fixture
    model = AutoModel.from_pretrained(fixture.repo).eval()
    processor = AutoProcessor.from_pretrained(fixture.repo)
    tok = processor.tokenizer
    question = fixture.reference["prompts"][1]
    prefix = "<reasoning>dog" + SOUNDCOT_REPAIR_SUFFIX
    repaired_prompt = tok(processor.build_prompt(question) + prefix)["input_ids"]
    sep = tok.convert_tokens_to_ids("<SEP>")
    targets = [
        tok("<REASONING>Dog. Rain")["input_ids"] + [tok.eos_token_id],
        repaired_prompt[repaired_prompt.index(sep) + 1 :] + tok(" Rain.")["input_ids"] + [tok.eos_token_id],
    ]
    out = io.StringIO()
    pipe = pipeline("audio-text-to-text", model=model, processor=processor)
    record = pipe(
        audio=str(fixture.wav(1)),
        text=question,
        max_new_tokens=40,
        soundcot_repair=True,
        logits_processor=LogitsProcessorList([ForceContinuations(sep, targets)]),
        streamer=AnswerStreamer(processor, out),
    )[0]
    assert record["soundcot_repaired"]
    assert out.getvalue() == "<REASONING>Dog. Rain\n" + record["generated_text"] + "\n"
