"""
Original-layout checkpoints by hub id in every transformers entry point (transformers_af2.hub_ids), on a real hub cache
in a temporary HF_HOME: `models--org--name/refs/main` and `snapshots/<commit>/...` with blobs, as huggingface_hub
writes it. The parity fixture is published there in the original layout as `af2test/tiny-af2`, next to the base
model its configs/inference.yaml names, `af2test/tiny-qwen2` (also a complete plain Qwen2 repository).
"""

import hashlib
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
import yaml
from conftest import write_original_config

from transformers_af2.convert import ConversionError

AF2_ID = "af2test/tiny-af2"
BASE_ID = "af2test/tiny-qwen2"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
SRC = Path(__file__).resolve().parents[1] / "src"


def publish(hub: Path, repo_id: str, files: dict[str, Path | bytes], commit: str = COMMIT) -> Path:
    """Writes `files` (path in the repo -> file or bytes) into the hub cache the way huggingface_hub stores them."""
    repo = hub / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "blobs").mkdir(exist_ok=True)
    for name, content in files.items():
        data = content.read_bytes() if isinstance(content, Path) else content
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = repo / "snapshots" / commit / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    return repo / "snapshots" / commit


def original_files(fixture_dir: Path, inference_yaml: bytes | None) -> dict[str, Path | bytes]:
    original = fixture_dir / "original"
    files = {str(p.relative_to(original)): p for p in original.rglob("*") if p.is_file()}
    if inference_yaml is not None:
        files["configs/inference.yaml"] = inference_yaml
    return files


def inference_yaml_naming(fixture_dir: Path, tmp_path: Path, base_id: str) -> bytes:
    """The fixture's configs/inference.yaml with the base model given as a hub id, as the released ones do."""
    config = yaml.safe_load(write_original_config(fixture_dir, tmp_path / "inference.yaml").read_text())
    config["model_config"]["lang_encoder_path"] = base_id
    config["model_config"]["tokenizer_path"] = base_id
    return yaml.safe_dump(config).encode()


def base_model_files(fixture_dir: Path, work: Path) -> dict[str, Path | bytes]:
    """A complete tiny Qwen2 repository (config, weights, tokenizer) with the fixture's base-model config."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = json.loads((fixture_dir / "base_lm_config.json").read_text())
    for key in ("_attn_implementation_autoset", "transformers_version"):
        config.pop(key, None)
    torch.manual_seed(0)
    Qwen2ForCausalLM(Qwen2Config(**config)).save_pretrained(work / "qwen2")
    files = {p.name: p for p in (work / "qwen2").iterdir()}
    files.update({p.name: p for p in (fixture_dir / "base_tokenizer").iterdir()})
    return files


@pytest.fixture(scope="module")
def hf_home(converted_fixture, tmp_path_factory):
    """An HF_HOME whose hub cache holds the original-layout AF2 repo and its base model, nothing converted yet."""
    home = tmp_path_factory.mktemp("hf_home")
    work = tmp_path_factory.mktemp("hub_work")
    fixture_dir = converted_fixture.fixture_dir
    publish(home / "hub", BASE_ID, base_model_files(fixture_dir, work))
    publish(home / "hub", AF2_ID, original_files(fixture_dir, inference_yaml_naming(fixture_dir, work, BASE_ID)))
    # An original-layout fine-tune whose configs/ does not say which base model it has.
    publish(home / "hub", "af2test/no-yaml", original_files(fixture_dir, None))
    return home


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """In-process tests run offline: only the hub caches they build are read (subprocesses set HF_HUB_OFFLINE)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


def run_python(script: str, env_extra: dict, *args) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1", **env_extra}
    env.pop("AF2_CACHE", None)
    return subprocess.Popen(
        [sys.executable, "-c", script, *map(str, args)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


_EVERY_ENTRY_POINT = """
import json, sys, torch
from transformers import (AutoConfig, AutoFeatureExtractor, AutoModel, AutoModelForMultimodalLM, AutoProcessor,
                          AutoTokenizer, pipeline)
import transformers_af2

model_id, wav, prompt, max_new = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
out = {"model_type": AutoConfig.from_pretrained(model_id).model_type}
model = AutoModel.from_pretrained(model_id)
processor = AutoProcessor.from_pretrained(model_id)
with torch.inference_mode():
    out["generate"] = model.generate(**processor(text=prompt, audio=wav), do_sample=False,
                                     max_new_tokens=max_new)[0].tolist()
out["multimodal_lm"] = type(AutoModelForMultimodalLM.from_pretrained(model_id)).__name__
out["af2_class"] = transformers_af2.AudioFlamingo2ForConditionalGeneration.from_pretrained(model_id).num_parameters()
out["tokenizer_length"] = len(AutoTokenizer.from_pretrained(model_id))
out["feature_extractor"] = type(AutoFeatureExtractor.from_pretrained(model_id)).__name__
pipe = pipeline("audio-text-to-text", model=model_id, device="cpu")
out["pipeline"] = pipe(audio=wav, text=prompt, max_new_tokens=max_new, return_tensors=True)[0]["generated_token_ids"].tolist()
any_to_any = pipeline("any-to-any", model=model_id, device="cpu")
messages = [{"role": "user", "content": [{"type": "audio", "path": wav}, {"type": "text", "text": prompt}]}]
out["any_to_any"] = any_to_any(text=messages, max_new_tokens=max_new, return_full_text=False)[0]["generated_text"]
out["answer"] = processor.decode_answers([out["pipeline"]])[0]
print(json.dumps(out))
"""


def test_bare_hub_id_in_every_entry_point_two_processes_offline(converted_fixture, hf_home):
    """Two processes start on the same id at once, offline: one converts, both get the fixture's greedy ids from
    AutoModel, pipeline("audio-text-to-text") and pipeline("any-to-any")."""
    fixture = converted_fixture
    prompt, wav = fixture.reference["prompts"][1], fixture.wav(1)
    args = (AF2_ID, wav, prompt, fixture.reference["max_new_tokens"])
    env = {"HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"}
    processes = [run_python(_EVERY_ENTRY_POINT, env, *args) for _ in range(2)]
    outputs = [process.communicate(timeout=600) for process in processes]
    for process, (_, stderr) in zip(processes, outputs):
        assert process.returncode == 0, stderr[-3000:]
    expected = fixture.ids("s1.greedy_ids")[0].tolist()
    prompt_length = fixture.ids("s1.prompt_ids").shape[1]
    for stdout, _ in outputs:
        result = json.loads(stdout.strip().splitlines()[-1])
        assert result["model_type"] == "audioflamingo2"
        assert result["generate"] == expected
        assert result["pipeline"] == expected[prompt_length:]
        assert result["any_to_any"] == result["answer"]
        assert result["multimodal_lm"] == "AudioFlamingo2ForConditionalGeneration"
        assert result["tokenizer_length"] == fixture.reference["vocab_size"]
        assert result["feature_extractor"] == "AudioFlamingo2FeatureExtractor"
    conversions = sum(stderr.count(f"Converting {AF2_ID} from the original layout") for _, stderr in outputs)
    assert conversions == 1
    cached = [p for p in (hf_home / "transformers_af2").iterdir() if p.is_dir()]
    assert len(cached) == 1 and (cached[0] / "af2_conversion.json").is_file()
    assert json.loads((cached[0] / "af2_conversion.json").read_text())["revision"] == COMMIT


_COUNT_REQUESTS = """
import http.server, json, os, sys, threading

requests = []

class Hub(http.server.BaseHTTPRequestHandler):
    def _answer(self):
        requests.append(f"{self.command} {self.path}")
        self.send_response(501)  # a hub that answers nothing: huggingface_hub falls back to its cache
        self.send_header("Content-Length", "0")
        self.end_headers()
    do_GET = do_HEAD = do_POST = _answer
    def log_message(self, *args):
        pass

server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hub)
threading.Thread(target=server.serve_forever, daemon=True).start()
os.environ["HF_ENDPOINT"] = f"http://127.0.0.1:{server.server_port}"

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer, pipeline

def load(model_id):
    start = len(requests)
    AutoConfig.from_pretrained(model_id)
    AutoModelForCausalLM.from_pretrained(model_id)
    AutoModel.from_pretrained(model_id)
    AutoTokenizer.from_pretrained(model_id)
    pipeline("text-generation", model=model_id, device="cpu")
    return requests[start:]

model_id = sys.argv[1]
without = load(model_id)
import transformers_af2
with_af2 = load(model_id)
print(json.dumps({"without": without, "with": with_af2}))
"""


def test_other_ids_go_to_transformers_without_extra_requests(hf_home):
    """A plain Qwen2 repository loads as before, and importing transformers_af2 adds no request to the hub."""
    process = run_python(_COUNT_REQUESTS, {"HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "0"}, BASE_ID)
    stdout, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stderr[-3000:]
    result = json.loads(stdout.strip().splitlines()[-1])
    assert result["without"], "the stand-in hub saw no request at all: the comparison would prove nothing"
    # Every request made with transformers_af2 imported was made without it, as often (the second round may make
    # fewer: huggingface_hub remembers the files a commit lacks, and a few calls happen once per process).
    assert not Counter(result["with"]) - Counter(result["without"])
    assert len(result["with"]) >= len(result["without"]) - 3
    assert not any("safe_ckpt" in request for request in result["with"])


def test_original_layout_without_base_model_names_the_id_and_the_option(hf_home, tmp_path, monkeypatch):
    from transformers import AutoConfig, AutoModel

    monkeypatch.setenv("AF2_CACHE", str(tmp_path / "conversions"))
    for load in (AutoConfig.from_pretrained, AutoModel.from_pretrained):
        with pytest.raises(ConversionError) as error:
            load("af2test/no-yaml", cache_dir=hf_home / "hub", local_files_only=True)
        message = str(error.value)
        assert "af2test/no-yaml" in message and "configs/inference.yaml is missing" in message
        assert "--config" in message and "af2 convert af2test/no-yaml" in message
    assert not [p for p in (tmp_path / "conversions").glob("*") if p.is_dir()]  # nothing half-written left


def test_revision_is_part_of_the_cache_key(converted_fixture, hf_home, tmp_path, monkeypatch):
    from transformers import AutoConfig

    from transformers_af2.hub_ids import original_layout_location

    monkeypatch.setenv("AF2_CACHE", str(tmp_path / "conversions"))
    hub = tmp_path / "hub"
    fixture_dir = converted_fixture.fixture_dir
    publish(
        hub,
        BASE_ID,
        {"config.json": fixture_dir / "base_lm_config.json"}
        | {p.name: p for p in (fixture_dir / "base_tokenizer").iterdir()},
    )
    files = original_files(fixture_dir, inference_yaml_naming(fixture_dir, tmp_path, BASE_ID))
    publish(hub, AF2_ID, files, commit="1" * 40)
    publish(hub, AF2_ID, files, commit="2" * 40)  # refs/main now points here
    kwargs = {"cache_dir": hub, "local_files_only": True}
    first = original_layout_location(AF2_ID, revision="1" * 40, **kwargs)
    second = original_layout_location(AF2_ID, **kwargs)
    assert first != second
    assert json.loads((first / "af2_conversion.json").read_text())["revision"] == "1" * 40
    assert json.loads((second / "af2_conversion.json").read_text())["revision"] == "2" * 40
    # Asked again (any entry point), the conversion is reused, not redone.
    mtime = (second / "model.safetensors").stat().st_mtime_ns
    assert AutoConfig.from_pretrained(AF2_ID, **kwargs).model_type == "audioflamingo2"
    assert original_layout_location(AF2_ID, **kwargs) == second
    assert (second / "model.safetensors").stat().st_mtime_ns == mtime
    assert len(list((tmp_path / "conversions").glob("*/model.safetensors"))) == 2


def test_local_original_layout_directory_and_uninstall(converted_fixture, tmp_path, monkeypatch):
    from transformers import AutoConfig, AutoModel

    from transformers_af2 import hub_ids

    monkeypatch.setenv("AF2_CACHE", str(tmp_path / "conversions"))
    source = tmp_path / "my-finetune"
    for name, content in original_files(
        converted_fixture.fixture_dir, converted_fixture.yaml_path.read_bytes()
    ).items():
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        (source / name).write_bytes(content if isinstance(content, bytes) else content.read_bytes())
    model = AutoModel.from_pretrained(source)
    reference = AutoModel.from_pretrained(converted_fixture.repo)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.state_dict().values()))
    hub_ids.uninstall()
    try:
        with pytest.raises((OSError, ValueError)):
            AutoConfig.from_pretrained(source)  # transformers' own behaviour again
    finally:
        hub_ids.install()
    assert AutoConfig.from_pretrained(source).model_type == "audioflamingo2"


def test_af2_convert_takes_any_original_layout_hub_id(converted_fixture, hf_home, tmp_path, monkeypatch):
    from huggingface_hub import constants
    from safetensors.torch import load_file

    from transformers_af2.commands import main as af2_main

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hf_home / "hub"))
    output = tmp_path / "tiny-af2-hf"
    assert af2_main(["convert", AF2_ID, str(output), "--revision", COMMIT, "--quiet"]) == 0
    provenance = json.loads((output / "af2_conversion.json").read_text())
    assert provenance["source"] == AF2_ID and provenance["revision"] == COMMIT
    ours, reference = load_file(output / "model.safetensors"), load_file(converted_fixture.repo / "model.safetensors")
    assert ours.keys() == reference.keys() and all(torch.equal(ours[k], reference[k]) for k in reference)
