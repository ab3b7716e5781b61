"""`--quantization` / `transformers_af2.quantization`: weight-only int8/int4 (torchao) and bitsandbytes 8/4-bit loads of
a saved tiny model quantize the language model's linears only, generate, stay close to float32, save and reload where
the library can; bad names and missing libraries are refused naming the option."""

import importlib.util
import logging

import pytest
import torch
from conftest import BLOCK_ALIGNED, random_audio_inputs, tiny_model
from torch import nn

from transformers_af2 import AudioFlamingo2ForConditionalGeneration
from transformers_af2.commands import main
from transformers_af2.modeling.cpu_linear import (
    DEFAULT_KERNELS,
    FAST_KERNELS,
    linear_kernels_of,
    routed_forward,
    use_linear_kernels,
)
from transformers_af2.quantization import (
    QUANTIZATION_NAMES,
    SAVE_SUPPORTED,
    QuantizationUnavailableError,
    int8_weight_only_product,
    quantization_config,
    use_int8_cpu_kernel,
)

LIBRARY = {"int8": "torchao", "int4": "torchao", "bnb-8bit": "bitsandbytes", "bnb-4bit": "bitsandbytes"}

GROUP_SIZE = 32

# Worst relative logit error of the prefill against float32 (max |q - fp32| / max |fp32|) a scheme may show on the
# tiny model: 8-bit weights round to 1/127 of a row's range, 4-bit to 1/7 of a group's.
LOGIT_TOLERANCE = {"int8": 0.03, "bnb-8bit": 0.03, "int4": 0.25, "bnb-4bit": 0.25}


def _available(name):
    return importlib.util.find_spec(LIBRARY[name]) is not None


def _needs(name):
    return pytest.mark.skipif(not _available(name), reason=f"{LIBRARY[name]} is not installed (extra: quantization)")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("quantization")
    model = tiny_model(**BLOCK_ALIGNED)
    model.save_pretrained(root / "fp32")
    features, mask = random_audio_inputs([2])
    ids = torch.tensor([[model.config.audio_token_id, 5, 6, 7, 8, model.config.sep_token_id]])
    inputs = dict(input_ids=ids, input_features=features, input_features_mask=mask)
    return root, model, inputs


def _load(root, name, dtype=torch.float32):
    return AudioFlamingo2ForConditionalGeneration.from_pretrained(
        root / "fp32", dtype=dtype, quantization_config=quantization_config(name, dtype=dtype, group_size=GROUP_SIZE)
    )


def _generate(model, inputs, tokens=8):
    return model.generate(
        **inputs, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, pad_token_id=model.config.pad_token_id
    )[0, inputs["input_ids"].shape[1] :]


def _quantized(linear: nn.Linear) -> bool:
    return type(linear) is not nn.Linear or type(linear.weight) is not nn.Parameter


def test_unknown_name_is_refused_naming_the_option():
    with pytest.raises(ValueError, match=r"--quantization 'int3' is not supported; use one of int8, int4"):
        quantization_config("int3")


def test_int8_on_cpu_without_bfloat16_says_it_saves_memory_not_time(caplog):
    """Without bfloat16 activations torchao's eager int8 converts each weight per call (benchmarks/README.md: af2-3b
    decodes 2.9x slower than float32), so choosing it on CPU says so and names the setting that is fast; with bfloat16
    activations (PyTorch's int8 kernel) and on a GPU nothing is said."""
    if not _available("int8"):
        pytest.skip("torchao is not installed")
    with caplog.at_level(logging.WARNING, logger="transformers_af2.quantization"):
        quantization_config("int8", device="cuda")
        quantization_config("int8", dtype=torch.bfloat16)
        assert not caplog.records
        quantization_config("int8", dtype=torch.float32)
    (record,) = caplog.records
    assert record.getMessage().startswith("--quantization int8 on CPU without --dtype bfloat16 saves memory, not time")
    assert "With --dtype bfloat16, decoding steps take PyTorch's int8 kernel" in record.getMessage()


def _int8_kernel_calls(call) -> tuple[object, int]:
    """`call()`'s result, and how many times it called PyTorch's int8 weight-only kernel."""
    with torch.no_grad(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        result = call()
    return result, sum(event.count for event in profile.key_averages() if event.key == "aten::_weight_int8pack_mm")


def _int8_kernel_calls_of_forward(model, **inputs) -> int:
    """How many times a forward of `model` called PyTorch's int8 weight-only kernel."""
    return _int8_kernel_calls(lambda: model(**inputs))[1]


@_needs("int8")
def test_int8_bfloat16_decoding_steps_take_pytorchs_int8_kernel(saved):
    """A bfloat16 int8 model (loaded through `from_pretrained`) routes every quantized layer through
    `int8_weight_only_product`, keeping the class: a decoding step (1 row) calls `aten._weight_int8pack_mm` once per
    quantized layer, a prompt of more than `INT8_KERNEL_MAX_ROWS` rows never (torchao's own path), and the routed
    products are closer to the exact product of the int8 weights than torchao's (no rounding before the scale)."""
    from transformers_af2.quantization import INT8_KERNEL_MAX_ROWS

    root, _, inputs = saved
    model = _load(root, "int8", dtype=torch.bfloat16)
    layers = model.model.language_model.layers
    gated_blocks = sum(layer.cross_attn is not None for layer in layers)
    quantized = [m for m in model.modules() if isinstance(m, nn.Linear) and _quantized(m)]
    # Per decoder layer q, k, v, o, gate, up, down; per gated block q, o, ff_up, ff_down.
    assert gated_blocks and len(quantized) == 7 * len(layers) + 4 * gated_blocks
    for module in quantized:
        assert type(module) is nn.Linear and routed_forward(module).func is int8_weight_only_product
    # Routing the plain layers' kernels afterwards leaves the int8 layers on theirs, and the reverse.
    plain = [m for m in model.modules() if type(m) is nn.Linear and type(m.weight) is nn.Parameter]
    assert use_linear_kernels(model, FAST_KERNELS) == len(plain) > 0
    assert all(routed_forward(m).func is int8_weight_only_product for m in quantized)
    assert all(linear_kernels_of(m) == FAST_KERNELS for m in plain)
    assert use_int8_cpu_kernel(model) == len(quantized)
    assert all(linear_kernels_of(m) == FAST_KERNELS for m in plain)
    use_linear_kernels(model, DEFAULT_KERNELS)
    assert all(routed_forward(m) is None for m in plain)

    step = torch.tensor([[5]])
    # No audio: the gated blocks do not run.
    assert _int8_kernel_calls_of_forward(model, input_ids=step) == 7 * len(layers)
    long_prompt = torch.full((1, INT8_KERNEL_MAX_ROWS + 1), 5)
    assert _int8_kernel_calls_of_forward(model, input_ids=long_prompt) == 0

    module = quantized[0]
    rows = torch.randn(3, module.in_features, generator=torch.Generator().manual_seed(0)).bfloat16()
    exact = rows.double() @ (module.weight.qdata.double() * module.weight.scale.double()).t()
    routed, torchao = module(rows), nn.functional.linear(rows, module.weight)

    def error(got):
        return ((got.double() - exact).abs().max() / exact.abs().max()).item()

    assert error(routed) <= error(torchao) and error(routed) < 2**-8, (error(routed), error(torchao))


@_needs("int8")
def test_int8_kernel_leaves_what_it_cannot_take_to_torchao():
    """Input widths that are not a multiple of `INT8_KERNEL_WIDTH_MULTIPLE` (the kernel crashes the process on some),
    inputs that need gradients and float32 or float16 activations stay on torchao's path, with its results."""
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    generator = torch.Generator().manual_seed(0)
    layers = nn.Sequential(nn.Linear(100, 64, bias=True), nn.Linear(64, 32, bias=True)).bfloat16()
    quantize_(layers, Int8WeightOnlyConfig())
    assert use_int8_cpu_kernel(layers) == 1
    assert routed_forward(layers[0]) is None and routed_forward(layers[1]).func is int8_weight_only_product
    narrow = torch.randn(2, 100, generator=generator).bfloat16()
    assert torch.equal(layers[0](narrow), nn.functional.linear(narrow, layers[0].weight, layers[0].bias))

    wide = torch.randn(2, 64, generator=generator).bfloat16()
    routed = layers[1](wide)
    assert torch.allclose(routed, nn.functional.linear(wide, layers[1].weight, layers[1].bias), rtol=0.02, atol=0.02)
    needs_grad = wide.clone().requires_grad_()
    assert torch.equal(layers[1](needs_grad), nn.functional.linear(needs_grad, layers[1].weight, layers[1].bias))
    assert _int8_kernel_calls_of_forward(layers[1], input=wide.float()) == 0
    assert _int8_kernel_calls_of_forward(layers[1], input=wide.half()) == 0

    # A float32 bias with bfloat16 activations: the output keeps the activations' dtype, as torchao's does.
    layers[1].bias.data = layers[1].bias.data.float()
    assert (
        layers[1](wide).dtype == nn.functional.linear(wide, layers[1].weight, layers[1].bias).dtype == torch.bfloat16
    )
    # A weight replaced after routing (no longer int8): the layer computes with what it holds now.
    layers[1].bias.data = layers[1].bias.data.bfloat16()
    plain = torch.randn(32, 64, generator=generator).bfloat16()
    layers[1].weight = nn.Parameter(plain, requires_grad=False)
    assert torch.equal(layers[1](wide), nn.functional.linear(wide, plain, layers[1].bias))


_MISALIGNED_INPUT = """
import torch
from torch import nn
from torchao.quantization import Int8WeightOnlyConfig, quantize_
from transformers_af2.quantization import use_int8_cpu_kernel

layer = nn.Sequential(nn.Linear(64, 32, bias=False)).bfloat16()
quantize_(layer, Int8WeightOnlyConfig())
assert use_int8_cpu_kernel(layer) == 1
wider = torch.randn(2, 1, 200, generator=torch.Generator().manual_seed(0)).bfloat16()
for start in (0, 1, 8, 16, 24, 40):
    view = wider[:1, :, start : start + 64]  # contiguous, starting 2 * start bytes into the tensor
    expected = nn.functional.linear(view, layer[0].weight)
    assert torch.allclose(layer(view), expected, rtol=0.02, atol=0.02), start
print("ok")
"""


@_needs("int8")
def test_int8_kernel_takes_inputs_at_any_address():
    """PyTorch's kernel reads rows with aligned vector loads and crashes the process on an input that starts off a
    32-byte boundary, which a contiguous view into a wider tensor does: the routed product copies such an input. In a
    subprocess, so that a crash fails this test instead of ending the run."""
    import subprocess
    import sys

    completed = subprocess.run([sys.executable, "-c", _MISALIGNED_INPUT], capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0 and completed.stdout.strip() == "ok", (
        completed.returncode,
        completed.stderr[-2000:],
    )


@_needs("int8")
def test_int8_checkpoint_reloaded_in_bfloat16_takes_the_kernel(saved, tmp_path):
    """A saved int8 checkpoint reloads with its int8 weights mapped from the file at unaligned offsets: routing copies
    them once to aligned memory (the kernel needs it), and the reloaded model answers as the one that was saved."""
    from transformers_af2.quantization import INT8_KERNEL_ALIGNMENT

    root, _, inputs = saved
    model = _load(root, "int8", dtype=torch.bfloat16)
    inputs = dict(inputs, input_features=inputs["input_features"].bfloat16())
    answer = _generate(model, inputs)
    model.save_pretrained(tmp_path / "int8")
    reloaded = AudioFlamingo2ForConditionalGeneration.from_pretrained(tmp_path / "int8", dtype=torch.bfloat16)
    routed = [m for m in reloaded.modules() if routed_forward(m) is not None]
    assert routed and len(routed) == sum(1 for m in model.modules() if routed_forward(m) is not None)
    assert all(m.weight.qdata.data_ptr() % INT8_KERNEL_ALIGNMENT == 0 for m in routed)
    assert _int8_kernel_calls_of_forward(reloaded, input_ids=torch.tensor([[5]])) > 0
    assert _generate(reloaded, inputs).tolist() == answer.tolist()


@pytest.mark.parametrize("name", QUANTIZATION_NAMES)
def test_missing_library_is_refused_naming_the_extra(name):
    if _available(name):
        pytest.skip(f"{LIBRARY[name]} is installed")
    with pytest.raises(QuantizationUnavailableError, match=rf"--quantization {name} needs .*\[quantization\]"):
        quantization_config(name)


@pytest.mark.parametrize("name", QUANTIZATION_NAMES)
def test_language_model_quantized_audio_side_kept(saved, name):
    if not _available(name):
        pytest.skip(f"{LIBRARY[name]} is not installed")
    root, reference, inputs = saved
    model = _load(root, name)
    inner = model.model
    crossing = [layer.cross_attn for layer in inner.language_model.layers if layer.cross_attn is not None]
    assert crossing
    for layer in inner.language_model.layers:
        assert _quantized(layer.mlp.up_proj) and _quantized(layer.self_attn.q_proj)
    for cross in crossing:
        assert _quantized(cross.ff_up) and _quantized(cross.q_proj) and not _quantized(cross.kv_proj)
    for kept in (inner.audio_tower, inner.audio_transformer):
        assert not any(_quantized(m) for m in kept.modules() if isinstance(m, nn.Linear))
    assert not _quantized(model.lm_head)
    if LIBRARY[name] == "torchao":  # torchao swaps the weights, never the module class
        assert all(type(m) is nn.Linear for m in model.modules() if isinstance(m, nn.Linear))

    with torch.no_grad():
        expected = reference(**inputs).logits
        got = model(**inputs).logits
    error = ((got.float() - expected).abs().max() / expected.abs().max()).item()
    assert 0 < error <= LOGIT_TOLERANCE[name], error  # 0 would mean nothing was quantized
    assert _generate(model, inputs).shape == (8,)


@pytest.mark.parametrize("name", SAVE_SUPPORTED)
def test_quantized_checkpoint_saves_and_reloads_quantized(saved, name, tmp_path):
    if not _available(name):
        pytest.skip(f"{LIBRARY[name]} is not installed")
    root, _, inputs = saved
    model = _load(root, name)
    answer = _generate(model, inputs)
    model.save_pretrained(tmp_path / name)
    reloaded = AudioFlamingo2ForConditionalGeneration.from_pretrained(tmp_path / name)
    up_proj = reloaded.model.language_model.layers[0].mlp.up_proj
    original = model.model.language_model.layers[0].mlp.up_proj
    assert (type(up_proj), type(up_proj.weight)) == (type(original), type(original.weight))
    assert _generate(reloaded, inputs).tolist() == answer.tolist()


@pytest.mark.parametrize("name, dtype", [("int8", "float32"), ("int8", "bfloat16"), ("bnb-8bit", "float32")])
def test_generate_command_takes_quantization(converted_fixture, capsys, name, dtype):
    """`af2 generate --quantization int8|bnb-8bit` on the parity fixture answers the float32 greedy ids of its first
    sample (whose smallest greedy logit margin, 0.42, is far above 8-bit rounding); in bfloat16 the int8 decoding
    steps take PyTorch's int8 kernel."""
    import json

    if not _available(name):
        pytest.skip(f"{LIBRARY[name]} is not installed")
    fixture = converted_fixture
    argv = [
        "generate", "--model", str(fixture.repo), "--audio", str(fixture.wav(0)), "--prompt",
        fixture.reference["prompts"][0], "--greedy", "--max-new-tokens", str(fixture.reference["max_new_tokens"]),
        "--device", "cpu", "--quantization", name, "--dtype", dtype, "--json",
    ]  # fmt: skip
    exit_code, int8_kernel_calls = _int8_kernel_calls(lambda: main(argv))
    assert exit_code == 0
    assert (int8_kernel_calls > 0) is ((name, dtype) == ("int8", "bfloat16")), int8_kernel_calls
    tokens = json.loads(capsys.readouterr().out)[0]["tokens"]
    prompt_length = fixture.ids("s0.prompt_ids").shape[1]
    assert tokens == fixture.ids("s0.greedy_ids")[0, prompt_length:].tolist()


def test_generate_command_refuses_unknown_quantization(capsys):
    with pytest.raises(SystemExit) as raised:
        main(["generate", "--audio", "a.wav", "--prompt", "q", "--quantization", "fp4"])
    assert raised.value.code == 2
    assert "--quantization: invalid choice: 'fp4'" in capsys.readouterr().err


@_needs("int4")
def test_int4_layout_follows_the_device():
    """CPU: torchao's CPU layout (the only int4 one with a CPU kernel); GPU: tinygemm's (plain int4 needs `mslk`)."""
    assert type(quantization_config("int4", device="cpu").quant_type).__name__ == "PrototypeInt4WeightOnlyConfig"
    assert quantization_config("int4", device="cuda").quant_type.int4_packing_format == "tile_packed_to_4d"


def _rounded_to_int4(weight: torch.Tensor, group_size: int) -> torch.Tensor:
    """Textbook asymmetric round-to-nearest 4-bit weights, in float: per group of `group_size` inputs of each output
    row, 16 levels evenly spread from the group's minimum to its maximum. Independent of torchao's code."""
    rows, columns = weight.shape
    groups = weight.float().reshape(rows, columns // group_size, group_size)
    low, high = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
    step = (high - low).clamp(min=1e-12) / 15
    return (((groups - low) / step).round().clamp(0, 15) * step + low).reshape(rows, columns).to(weight.dtype)


@_needs("int4")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int4_kernel_matches_textbook_int4_rounding(saved, dtype):
    """The int4 model's logits are as far from the unquantized model's as those of the same model with the same
    linears rounded to int4 by hand in float, and closer to the latter than either is to the unquantized model:
    a wrong packing, layout or group size (uncorrelated logits, error ~1) or a skipped layer (error ~0) fails."""
    root, _, inputs = saved
    quantized = _load(root, "int4", dtype=dtype)
    reference = AudioFlamingo2ForConditionalGeneration.from_pretrained(root / "fp32", dtype=dtype)
    rounded = AudioFlamingo2ForConditionalGeneration.from_pretrained(root / "fp32", dtype=dtype)
    modules = dict(rounded.named_modules())
    names = [n for n, m in quantized.named_modules() if isinstance(m, nn.Linear) and _quantized(m)]
    assert names
    with torch.no_grad():
        for name in names:
            modules[name].weight.copy_(_rounded_to_int4(modules[name].weight, GROUP_SIZE))
        inputs = dict(inputs, input_features=inputs["input_features"].to(dtype))
        expected, got, by_hand = (m(**inputs).logits.float()[0] for m in (reference, quantized, rounded))

    def error(a, b):
        return ((a - b).norm() / b.norm()).item()

    kernel_error, textbook_error = error(got, expected), error(by_hand, expected)
    assert 0.5 * textbook_error <= kernel_error <= 1.5 * textbook_error, (kernel_error, textbook_error)
    assert error(got, by_hand) < textbook_error, (error(got, by_hand), textbook_error)


def test_torchao_cuda_only_extension_failures_are_quiet_on_cpu_torch(caplog):
    """torchao's "Failed to load" warning for its CUDA-only extensions is dropped on a CPU-only PyTorch (importing the
    package installs the filter); another extension's failure and torchao's other warnings still show."""
    import logging

    import transformers_af2  # noqa: F401

    torchao_logger = logging.getLogger("torchao")
    cuda_only = "Failed to load /site/torchao/_C_mxfp8.cpython-310-x86_64-linux-gnu.so: Could not load this library"
    other = "Failed to load /site/torchao/_C_lowbit.so: undefined symbol"
    with caplog.at_level(logging.WARNING, logger="torchao"):
        for message in (cuda_only, "Failed to load /site/torchao/_C_cutlass_90a.abi3.so: x", other, "Skipping import"):
            torchao_logger.warning(message)
    shown = [record.getMessage() for record in caplog.records]
    cpu_only_torch = torch.version.cuda is None and torch.version.hip is None
    assert (cuda_only in shown) is not cpu_only_torch
    assert len(shown) == (2 if cpu_only_torch else 4) and other in shown and "Skipping import" in shown


@_needs("int8")
def test_importing_the_package_with_torchao_prints_no_extension_failures():
    """With torchao installed, transformers imports it for every model: on a CPU-only PyTorch the package's import
    prints none of torchao's CUDA-only extension failures."""
    import subprocess
    import sys

    completed = subprocess.run(
        [sys.executable, "-c", "import transformers_af2, torchao"], capture_output=True, text=True, timeout=300
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    if torch.version.cuda is None and torch.version.hip is None:
        assert "Failed to load" not in completed.stderr, completed.stderr[-2000:]
    assert "is an Enum subclass" not in completed.stderr, completed.stderr[-2000:]


def test_torch_enum_notice_is_dropped_for_torchao_enums_only(caplog):
    """torch's "is an Enum subclass" deprecation notice (one per enum torchao registers, at each import) is dropped
    when the enum is torchao's; the same notice about another package's enum still shows."""
    import enum
    import logging

    import transformers_af2  # noqa: F401

    torchao_enum = enum.Enum("KernelPreference", "AUTO", module="torchao.quantization.quantize_.common")
    other_enum = enum.Enum("Colour", "RED", module="somebody_else.colours")
    pytree_logger = logging.getLogger("torch.utils._pytree")
    notice = "%s is an Enum subclass and is now natively supported by torch.compile as an opaque value type."
    with caplog.at_level(logging.WARNING, logger="torch.utils._pytree"):
        for subject in (torchao_enum, other_enum):
            pytree_logger.warning(notice, subject)
    assert [record.args[0] for record in caplog.records] == [other_enum]
