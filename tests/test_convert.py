"""The converter on the parity fixtures: the written repo, strictness, safe pickle loading, on-the-fly conversion."""

import json
import os
import pickle
import re
import shutil
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModel, AutoProcessor

import transformers_af2
from transformers_af2.commands import main as af2_main
from transformers_af2.convert import (
    ConversionError,
    convert_checkpoint,
    convert_model,
    converted_cache_path,
    load_clap_pickle,
    staging_name,
)


def test_converted_repo_is_complete(converted_fixture):
    files = {p.name for p in converted_fixture.repo.iterdir()}
    for name in (
        "config.json",
        "model.safetensors",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "processor_config.json",
    ):
        assert name in files, f"{name} missing from {sorted(files)}"
    config = json.loads((converted_fixture.repo / "config.json").read_text())
    reference = converted_fixture.reference
    assert config["model_type"] == "audioflamingo2"
    assert config["audio_transformer_num_heads"] == reference["audio_transformer"]["n_head"]
    assert config["audio_transformer_num_layers"] == reference["audio_transformer"]["n_layers"]
    assert config["audio_transformer_intermediate_size"] == reference["audio_transformer"]["d_inner"]
    every = reference["xattn_every"]
    lm_layers = reference["lm"]["num_hidden_layers"]
    assert config["cross_attention_layers"] == [i for i in range(lm_layers) if (i + 1) % every == 0]
    assert config["audio_config"]["patch_embeds_hidden_size"] == reference["htsat"]["embed_dim"]
    assert config["audio_config"]["depths"] == reference["htsat"]["depths"]
    assert config["audio_config"]["num_attention_heads"] == reference["htsat"]["num_heads"]
    assert config["text_config"]["vocab_size"] == reference["vocab_size"]
    generation = json.loads((converted_fixture.repo / "generation_config.json").read_text())
    assert generation["eos_token_id"] == reference["special_tokens"]["<|endoftext|>"]
    weights = load_file(converted_fixture.repo / "model.safetensors")
    assert not any(".old_decoder_blocks." in k or "fusion_model" in k for k in weights)
    processor = AutoProcessor.from_pretrained(converted_fixture.repo)
    batch = processor(text=["a", "a much longer question than the first one"])
    assert batch["attention_mask"][0, 0] == 0 and batch["attention_mask"][0, -1] == 1  # left padding
    assert batch["input_ids"][0, 0] == reference["special_tokens"]["<|PAD_TOKEN|>"]
    clap = reference["clap_config"]
    assert processor.feature_extractor.max_num_window == clap["max_num_window"]
    assert processor.feature_extractor.window_length == clap["window_length"]


def test_tower_comes_from_safe_ckpt_not_clap_ckpt(converted_fixture):
    """fixture_a's clap_ckpt is a perturbed copy: the converted tower must equal safe_ckpt's."""
    if not converted_fixture.reference.get("clap_in_safe_ckpt", True):
        pytest.skip("this fixture's safe_ckpt has no tower: clap_ckpt is the only source")
    weights = load_file(converted_fixture.repo / "model.safetensors")
    original = {}
    for chunk in (converted_fixture.fixture_dir / "original" / "safe_ckpt").glob("*.safetensors"):
        original.update(load_file(chunk))
    assert torch.equal(weights["model.audio_tower.batch_norm.weight"], original["clap.nvclap.bn0.weight"])
    query, key, value = original["clap.nvclap.layers.0.blocks.0.attn.qkv.weight"].chunk(3)
    assert torch.equal(weights["model.audio_tower.layers.0.blocks.0.attention.self.key.weight"], key)


@pytest.fixture
def original_copy(converted_fixture, tmp_path):
    """A writable copy of the fixture's original-layout checkpoint."""
    destination = tmp_path / "original"
    shutil.copytree(converted_fixture.fixture_dir / "original", destination)
    return destination


def _rewrite_safe_ckpt(directory: Path, edit):
    metadata_path = directory / "safe_ckpt" / "metadata.json"
    metadata = json.loads(metadata_path.read_text())
    for chunk in metadata:
        path = directory / "safe_ckpt" / f"{chunk}.safetensors"
        tensors = edit(load_file(path))
        save_file(tensors, path)
        metadata[chunk] = list(tensors)
    metadata_path.write_text(json.dumps(metadata))


def test_missing_parameter_is_listed(converted_fixture, original_copy):
    def drop(tensors):
        return {k: v for k, v in tensors.items() if "audio_transformer_clap.layer_norm" not in k}

    _rewrite_safe_ckpt(original_copy, drop)
    with pytest.raises(ConversionError, match=r"filled by no source: \['model.audio_transformer.layer_norm.bias'"):
        convert_model(original_copy, config=converted_fixture.yaml_path)


def test_unknown_key_is_an_error(converted_fixture, original_copy):
    def add(tensors):
        if "lang_encoder.model.norm.weight" in tensors:
            tensors["lang_encoder.model.mystery.weight"] = torch.zeros(3)
        return tensors

    _rewrite_safe_ckpt(original_copy, add)
    with pytest.raises(ConversionError, match="lang_encoder.model.mystery.weight"):
        convert_model(original_copy, config=converted_fixture.yaml_path)


def test_shape_mismatches_are_reported_together(converted_fixture, original_copy):
    def shrink(tensors):
        for key in list(tensors):
            if key.endswith("audio_transformer_clap.layer_norm.weight") or key == "lang_encoder.model.norm.weight":
                tensors[key] = tensors[key][:-1].clone()
        return tensors

    _rewrite_safe_ckpt(original_copy, shrink)
    with pytest.raises(ConversionError) as error:
        convert_model(original_copy, config=converted_fixture.yaml_path)
    message = str(error.value)
    assert "model.audio_transformer.layer_norm.weight: shape" in message
    assert "model.language_model.norm.weight: shape" in message


def test_wrong_head_count_in_config_is_caught(converted_fixture, original_copy, tmp_path):
    import yaml

    config = yaml.safe_load(converted_fixture.yaml_path.read_text())
    dim = converted_fixture.reference["htsat"]["embed_dim"] * 2 ** (
        len(converted_fixture.reference["htsat"]["depths"]) - 1
    )
    heads = config["model_config"]["audio_transformer_kwargs"]["n_head"]
    # A head count whose rotary width differs from the stored frequencies must be refused.
    wrong = next(
        h
        for h in (1, 2, 4, 8, 16)
        if h != heads and dim % h == 0 and max(dim // h // 2, 32) != max(dim // heads // 2, 32)
    )
    config["model_config"]["audio_transformer_kwargs"]["n_head"] = wrong
    path = tmp_path / "wrong.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(ConversionError, match="rotary frequencies"):
        convert_model(original_copy, config=path)


def test_truncated_safetensors_gives_a_clear_error(converted_fixture, original_copy):
    chunk = sorted((original_copy / "safe_ckpt").glob("*.safetensors"))[0]
    data = chunk.read_bytes()
    chunk.write_bytes(data[: len(data) // 2])
    with pytest.raises(ConversionError, match="truncated"):
        convert_model(original_copy, config=converted_fixture.yaml_path)


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch /tmp/af2-pwned-by-pickle",))


def test_malicious_clap_pickle_is_refused(tmp_path):
    marker = Path("/tmp/af2-pwned-by-pickle")
    marker.unlink(missing_ok=True)
    path = tmp_path / "epoch_16.pt"
    with open(path, "wb") as handle:
        pickle.dump({"epoch": 1, "state_dict": {}, "best_metric": _Exploit()}, handle)
    with pytest.raises(ConversionError, match="refused to load"):
        load_clap_pickle(path)
    assert not marker.exists()


def test_real_clap_pickle_loads_with_the_allow_list(converted_fixture):
    state = load_clap_pickle(converted_fixture.fixture_dir / "original" / "clap_ckpt" / "epoch_16.pt")
    assert any(k.startswith("module.audio_branch.") for k in state)


def test_cli_convert_and_atomic_output(converted_fixture, tmp_path, capsys):
    output = tmp_path / "cli-out"
    code = af2_main(
        [
            "convert",
            str(converted_fixture.fixture_dir / "original"),
            str(output),
            "--config",
            str(converted_fixture.yaml_path),
            "--dtype",
            "bfloat16",
        ]
    )
    assert code == 0
    model = AutoModel.from_pretrained(output)
    assert model.lm_head.weight.dtype == torch.bfloat16
    # A failing conversion leaves nothing behind.
    failed = tmp_path / "failed-out"
    code = af2_main(["convert", str(tmp_path / "does-not-exist"), str(failed)])
    assert code == 2
    assert "error" in capsys.readouterr().err
    assert not failed.exists() and not list(tmp_path.glob(".failed-out*"))


def test_from_pretrained_converts_original_layout_and_caches(converted_fixture, tmp_path, monkeypatch):
    monkeypatch.setenv("AF2_CACHE", str(tmp_path / "cache"))
    source = tmp_path / "original"
    shutil.copytree(converted_fixture.fixture_dir / "original", source)
    (source / "configs").mkdir()
    shutil.copy(converted_fixture.yaml_path, source / "configs" / "inference.yaml")
    model = transformers_af2.AudioFlamingo2ForConditionalGeneration.from_pretrained(source)
    cached = [p for p in (tmp_path / "cache").iterdir() if p.is_dir()]
    assert len(cached) == 1 and (cached[0] / "config.json").is_file()
    reference = AutoModel.from_pretrained(converted_fixture.repo)
    for (name, ours), (_, theirs) in zip(model.state_dict().items(), reference.state_dict().items()):
        assert torch.equal(ours, theirs), name
    # The second call reuses the cache.
    mtime = (cached[0] / "model.safetensors").stat().st_mtime_ns
    transformers_af2.AudioFlamingo2ForConditionalGeneration.from_pretrained(source)
    assert (cached[0] / "model.safetensors").stat().st_mtime_ns == mtime


# ---------------------------------------------------------------------------------------------------------------------
# The output folder: only an earlier conversion is ever replaced
# ---------------------------------------------------------------------------------------------------------------------


def _convert_cli(source, output, yaml_path, *extra) -> int:
    return af2_main(["convert", str(source), str(output), "--config", str(yaml_path), "--quiet", *extra])


def test_output_that_is_not_a_conversion_is_refused_unless_overwrite(converted_fixture, tmp_path, capsys):
    source = converted_fixture.fixture_dir / "original"
    output = tmp_path / "my-files"
    output.mkdir()
    (output / "thesis.tex").write_text("years of work")
    assert _convert_cli(source, output, converted_fixture.yaml_path) == 2
    assert "is not an earlier AF2 conversion" in capsys.readouterr().err
    assert (output / "thesis.tex").read_text() == "years of work"
    # A fine-tune saved with save_pretrained is an AF2 repository but not a conversion: kept as well.
    shutil.copytree(converted_fixture.repo, tmp_path / "fine-tune")
    (tmp_path / "fine-tune" / "af2_conversion.json").unlink()
    assert _convert_cli(source, tmp_path / "fine-tune", converted_fixture.yaml_path) == 2
    assert (tmp_path / "fine-tune" / "model.safetensors").is_file()
    # A plain file is not replaced either.
    (tmp_path / "notes.txt").write_text("keep")
    assert _convert_cli(source, tmp_path / "notes.txt", converted_fixture.yaml_path) == 2
    assert (tmp_path / "notes.txt").read_text() == "keep"
    # Asked explicitly, the folder is replaced by the conversion.
    assert _convert_cli(source, output, converted_fixture.yaml_path, "--overwrite") == 0
    assert not (output / "thesis.tex").exists() and (output / "af2_conversion.json").is_file()


def test_output_equal_to_inside_or_containing_the_source_is_refused(original_copy, converted_fixture, tmp_path):
    before = sorted(p.relative_to(original_copy) for p in original_copy.rglob("*"))
    link = tmp_path / "link-to-source"
    link.symlink_to(original_copy)
    for output in (original_copy, original_copy / "converted", tmp_path, link, original_copy / ".." / "original"):
        with pytest.raises(ConversionError, match="the source checkpoint"):
            convert_checkpoint(original_copy, output, config=converted_fixture.yaml_path, overwrite=True)
        assert _convert_cli(original_copy, output, converted_fixture.yaml_path, "--overwrite") == 2
    assert sorted(p.relative_to(original_copy) for p in original_copy.rglob("*")) == before
    assert link.is_symlink()


def test_output_holding_the_current_or_home_directory_is_refused(converted_fixture, tmp_path, monkeypatch):
    workdir = tmp_path / "work"
    workdir.mkdir()
    (workdir / "notes.txt").write_text("keep")
    monkeypatch.chdir(workdir)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    for output in (".", str(tmp_path), str(tmp_path / "home")):
        assert (
            _convert_cli(
                converted_fixture.fixture_dir / "original", output, converted_fixture.yaml_path, "--overwrite"
            )
            == 2
        )
    assert (workdir / "notes.txt").read_text() == "keep" and (tmp_path / "home").is_dir()


def test_reconversion_replaces_the_earlier_one_and_deletes_no_other_path(converted_fixture, tmp_path):
    source = converted_fixture.fixture_dir / "original"
    output = tmp_path / "out"
    (tmp_path / "out.old").mkdir()
    (tmp_path / "out.old" / "keep.txt").write_text("mine")
    assert _convert_cli(source, output, converted_fixture.yaml_path) == 0
    first = (output / "model.safetensors").stat().st_mtime_ns
    assert _convert_cli(source, output, converted_fixture.yaml_path, "--dtype", "bfloat16") == 0
    assert (output / "model.safetensors").stat().st_mtime_ns != first
    assert AutoModel.from_pretrained(output).lm_head.weight.dtype == torch.bfloat16
    assert (tmp_path / "out.old" / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "out.old"]  # no backup or staging left


def test_output_is_readable_like_save_pretrained(converted_fixture, tmp_path):
    old_umask = os.umask(0o022)
    try:
        convert_checkpoint(
            converted_fixture.fixture_dir / "original", tmp_path / "out", config=converted_fixture.yaml_path
        )
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o755
    for file in (tmp_path / "out").iterdir():
        assert stat.S_IMODE(file.stat().st_mode) == 0o644, file.name


_HOLD_STAGING = """
import os, sys, time
staging = sys.argv[1].replace("PID", str(os.getpid()))
os.mkdir(staging)
with open(os.path.join(staging, "model.safetensors"), "wb") as handle:
    handle.write(b"0" * 100000)
print(staging, flush=True)
time.sleep(120)
"""


def _process_holding(output: Path, tag: str) -> tuple[subprocess.Popen, Path]:
    """A real process that created a staging folder the way a conversion names it, then waits."""
    name = output.with_name(staging_name(output, tag, "PID"))
    process = subprocess.Popen([sys.executable, "-c", _HOLD_STAGING, str(name)], stdout=subprocess.PIPE, text=True)
    return process, Path(process.stdout.readline().strip())


def test_staging_left_by_a_killed_conversion_is_removed(converted_fixture, tmp_path):
    output = tmp_path / "out"
    killed, stale = _process_holding(output, "af2-staging")
    running, live = _process_holding(output, "af2-staging")
    killed_backup, backup = _process_holding(output, "af2-replaced")
    try:
        for process in (killed, killed_backup):
            os.kill(process.pid, signal.SIGKILL)
            process.wait()
        assert stale.is_dir() and live.is_dir() and backup.is_dir()
        # A backup whose replacement never landed (killed between the two renames) is put back, then replaced.
        (backup / "af2_conversion.json").write_text("{}")
        (backup / "config.json").write_text('{"model_type": "audioflamingo2"}')
        convert_checkpoint(converted_fixture.fixture_dir / "original", output, config=converted_fixture.yaml_path)
        assert not stale.exists() and not backup.exists()
        assert live.is_dir()  # its process still runs
        assert (output / "model.safetensors").stat().st_size > 100000
    finally:
        running.kill()
        running.wait()


# ---------------------------------------------------------------------------------------------------------------------
# Weights and files the converter must not take silently
# ---------------------------------------------------------------------------------------------------------------------


def test_non_finite_weights_are_an_error_naming_the_tensors(converted_fixture, original_copy):
    def poison(tensors):
        for key in tensors:
            if key == "audio_transformer_clap.layer_norm.weight":
                tensors[key][0] = float("nan")
            if key == "lang_encoder.model.norm.weight":
                tensors[key][1] = float("inf")
        return tensors

    _rewrite_safe_ckpt(original_copy, poison)
    with pytest.raises(ConversionError, match="2 tensors hold NaN or infinite") as error:
        convert_model(original_copy, config=converted_fixture.yaml_path)
    assert "model.audio_transformer.layer_norm.weight" in str(error.value)
    assert "model.language_model.norm.weight" in str(error.value)


def test_weights_beyond_the_target_dtype_are_an_error(converted_fixture, original_copy):
    def enlarge(tensors):
        if "lang_encoder.model.norm.weight" in tensors:
            tensors["lang_encoder.model.norm.weight"][0] = 1e6  # float16 tops out at 65504
        return tensors

    _rewrite_safe_ckpt(original_copy, enlarge)
    convert_model(original_copy, config=converted_fixture.yaml_path, dtype="bfloat16")  # in range
    with pytest.raises(ConversionError, match=r"cast to torch.float16.*model.language_model.norm.weight"):
        convert_model(original_copy, config=converted_fixture.yaml_path, dtype="float16")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_safe_ckpt_converts(converted_fixture, original_copy, dtype):
    _rewrite_safe_ckpt(
        original_copy, lambda tensors: {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    )
    model, _, _ = convert_model(original_copy, config=converted_fixture.yaml_path, dtype=dtype)
    reference = load_file(converted_fixture.repo / "model.safetensors")
    weight = model.state_dict()["model.audio_transformer.layer_norm.weight"]
    assert weight.dtype == dtype
    assert torch.equal(weight, reference["model.audio_transformer.layer_norm.weight"].to(dtype))


def test_truncated_clap_ckpt_is_reported_as_truncated(original_copy):
    path = original_copy / "clap_ckpt" / "epoch_16.pt"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ConversionError, match="truncated or corrupt") as error:
        load_clap_pickle(path)
    assert "execute code" not in str(error.value)


def test_a_directory_where_a_file_is_expected_is_named(converted_fixture, original_copy, tmp_path):
    with pytest.raises(ConversionError, match=r"--config .* is a directory; expected the inference YAML"):
        convert_model(original_copy, config=tmp_path)
    clap = original_copy / "clap_ckpt" / "epoch_16.pt"
    clap.unlink()
    clap.mkdir()
    with pytest.raises(ConversionError, match=r"epoch_16.pt is a directory; expected a CLAP checkpoint"):
        convert_model(original_copy, config=converted_fixture.yaml_path)
    chunk = sorted((original_copy / "safe_ckpt").glob("*.safetensors"))[0]
    chunk.unlink()
    chunk.mkdir()
    with pytest.raises(ConversionError, match=r"safetensors is a directory; expected a safetensors file"):
        convert_model(original_copy, config=converted_fixture.yaml_path)


def test_duplicate_keys_across_chunks_are_an_error(converted_fixture, original_copy):
    chunks = sorted((original_copy / "safe_ckpt").glob("*.safetensors"))
    first, second = load_file(chunks[0]), load_file(chunks[1])
    key = next(iter(first))
    second[key] = first[key] + 1
    save_file(second, chunks[1])
    with pytest.raises(ConversionError, match=rf"1 keys appear in several safe_ckpt chunks: \['{re.escape(key)} \(in"):
        convert_model(original_copy, config=converted_fixture.yaml_path)


@pytest.mark.parametrize("escape", ["../outside", "ABSOLUTE"])
def test_chunk_names_reaching_outside_the_checkpoint_are_refused(converted_fixture, original_copy, escape):
    metadata_path = original_copy / "safe_ckpt" / "metadata.json"
    metadata = json.loads(metadata_path.read_text())
    chunk = sorted(metadata)[-1]
    outside = original_copy / "outside" if escape != "ABSOLUTE" else original_copy.parent / "elsewhere"
    # A valid chunk placed outside safe_ckpt/: the old reader followed the name and converted it.
    shutil.move(original_copy / "safe_ckpt" / f"{chunk}.safetensors", f"{outside}.safetensors")
    name = escape if escape != "ABSOLUTE" else str(outside)
    metadata[name] = metadata.pop(chunk)
    metadata_path.write_text(json.dumps(metadata))
    with pytest.raises(ConversionError, match="must be plain file names inside safe_ckpt"):
        convert_model(original_copy, config=converted_fixture.yaml_path)


def test_cache_key_follows_the_content_of_the_config(converted_fixture, original_copy, tmp_path):
    config = tmp_path / "inference.yaml"
    shutil.copy(converted_fixture.yaml_path, config)
    first = converted_cache_path(original_copy, config=config)
    assert converted_cache_path(original_copy, config=config) == first
    config.write_text(config.read_text().replace("max_num_window", "max_num_window: 3\n  old_max_num_window"))
    assert converted_cache_path(original_copy, config=config) != first
    assert converted_cache_path(original_copy, config=config, dtype="bfloat16") != converted_cache_path(
        original_copy, config=config
    )
