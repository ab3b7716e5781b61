"""CPU linear kernels chosen per machine (`modeling.cpu_linear`): routed without changing any module's class, same
products as `nn.Linear`, measured once and cached per CPU, overridable by `$AF2_LINEAR_KERNELS`."""

import json

import pytest
import torch
from conftest import random_audio_inputs, tiny_model
from torch import nn

from transformers_af2.commands import main
from transformers_af2.loading import load_model_and_processor
from transformers_af2.modeling.cpu_linear import (
    DEFAULT_KERNELS,
    FAST_KERNELS,
    LinearKernels,
    choose_linear_kernels,
    linear_kernels_of,
    use_linear_kernels,
)

KERNEL_SETS = [
    LinearKernels(few_rows="weight_major"),
    LinearKernels(many_rows="onednn"),
    FAST_KERNELS,
]


def _inputs(model):
    features, mask = random_audio_inputs([2, 1])
    ids = torch.tensor([[model.config.audio_token_id, 5, 6, 7, model.config.sep_token_id]] * 2)
    return dict(input_ids=ids, input_features=features, input_features_mask=mask)


@pytest.mark.parametrize("kernels", KERNEL_SETS, ids=str)
def test_routed_linears_keep_their_class_and_results(kernels):
    model = tiny_model()
    inputs = _inputs(model)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    with torch.no_grad():
        expected = model(**inputs).logits
        assert use_linear_kernels(model, kernels) == len(linears)
        assert all(type(m) is nn.Linear and linear_kernels_of(m) == kernels for m in linears)
        # Prefill rows (> 16) and decoding rows (2 per step for this batch) both go through the routed kernels.
        torch.testing.assert_close(model(**inputs).logits, expected, atol=1e-5, rtol=0)
        assert use_linear_kernels(model, DEFAULT_KERNELS) == 0
        assert all("forward" not in m.__dict__ for m in linears)
        assert torch.equal(model(**inputs).logits, expected)


def test_routed_linears_train_through_the_default_path():
    model = tiny_model()
    use_linear_kernels(model, FAST_KERNELS)
    layer = model.model.audio_tower.layers[0].blocks[0].attention.self.query
    x = torch.randn(40, layer.in_features, requires_grad=True)
    layer(x).sum().backward()
    assert layer.weight.grad is not None and x.grad is not None


def test_auto_measures_once_and_reads_the_cache(tmp_path):
    model = tiny_model()
    kernels = choose_linear_kernels(model, "auto", cache_dir=tmp_path)
    path = tmp_path / "linear-kernels.json"
    stored = json.loads(path.read_text())
    ((key, entry),) = stored.items()
    assert f"{torch.get_num_threads()} threads" in key and "torch.float32" in key
    assert LinearKernels.parse(entry["kernels"]) == kernels
    assert set(entry["seconds"]) == {"few_rows_4", "many_rows_256"}
    assert all(v > 0 for timings in entry["seconds"].values() for v in timings.values())

    # A later use reads the cached choice, whatever it is, instead of measuring again.
    other = LinearKernels(few_rows="weight_major") if kernels.few_rows == "default" else DEFAULT_KERNELS
    entry["kernels"] = str(other)
    path.write_text(json.dumps({key: entry}))
    assert choose_linear_kernels(model, "auto", cache_dir=tmp_path) == other
    # auto:remeasure replaces it with a fresh measurement.
    remeasured = choose_linear_kernels(model, "auto:remeasure", cache_dir=tmp_path)
    fresh = json.loads(path.read_text())[key]
    assert fresh["seconds"] != entry["seconds"] and LinearKernels.parse(fresh["kernels"]) == remeasured


def test_environment_overrides_and_bad_settings(monkeypatch):
    model = tiny_model()
    monkeypatch.setenv("AF2_LINEAR_KERNELS", "few_rows=weight_major,many_rows=default")
    assert choose_linear_kernels(model) == LinearKernels(few_rows="weight_major")
    monkeypatch.setenv("AF2_LINEAR_KERNELS", "fast")
    assert choose_linear_kernels(model) == FAST_KERNELS
    with pytest.raises(ValueError, match="linear kernel few_rows='blas' is not one of default, weight_major"):
        choose_linear_kernels(model, "few_rows=blas")
    with pytest.raises(ValueError, match=r"AF2_LINEAR_KERNELS='auto:sometimes'"):
        choose_linear_kernels(model, "auto:sometimes")


def test_load_model_and_processor_applies_the_environment(converted_fixture, monkeypatch):
    monkeypatch.setenv("AF2_LINEAR_KERNELS", "fast")
    model, _ = load_model_and_processor(str(converted_fixture.repo), device="cpu")
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert linears and all(type(m) is nn.Linear and linear_kernels_of(m) == FAST_KERNELS for m in linears)
    monkeypatch.delenv("AF2_LINEAR_KERNELS")
    model, _ = load_model_and_processor(str(converted_fixture.repo), device="cpu")
    assert all(linear_kernels_of(m) == DEFAULT_KERNELS for m in model.modules() if isinstance(m, nn.Linear))


@pytest.mark.parametrize(
    "device, flags, dtype, kernels",
    [
        ("cpu", {"avx2", "avx512f", "avx512_bf16"}, "bfloat16", "auto"),
        ("cpu", {"avx2", "amx_bf16", "amx_tile"}, "bfloat16", "auto"),
        ("cpu", {"avx2", "fma"}, "float32", "auto"),
        ("cuda", set(), "bfloat16", None),
    ],
)
def test_fast_settings_follow_the_device(device, flags, dtype, kernels):
    from transformers_af2.presets import fast_settings

    settings = fast_settings(device, flags)
    assert (settings.dtype, settings.linear_kernels) == (dtype, kernels)


def test_generate_fast_uses_the_preset_and_measured_kernels(converted_fixture, capsys, monkeypatch, tmp_path):
    from transformers_af2.presets import fast_settings

    monkeypatch.setenv("AF2_CACHE", str(tmp_path))
    fixture = converted_fixture
    argv = [
        "generate", "--model", str(fixture.repo), "--audio", str(fixture.wav(0)), "--prompt",
        fixture.reference["prompts"][0], "--greedy", "--max-new-tokens", "4", "--device", "cpu", "--fast", "--json",
    ]  # fmt: skip
    assert main(argv) == 0
    assert len(json.loads(capsys.readouterr().out)[0]["tokens"]) == 4
    (key,) = json.loads((tmp_path / "linear-kernels.json").read_text())
    assert f"torch.{fast_settings('cpu').dtype}" in key
