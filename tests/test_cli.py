"""The `af2` command line on the converted parity fixture: answers equal the original's greedy ids, help is complete,
errors are one line with exit status 2."""

import argparse
import json
import subprocess
import sys
import types

import pytest
import torch

from transformers_af2 import cli

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
    code = cli.main(argv)
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
        (("--audio", "missing.wav"), "missing.wav: no such audio file"),
        (("--model", "/no/such/dir"), "model /no/such/dir: no such directory"),
        (("--device", "nope"), "--device 'nope' is not a device"),
        (("--top-k", "5"), "--top-k, --top-p and --temperature apply to --sample only"),
        (("--prompt", "a", "--prompt", "b"), "got 1 --audio and 2 --prompt"),
    ],
)
def test_generate_errors_are_one_line(converted_fixture, capsys, change, message):
    argv = _generate(converted_fixture)
    if change[0] in ("--audio", "--model") and change[0] in argv:
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
        cli.main(["generate", "--prompt", "q"])  # --audio missing
    assert raised.value.code == 2
    assert "the following arguments are required: --audio" in capsys.readouterr().err
    with pytest.raises(SystemExit) as raised:
        cli.main(["generate", "--audio", "a.wav", "--prompt", "q", "--stream", "--json"])
    assert raised.value.code == 2


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
    parser = cli.build_parser()
    with pytest.raises(SystemExit) as raised:
        cli.main(["--help"])
    assert raised.value.code == 0
    top = capsys.readouterr().out
    commands = _subcommands(parser)
    assert {"generate", "convert"} <= set(commands)
    for name, subparser in commands.items():
        assert name in top
        with pytest.raises(SystemExit) as raised:
            cli.main([name, "--help"])
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
        [sys.executable, "-m", "transformers_af2.cli", "--help"],
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
    assert "train" in _subcommands(cli.build_parser()) and len(calls) == 1
    assert cli.main(["train"]) == 0


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
        streamer=cli.AnswerStreamer(processor, out),
    )[0]
    assert record["soundcot_repaired"]
    assert out.getvalue() == "<REASONING>Dog. Rain\n" + record["generated_text"] + "\n"
