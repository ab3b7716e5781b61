"""
The run store's promises for `af2 caption` and `af2 eval`, with real files: nothing af2 did not write is replaced,
a resume never mixes models, weights or data, one clip per real file (symlinks, loops, relative and absolute paths),
duplicate ids, non-UTF-8 file names, manifest encodings.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from safetensors.torch import load_file, save_file
from test_eval_tasks import SETTINGS, build_mmau

from transformers_af2.caption import caption, discover_clips
from transformers_af2.commands import main
from transformers_af2.evaluation import BatchedAnswerGenerator, CaptionEngine, run_evaluation
from transformers_af2.runstore import OutputRefused, RunFolder, RunStore, model_fingerprint, record_differences

PROMPT = "Describe the audio."


def _noise(path, seconds=0.5, seed=0, rate=16000):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    sf.write(path, (rng.standard_normal(int(seconds * rate)) * 0.1).astype("float32"), rate)
    return path


def _caption_cli(repo, inputs, output, *extra):
    return main(["caption", *map(str, inputs), "--model", str(repo), "--prompt", PROMPT, "-o", str(output),
                     "--max-new-tokens", "2", "--num-workers", "0", "--device", "cpu", *extra])  # fmt: skip


def _last_error(capsys) -> str:
    return capsys.readouterr().err.strip().splitlines()[-1]


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture
def repo_copy(converted_fixture, tmp_path):
    """A private copy of the converted model, whose weights a test may change in place."""
    copy = tmp_path / "model"
    shutil.copytree(converted_fixture.repo, copy)
    return copy


def _change_weights_in_place(repo):
    """Rewrites one weight file of `repo` with one tensor changed, as a fine-tune saved over the original does."""
    [weights] = sorted(repo.glob("*.safetensors"))
    tensors = load_file(weights)
    name = sorted(tensors)[0]
    tensors[name] = tensors[name] + 0.5
    save_file(tensors, weights, metadata={"format": "pt"})
    return weights.name


# ---------------------------------------------------------------------------------------------------------------------
# ownership
# ---------------------------------------------------------------------------------------------------------------------


def test_caption_never_replaces_what_it_did_not_write(converted_fixture, tmp_path, capsys):
    repo = converted_fixture.repo
    clip = _noise(tmp_path / "a.wav")
    manifest = tmp_path / "man.csv"
    manifest.write_text(f"path\n{clip}\n")
    before = manifest.read_bytes()
    # The input manifest as the output: refused, even with --overwrite.
    for extra in ((), ("--overwrite",)):
        assert _caption_cli(repo, [manifest], manifest, *extra) == 2
        assert f"output {manifest} is {manifest}, an input of this run" in _last_error(capsys)
        assert manifest.read_bytes() == before
    # An audio input as the output (through a symlink, too).
    (tmp_path / "link.jsonl").symlink_to(clip)
    assert _caption_cli(repo, [clip], tmp_path / "link.jsonl") == 2
    assert "an input of this run" in _last_error(capsys)
    # A user's file: refused, untouched; --overwrite is the way to replace it.
    notes = tmp_path / "notes.jsonl"
    notes.write_text('{"mine": 1}\n')
    assert _caption_cli(repo, [clip], notes) == 2
    assert f"{notes} was not written by af2 caption" in _last_error(capsys)
    assert notes.read_text() == '{"mine": 1}\n'
    assert not (tmp_path / "notes.jsonl.lock").exists()  # a refused run leaves nothing behind
    assert _caption_cli(repo, [clip], notes, "--overwrite") == 0
    assert [row["path"] for row in _rows(notes)] == [str(clip)]
    # A directory.
    (tmp_path / "folder").mkdir()
    assert _caption_cli(repo, [clip], tmp_path / "folder") == 2
    assert "is a directory" in _last_error(capsys)
    # af2's own output, changed by someone since: not af2's any more.
    out = tmp_path / "out.jsonl"
    assert _caption_cli(repo, [clip], out) == 0
    assert _caption_cli(repo, [clip], out) == 0  # af2's own: resumed
    with open(out, "a") as handle:
        handle.write('{"edited": true}\n')
    assert _caption_cli(repo, [clip], out) == 2
    assert "was not written by af2 caption, or was changed since" in _last_error(capsys)
    assert out.read_text().endswith('{"edited": true}\n')


def test_eval_folder_ownership(generator_loaded, tmp_path):
    data, _, _ = build_mmau(tmp_path / "data")
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("my notes")
    with pytest.raises(OutputRefused, match=r"notes.txt was not written by af2 eval"):
        run_evaluation("mmau", data, folder, generator_loaded, limit=1)
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputRefused, match="is a file; the output of this command is a folder"):
        run_evaluation("mmau", data, tmp_path / "file", generator_loaded, limit=1)
    # --overwrite in a folder of the user's: af2 writes its files beside theirs and removes none of them.
    run_evaluation("mmau", data, folder, generator_loaded, limit=1, overwrite=True)
    assert (folder / "notes.txt").read_text() == "my notes"
    assert (folder / "results.json").is_file()
    # A results file changed by the user is not replaced.
    (folder / "results.md").write_text("my own table\n")
    with pytest.raises(OutputRefused, match=r"results.md was not written by af2 eval, or was changed since"):
        run_evaluation("mmau", data, folder, generator_loaded, limit=1)
    assert (folder / "results.md").read_text() == "my own table\n"


@pytest.fixture(scope="module")
def generator_loaded(loaded):
    _, model, processor = loaded
    return BatchedAnswerGenerator(model, processor, SETTINGS)


# ---------------------------------------------------------------------------------------------------------------------
# provenance: a resume never mixes models, weights or data
# ---------------------------------------------------------------------------------------------------------------------


def test_caption_resume_refuses_changed_weights_and_changed_audio(repo_copy, tmp_path, capsys):
    clip = _noise(tmp_path / "a.wav")
    out = tmp_path / "out.jsonl"
    assert _caption_cli(repo_copy, [clip], out) == 0
    name = _change_weights_in_place(repo_copy)
    assert _caption_cli(repo_copy, [clip], out) == 2
    error = _last_error(capsys)
    assert f"model.files.{name}: was '" in error and "other settings or data" in error
    assert len(_rows(out)) == 1

    other = tmp_path / "other.jsonl"
    assert _caption_cli(repo_copy, [clip], other) == 0
    _noise(clip, seed=7)  # the clip rewritten in place
    assert _caption_cli(repo_copy, [clip], other) == 2
    assert f"{other} holds rows of clips whose audio changed since" in _last_error(capsys)
    assert _caption_cli(repo_copy, [clip], other, "--overwrite") == 0
    assert capsys.readouterr().out.strip().startswith("af2 caption: 1 done, 0 failed, 0 skipped")


def test_eval_resume_refuses_edited_data_and_changed_weights(repo_copy, tmp_path):
    from transformers import AutoModel, AutoProcessor

    model = AutoModel.from_pretrained(repo_copy).eval()
    processor = AutoProcessor.from_pretrained(repo_copy)
    data, _, _ = build_mmau(tmp_path / "data")
    out = tmp_path / "out"
    engine = CaptionEngine(model, processor, SETTINGS, num_workers=0)  # the default engine
    run_evaluation("mmau", data, out, engine, model_name=str(repo_copy))
    # The benchmark revised in place (as MMAU's test-mini was): the old generations are not reused.
    entries = json.loads(data.read_text())
    entries[1]["question"] = "Which instrument plays first?"
    data.write_text(json.dumps(entries))
    with pytest.raises(OutputRefused, match=r"data.items_sha256: was .*data.sha256: was .*prompts_sha256: was"):
        run_evaluation("mmau", data, out, engine, model_name=str(repo_copy))
    # The model's weights changed in place.
    entries[1]["question"] = json.loads((out / "predictions.jsonl").read_text().splitlines()[1])["question"]
    data.write_text(json.dumps(entries))
    run_evaluation("mmau", data, out, engine, model_name=str(repo_copy))  # the same data again: resumes
    name = _change_weights_in_place(repo_copy)
    with pytest.raises(OutputRefused, match=rf"model.files.{name}: was "):
        run_evaluation("mmau", data, out, engine, model_name=str(repo_copy))
    # An audio file replaced in place is named.
    _noise(tmp_path / "data" / "test-mini-audios" / "q2.wav", seed=3)
    with pytest.raises(OutputRefused, match=r"audio.q2: was "):
        run_evaluation("mmau", data, out, engine, model_name=str(repo_copy))


def test_weights_fingerprint_and_record_differences(repo_copy, tmp_path):
    from transformers import AutoModel

    model = AutoModel.from_pretrained(repo_copy)
    first = model_fingerprint(model, repo_copy)
    assert first["dtype"] == "float32" and first["id"] == str(repo_copy.resolve())
    assert model_fingerprint(model, repo_copy) == first  # stable
    name = _change_weights_in_place(repo_copy)
    second = model_fingerprint(model, repo_copy)
    assert record_differences(first, second) == [
        f"files.{name}: was {first['files'][name]!r}, now {second['files'][name]!r}"
    ]
    # The chat template is part of the model: it makes the prompt the AF3 family is asked in.
    template = repo_copy / "chat_template.jinja"
    assert "chat_template.jinja" in second["files"]
    template.write_text(template.read_text() + "\n{# edited #}")
    assert record_differences(second, model_fingerprint(model, repo_copy)) == [
        f"files.chat_template.jinja: was {second['files']['chat_template.jinja']!r}, "
        f"now {model_fingerprint(model, repo_copy)['files']['chat_template.jinja']!r}"
    ]
    # A model object without a directory: a digest of its parameters, which any change moves.
    loose = model_fingerprint(model, None)
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    assert model_fingerprint(model, None)["parameters"] != loose["parameters"]


def test_a_second_run_into_a_held_output_is_refused_naming_the_holder(tmp_path):
    """Within one process, two stores of one output: the second is refused, and its refusal leaves the lock held."""
    out = tmp_path / "out.jsonl"
    first, second = RunStore(out), RunStore(out)
    first.open({"a": 1})
    try:
        with pytest.raises(OutputRefused, match=rf"being written by another run: pid {os.getpid()} on host "):
            second.open({"a": 1})
        # Another process is still refused: the in-process refusal did not drop the record lock.
        assert _lock_refused_in_another_process(out)
    finally:
        first.close()
    assert not _lock_refused_in_another_process(out)
    second.open({"a": 1})  # released: free again, and a resume
    assert second.resumed
    second.close()
    with pytest.raises(OutputRefused, match=r"other settings or data: a: was 1, now 2"):
        RunStore(out).open({"a": 2})
    folder = RunFolder(tmp_path / "eval", ["predictions.jsonl"], final=[])
    folder.open({"x": 1})
    with pytest.raises(OutputRefused, match="being written by another run"):
        RunFolder(tmp_path / "eval", ["predictions.jsonl"], final=[]).open({"x": 1})
    folder.close()


# ---------------------------------------------------------------------------------------------------------------------
# clip identity
# ---------------------------------------------------------------------------------------------------------------------


def test_symlink_loops_are_walked_once(tmp_path):
    one = tmp_path / "one"
    _noise(one / "a.wav")
    (one / "back").symlink_to("..")  # a loop: one/back/one/back/...
    (one / "self").symlink_to(".")
    assert [c.path for c in discover_clips([one])] == [str(one / "a.wav")]
    eight = tmp_path / "eight"
    for index in range(8):
        _noise(eight / f"d{index % 2}" / f"c{index}.wav", seed=index)
    for sub in ("d0", "d1"):
        (eight / sub / "back").symlink_to("..")
    clips = discover_clips([eight])
    assert len(clips) == 8 and len({c.clip_id for c in clips}) == 8


def test_one_clip_per_real_file(tmp_path, monkeypatch):
    clip = _noise(tmp_path / "data" / "a.wav")
    (tmp_path / "alias.wav").symlink_to(clip)
    linked = tmp_path / "linked"
    linked.symlink_to(tmp_path / "data", target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    clips = discover_clips(["data/a.wav", str(clip), "alias.wav", "linked", "data"])
    assert [(c.clip_id, c.path) for c in clips] == [(str(clip), "data/a.wav")]


def test_duplicate_ids_naming_different_files_are_an_error(tmp_path):
    a, b = _noise(tmp_path / "a.wav"), _noise(tmp_path / "b.wav", seed=1)
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(
        json.dumps({"id": 1, "path": "a.wav"}) + "\n" + json.dumps({"id": "1", "path": "b.wav"}) + "\n"
    )
    with pytest.raises(ValueError, match=rf"1 clip id\(s\) name two different files .*id '1': {a} and {b}"):
        discover_clips([manifest])
    # The same id for the same file (listed twice, or by another path) is one clip.
    manifest.write_text(json.dumps({"id": 1, "path": "a.wav"}) + "\n" + json.dumps({"id": 1, "path": str(a)}) + "\n")
    assert [c.clip_id for c in discover_clips([manifest])] == ["1"]
    # One file asked two prompts by two rows: two clips (rows), one file.
    manifest.write_text(
        json.dumps({"id": "x", "path": "a.wav", "prompt": "one?"})
        + "\n"
        + json.dumps({"id": "x", "path": "a.wav", "prompt": "two?"})
        + "\n"
    )
    assert [c.prompt for c in discover_clips([manifest])] == ["one?", "two?"]


def test_manifest_encodings(tmp_path):
    _noise(tmp_path / "café.wav")
    bom = tmp_path / "bom.csv"
    bom.write_bytes("\ufeffpath,id\ncafé.wav,x\n".encode())
    assert [c.clip_id for c in discover_clips([bom])] == ["x"]
    latin = tmp_path / "latin.csv"
    latin.write_bytes("path,id\nok.wav,1\ncafé.wav,2\n".encode("latin-1"))
    with pytest.raises(ValueError) as error:
        discover_clips([latin])
    assert str(error.value) == (
        f"{latin}, line 3: not UTF-8 (byte 0xe9 at column 4); save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)."
    )
    listed = tmp_path / "list.jsonl"
    listed.write_text('["café.wav"]\n')
    with pytest.raises(ValueError, match=r"list.jsonl, line 1: expected a JSON object .* got a list"):
        discover_clips([listed])


def test_a_non_utf8_file_name_is_captioned_and_shown(converted_fixture, tmp_path, capsys):
    folder = tmp_path / "clips"
    _noise(folder / "good.wav")
    raw = os.fsencode(folder) + b"/bad_\xff\xfe.wav"
    shutil.copyfile(folder / "good.wav", raw)  # a real file whose name is not UTF-8
    clips = discover_clips([folder])
    assert sorted(c.path for c in clips) == [str(folder / "bad_\\xff\\xfe.wav"), str(folder / "good.wav")]
    out = tmp_path / "out.jsonl"
    assert _caption_cli(converted_fixture.repo, [folder], out) == 0
    assert "af2 caption: 2 done, 0 failed" in capsys.readouterr().out
    rows = {row["path"]: row for row in _rows(out)}
    assert set(rows) == {str(folder / "bad_\\xff\\xfe.wav"), str(folder / "good.wav")}
    # The same audio under both names: the same answer.
    assert rows[str(folder / "bad_\\xff\\xfe.wav")]["answer"] == rows[str(folder / "good.wav")]["answer"]


def test_an_empty_prompt_is_refused(tmp_path):
    clip = _noise(tmp_path / "a.wav")
    with pytest.raises(ValueError, match=r"--prompt '': a prompt must hold a question"):
        caption([clip], tmp_path / "out.jsonl", prompts=[""], model=str(tmp_path / "never-loaded"))


def test_a_run_stopped_while_replacing_its_output_is_still_af2s(tmp_path, monkeypatch):
    """The record accepts the new file's stamp before the rename and drops the old one after: a run stopped between
    the two (here: the rename fails as a kill would leave it) resumes instead of refusing af2's own file."""
    out = tmp_path / "out.jsonl"
    store = RunStore(out)
    store.open({"a": 1})
    store.write_final(out, lambda tmp: tmp.write_text("old\n"))
    store.close()

    def killed(*args):
        raise KeyboardInterrupt

    store = RunStore(out)
    store.open({"a": 1})
    with monkeypatch.context() as patch:
        patch.setattr(os, "replace", killed)
        with pytest.raises(KeyboardInterrupt):
            store.write_final(out, lambda tmp: tmp.write_text("new, longer\n"))
    store.close()
    assert out.read_text() == "old\n"
    again = RunStore(out)
    assert again.open({"a": 1}) is True  # resumed, not refused
    again.write_final(out, lambda tmp: tmp.write_text("new, longer\n"))
    again.close()
    out.write_text("edited\n")  # a change by someone else is still seen
    with pytest.raises(OutputRefused, match="was not written by af2 caption, or was changed since"):
        RunStore(out).open({"a": 1})


def test_a_refusal_lists_ten_differences_and_counts_the_rest(tmp_path):
    out = tmp_path / "out.jsonl"
    store = RunStore(out)
    store.open({"audio": {f"clip{i:02d}": "1:1" for i in range(25)}})
    store.close()
    with pytest.raises(OutputRefused) as refused:
        RunStore(out).open({"audio": {f"clip{i:02d}": "2:2" for i in range(25)}})
    message = str(refused.value)
    assert "audio.clip00: was '1:1', now '2:2'" in message and "audio.clip09:" in message
    assert "audio.clip10:" not in message and "; and 15 more." in message


def _lock_refused_in_another_process(out) -> bool:
    code = (
        "import sys; from transformers_af2.runstore import OutputRefused, RunStore\n"
        "store = RunStore(sys.argv[1])\n"
        "try:\n    store.open({'a': 1})\nexcept OutputRefused:\n    sys.exit(3)\nstore.close()\n"
    )
    result = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True, timeout=300)
    assert result.returncode in (0, 3), result.stderr
    return result.returncode == 3


def test_the_lock_dies_with_its_process_while_forked_children_live(tmp_path):
    """A run killed with -9 whose forked children (DataLoader workers) live on leaves its output free at once."""
    out = tmp_path / "out.jsonl"
    code = (
        "import os, signal, sys, time; from transformers_af2.runstore import RunStore\n"
        "RunStore(sys.argv[1]).open({'a': 1})\n"
        "child = os.fork()\n"
        "if child == 0:\n    time.sleep(600); os._exit(0)\n"
        "print(child, flush=True); os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", code, str(out)], stdout=subprocess.PIPE, text=True)
    child = int(holder.stdout.readline())
    holder.wait(timeout=300)
    try:
        assert holder.returncode == -signal.SIGKILL
        os.kill(child, 0)  # the child still lives and holds the lock file open
        store = RunStore(out)
        store.open({"a": 1})  # taken over at once
        assert store.resumed
        store.close()
    finally:
        os.kill(child, signal.SIGKILL)


def test_caption_resume_refuses_another_quantization(repo_copy, tmp_path, capsys):
    """The same weights quantized are another model: a resume with or without --quantization is refused."""
    pytest.importorskip("bitsandbytes", reason="the [train] extra (bitsandbytes) is not installed")
    clip = _noise(tmp_path / "a.wav")
    out = tmp_path / "out.jsonl"
    assert _caption_cli(repo_copy, [clip], out, "--quantization", "bnb-8bit") == 0
    assert "quantized" in json.loads(Path(f"{out}.meta.json").read_text())["provenance"]["model"]["dtype"]
    assert _caption_cli(repo_copy, [clip], out) == 2
    error = _last_error(capsys)
    assert "model.dtype: was 'float32 quantized" in error and "now 'float32'" in error
    assert _caption_cli(repo_copy, [clip], out, "--quantization", "bnb-8bit") == 0  # the same again: a resume
    assert "0 done, 0 failed, 1 skipped" in capsys.readouterr().out
