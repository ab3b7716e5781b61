"""The inverse conversion (this package -> the original hub layout) against the parity fixture's original files."""

import json

import pytest
import torch

from transformers_af2.convert import ConversionError, convert_model, load_clap_pickle, read_safe_ckpt
from transformers_af2.convert.export import export_state_dict, write_original_layout
from transformers_af2.convert.renames import rename_safe_key


@pytest.fixture(scope="module")
def fixture_model(converted_fixture):
    model, _, _ = convert_model(converted_fixture.fixture_dir / "original", config=converted_fixture.yaml_path)
    return converted_fixture, model


def test_export_gives_back_the_original_safe_ckpt(fixture_model):
    """original -> converted -> original: every safe_ckpt tensor the model uses comes back under its own name, equal
    to the byte. Left out: what the converter drops on purpose, the hub's alias names, and the tied head."""
    fixture, model = fixture_model
    exported = export_state_dict(model.state_dict(), model.config.tie_word_embeddings)
    original = read_safe_ckpt(fixture.fixture_dir / "original")
    expected = {}
    for key, tensor in original.items():
        renamed = rename_safe_key(key)
        if renamed is None or renamed[0] != 0:  # dropped, or an alias of a canonical name
            continue
        if model.config.tie_word_embeddings and key == "lang_encoder.lm_head.weight":
            continue
        expected[key] = tensor
    assert sorted(exported) == sorted(expected)
    for key, tensor in expected.items():
        assert torch.equal(exported[key], tensor), key
    assert any(key.endswith(".attn.qkv.weight") for key in exported)  # q, k and v merged back in their order


def test_written_layout_converts_back_to_the_same_model(fixture_model, tmp_path):
    """converted -> original files (several chunks) -> converted: the same parameters and buffers."""
    fixture, model = fixture_model
    state = model.state_dict()
    directory = write_original_layout(state, model.config.tie_word_embeddings, tmp_path / "original", 1024**2)
    metadata = json.loads((directory / "safe_ckpt" / "metadata.json").read_text())
    assert len(metadata) > 1
    assert sum(len(keys) for keys in metadata.values()) == len(read_safe_ckpt(directory))
    tower = load_clap_pickle(directory / "clap_ckpt" / "epoch_16.pt")
    assert tower["module.audio_branch.bn0.running_var"].equal(state["model.audio_tower.batch_norm.running_var"])

    again, _, _ = convert_model(directory, config=fixture.yaml_path)
    again_state = again.state_dict()
    assert sorted(again_state) == sorted(state)
    for key, tensor in state.items():
        assert torch.equal(again_state[key], tensor), key


def test_key_without_a_place_in_the_original_is_an_error():
    state = {"model.language_model.norm.weight": torch.ones(2), "model.extra.weight": torch.ones(2)}
    with pytest.raises(ConversionError, match=r"model\.extra\.weight"):
        export_state_dict(state, tie_word_embeddings=True)
