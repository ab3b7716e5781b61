"""The converter on the parity fixtures: the written repo, strictness, safe pickle loading, on-the-fly conversion."""

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModel, AutoProcessor

import transformers_af2
from transformers_af2.cli import main as af2_main
from transformers_af2.convert import ConversionError, convert_model, load_clap_pickle


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
    source = converted_fixture.fixture_dir / "original"
    model = transformers_af2.AudioFlamingo2ForConditionalGeneration.from_pretrained(
        source, original_config=converted_fixture.yaml_path
    )
    cached = list((tmp_path / "cache").iterdir())
    assert len(cached) == 1 and (cached[0] / "config.json").is_file()
    reference = AutoModel.from_pretrained(converted_fixture.repo)
    for (name, ours), (_, theirs) in zip(model.state_dict().items(), reference.state_dict().items()):
        assert torch.equal(ours, theirs), name
    # The second call reuses the cache.
    mtime = (cached[0] / "model.safetensors").stat().st_mtime_ns
    transformers_af2.AudioFlamingo2ForConditionalGeneration.from_pretrained(
        source, original_config=converted_fixture.yaml_path
    )
    assert (cached[0] / "model.safetensors").stat().st_mtime_ns == mtime
