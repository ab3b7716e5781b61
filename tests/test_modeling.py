"""Invariants of the model on tiny random configs: caching, batching, beams, gates, backends, save/load, errors."""

import gc
import os

import pytest
import torch
from conftest import random_audio_inputs, tiny_config, tiny_model
from huggingface_hub.errors import StrictDataclassClassValidationError
from transformers import AutoConfig, AutoModel, AutoModelForMultimodalLM, Qwen2ForCausalLM

import transformers_af2
from transformers_af2 import AudioFlamingo2Cache, AudioFlamingo2ForConditionalGeneration
from transformers_af2.compat import CACHE_KWARG


def _prompts(lengths, audio_token_id=95, pad_id=97, seed=0):
    """Left-padded prompts starting with <audio>, with their attention mask."""
    generator = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.full((len(lengths), width), pad_id)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, length in enumerate(lengths):
        ids[row, width - length] = audio_token_id
        ids[row, width - length + 1 :] = torch.randint(0, 90, (length - 1,), generator=generator)
        mask[row, width - length :] = 1
    return ids, mask


def _greedy(model, **inputs):
    return model.generate(**inputs, max_new_tokens=6, do_sample=False, pad_token_id=97, eos_token_id=None)


def test_config_derives_cross_attention_layers_and_rotary_dim():
    config = tiny_config()
    assert config.cross_attention_layers == [1]  # (i + 1) % 2 == 0 for 3 layers
    assert config.audio_hidden_size == 64
    assert config.audio_transformer_rotary_dim == 32  # max(head_dim // 2, 32) with head_dim 32
    assert config.audio_tokens_per_window == 64
    model = tiny_model()
    blocks = [layer.cross_attn is not None for layer in model.model.language_model.layers]
    assert blocks == [False, True, False]


def test_config_rejects_inconsistent_architecture():
    # @strict configs wrap validate_architecture's ValueError in huggingface_hub's validation error.
    invalid = (ValueError, StrictDataclassClassValidationError)
    with pytest.raises(invalid, match="audio_transformer_num_heads=3"):
        tiny_config(audio_transformer_num_heads=3)
    with pytest.raises(invalid, match="outside the language model"):
        tiny_config(cross_attention_layers=[0, 7])


def test_forward_shapes_and_finite_loss():
    model = tiny_model()
    features, features_mask = random_audio_inputs([2, 1])
    ids, mask = _prompts([7, 5])
    labels = ids.masked_fill(mask == 0, -100)
    out = model(
        input_ids=ids, attention_mask=mask, input_features=features, input_features_mask=features_mask, labels=labels
    )
    assert out.logits.shape == (2, 7, 99)
    assert out.audio_embeds.shape == (2, 2 * 64, 64)
    assert torch.isfinite(out.loss) and out.loss.item() > 0
    assert isinstance(out[CACHE_KWARG], AudioFlamingo2Cache) and out[CACHE_KWARG].has_audio


def test_audio_changes_the_output_and_padded_windows_do_not():
    model = tiny_model()
    ids, mask = _prompts([6])
    features, features_mask = random_audio_inputs([1])
    other, _ = random_audio_inputs([1], seed=5)
    logits = model(input_ids=ids, input_features=features, input_features_mask=features_mask).logits
    logits_other = model(input_ids=ids, input_features=other, input_features_mask=features_mask).logits
    assert (logits - logits_other).abs().max() > 1e-3
    # Padding with a garbage second window (mask 0) must not change anything.
    padded = torch.cat([features, torch.randn_like(features) * 100], dim=1)
    logits_padded = model(input_ids=ids, input_features=padded, input_features_mask=torch.tensor([[1, 0]])).logits
    torch.testing.assert_close(logits_padded, logits, atol=1e-5, rtol=0)


def test_generate_with_and_without_cache_agree():
    model = tiny_model()
    features, features_mask = random_audio_inputs([3, 1])
    ids, mask = _prompts([6, 4])
    inputs = dict(input_ids=ids, attention_mask=mask, input_features=features, input_features_mask=features_mask)
    with_cache = _greedy(model, **inputs, use_cache=True)
    without_cache = _greedy(model, **inputs, use_cache=False)
    assert with_cache.shape == (2, 12)
    assert torch.equal(with_cache, without_cache)


def test_audio_is_encoded_once_per_generate():
    model = tiny_model()
    calls = []
    model.model.audio_tower.register_forward_hook(lambda module, args, output: calls.append(args[0].shape[0]))
    features, features_mask = random_audio_inputs([3, 1])
    ids, mask = _prompts([6, 4])
    _greedy(model, input_ids=ids, attention_mask=mask, input_features=features, input_features_mask=features_mask)
    # On CPU the tower takes one window per call: 4 calls for the 4 valid windows (the padded one is never encoded),
    # and none during the decoding steps.
    assert calls == [1, 1, 1, 1]


def test_windows_per_tower_call_changes_nothing_but_the_calls():
    model = tiny_model()
    calls = []
    model.model.audio_tower.register_forward_hook(lambda module, args, output: calls.append(args[0].shape[0]))
    features, features_mask = random_audio_inputs([3, 1, 2])
    with torch.no_grad():
        one_by_one = model.get_audio_features(features, features_mask)
        assert calls == [1] * 6
        together = model.get_audio_features(features, features_mask, windows_per_tower_call=6)
        assert calls[6:] == [6]
        model.get_audio_features(features, features_mask, windows_per_tower_call=4)
        assert calls[7:] == [4, 2]
    assert torch.equal(one_by_one.audio_attention_mask, together.audio_attention_mask)
    torch.testing.assert_close(one_by_one.last_hidden_state, together.last_hidden_state, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="windows_per_tower_call"):
        model.get_audio_features(features, features_mask, windows_per_tower_call=0)


def test_audio_transformer_skips_batch_padding_without_changing_real_tokens():
    """Each sample's windows go through the audio transformer without the batch's trailing padding; its real tokens
    must equal those of one call over the whole padded batch (what the original computes)."""
    model = tiny_model()
    features, features_mask = random_audio_inputs([3, 1, 3, 2])
    calls = []
    model.model.audio_transformer.register_forward_hook(lambda module, args, output: calls.append(args[0].shape[:2]))
    with torch.no_grad():
        audio = model.get_audio_features(features, features_mask)
        audio_embeds, token_mask = audio.last_hidden_state, audio.audio_attention_mask
        tokens = audio_embeds.shape[1] // 3
        # samples of equal length share one call: lengths 1, 2 and 3 windows
        assert calls == [(1, tokens), (1, 2 * tokens), (2, 3 * tokens)]
        window_tokens = torch.stack([
            model.model.audio_tower(features[b, :, None]).last_hidden_state.flatten(2).transpose(1, 2)
            for b in range(4)
        ]).reshape(4, 3 * tokens, -1)  # fmt: skip
        window_tokens = window_tokens * token_mask[..., None]
        padded_batch = model.model.audio_transformer(window_tokens, token_mask).last_hidden_state
    torch.testing.assert_close(audio_embeds[token_mask], padded_batch[token_mask], atol=1e-5, rtol=0)
    assert torch.count_nonzero(audio_embeds[~token_mask]) == 0


def test_batched_generate_equals_one_by_one():
    model = tiny_model()
    counts, lengths = [3, 1, 2], [6, 4, 5]
    features, features_mask = random_audio_inputs(counts)
    ids, mask = _prompts(lengths)
    batched = _greedy(
        model, input_ids=ids, attention_mask=mask, input_features=features, input_features_mask=features_mask
    )
    for row, (count, length) in enumerate(zip(counts, lengths)):
        single = _greedy(
            model,
            input_ids=ids[row : row + 1, -length:],
            attention_mask=mask[row : row + 1, -length:],
            input_features=features[row : row + 1, :count],
            input_features_mask=features_mask[row : row + 1, :count],
        )
        assert torch.equal(batched[row, -6:], single[0, -6:]), f"row {row}"


def test_beam_search_keeps_each_rows_audio():
    model = tiny_model()
    counts, lengths = [3, 2], [5, 5]
    features, features_mask = random_audio_inputs(counts)
    ids, mask = _prompts(lengths)
    kwargs = dict(
        max_new_tokens=5,
        num_beams=3,
        num_return_sequences=2,
        do_sample=False,
        pad_token_id=97,
        eos_token_id=None,
        output_scores=True,
        return_dict_in_generate=True,
    )
    batched = model.generate(
        input_ids=ids, attention_mask=mask, input_features=features, input_features_mask=features_mask, **kwargs
    )
    assert batched.sequences.shape == (4, 10)
    for row, count in enumerate(counts):
        single = model.generate(
            input_ids=ids[row : row + 1],
            attention_mask=mask[row : row + 1],
            input_features=features[row : row + 1, :count],
            input_features_mask=features_mask[row : row + 1, :count],
            **kwargs,
        )
        assert torch.equal(batched.sequences[2 * row : 2 * row + 2], single.sequences)
        torch.testing.assert_close(batched.sequences_scores[2 * row : 2 * row + 2], single.sequences_scores)


def test_sampling_and_num_return_sequences():
    model = tiny_model()
    features, features_mask = random_audio_inputs([2])
    ids, mask = _prompts([5])
    torch.manual_seed(0)
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        input_features=features,
        input_features_mask=features_mask,
        do_sample=True,
        top_k=30,
        top_p=0.95,
        num_return_sequences=3,
        max_new_tokens=4,
        pad_token_id=97,
        eos_token_id=None,
    )
    assert out.shape == (3, 9)
    assert torch.equal(out[:, :5], ids.expand(3, -1))


def test_zero_gates_equal_the_bare_qwen2_lm():
    model = tiny_model(nonzero_gates=False)
    bare = Qwen2ForCausalLM(model.config.text_config).eval()
    state = {
        k.removeprefix("model.language_model."): v
        for k, v in model.state_dict().items()
        if k.startswith("model.language_model.") and ".cross_attn." not in k
    }
    bare.model.load_state_dict(state)
    bare.lm_head.weight.data.copy_(model.lm_head.weight.data)
    features, features_mask = random_audio_inputs([2])
    ids, _ = _prompts([8])
    ours = model(input_ids=ids, input_features=features, input_features_mask=features_mask).logits
    reference = bare(input_ids=ids).logits
    torch.testing.assert_close(ours, reference, atol=1e-6, rtol=0)


def test_eager_equals_sdpa():
    features, features_mask = random_audio_inputs([2, 1])
    ids, mask = _prompts([6, 4])
    logits = {}
    for implementation in ("eager", "sdpa"):
        model = tiny_model(seed=3)
        model.set_attn_implementation(implementation)
        assert model.config.text_config._attn_implementation == implementation
        out = model(input_ids=ids, attention_mask=mask, input_features=features, input_features_mask=features_mask)
        logits[implementation] = out.logits[mask.bool()]
    torch.testing.assert_close(logits["eager"], logits["sdpa"], atol=1e-5, rtol=1e-5)


def _assert_same_weights(loaded, model):
    expected = model.state_dict()
    got = loaded.state_dict()
    assert got.keys() == expected.keys()
    different = [name for name in expected if not torch.equal(got[name].cpu(), expected[name])]
    assert different == []


def test_save_load_round_trip_through_auto_classes(tmp_path):
    model = tiny_model(seed=1)
    model.save_pretrained(tmp_path)
    assert AutoConfig.from_pretrained(tmp_path).model_type == "audioflamingo2"
    features, features_mask = random_audio_inputs([2])
    ids, _ = _prompts([6])
    expected = model(input_ids=ids, input_features=features, input_features_mask=features_mask).logits
    for auto_class in (AutoModel, AutoModelForMultimodalLM):
        loaded = auto_class.from_pretrained(tmp_path).eval()
        assert isinstance(loaded, AudioFlamingo2ForConditionalGeneration)
        got = loaded(input_ids=ids, input_features=features, input_features_mask=features_mask).logits
        _assert_same_weights(loaded, model)
        # Bit-identical weights and plain nn.Linear layers: bit-identical logits.
        assert torch.equal(got, expected)


@pytest.mark.parametrize("device_map", ["cpu", "auto", {"": "cpu"}])
def test_device_map_loading_gives_the_same_logits(tmp_path, device_map):
    model = tiny_model(seed=4)
    model.save_pretrained(tmp_path)
    loaded = AutoModel.from_pretrained(tmp_path, device_map=device_map).eval()
    features, features_mask = random_audio_inputs([2])
    ids, _ = _prompts([6])
    expected = model(input_ids=ids, input_features=features, input_features_mask=features_mask).logits
    got = loaded(input_ids=ids, input_features=features, input_features_mask=features_mask).logits
    _assert_same_weights(loaded, model)
    assert torch.equal(got, expected)


def _mappings_of(path) -> list[str]:
    with open("/proc/self/maps") as handle:
        return [line for line in handle if line.rstrip().endswith(str(path))]


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="reads the process's memory map (Linux)")
def test_loading_with_a_cast_does_not_keep_the_checkpoint_mapped(tmp_path):
    """A float32 checkpoint loaded in bfloat16: once loaded, no tensor may still point into the float32 file
    (a single integer buffer left there would keep the whole file mapped and resident beside the bf16 copy)."""
    tiny_model(seed=1).save_pretrained(tmp_path)
    weights_file = (tmp_path / "model.safetensors").resolve()
    same_dtype = AutoModel.from_pretrained(tmp_path)  # float32 as saved: weights stay lazily mapped, one copy
    assert _mappings_of(weights_file)
    del same_dtype
    gc.collect()
    model = AutoModel.from_pretrained(tmp_path, dtype=torch.bfloat16)
    gc.collect()
    assert _mappings_of(weights_file) == []
    index = model.model.audio_tower.layers[0].blocks[0].attention.self.relative_position_index
    assert index.dtype == torch.int64 and index.shape[0] == index.shape[1]


def test_bfloat16_load_and_generate(tmp_path):
    tiny_model(seed=1).save_pretrained(tmp_path)
    model = AutoModel.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    assert model.lm_head.weight.dtype == torch.bfloat16
    assert model.model.audio_tower.norm.weight.dtype == torch.bfloat16
    features, features_mask = random_audio_inputs([2])
    ids, mask = _prompts([6])
    out = model(input_ids=ids, input_features=features, input_features_mask=features_mask)
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.logits).all()
    generated = _greedy(
        model, input_ids=ids, attention_mask=mask, input_features=features, input_features_mask=features_mask
    )
    assert generated.shape == (1, 12)


def test_gradient_checkpointing_gives_the_same_gradients():
    features, features_mask = random_audio_inputs([2, 1])
    ids, mask = _prompts([6, 4])
    labels = ids.masked_fill(mask == 0, -100)
    grads = {}
    for checkpointing in (False, True):
        model = tiny_model(seed=2).train()
        if checkpointing:
            # transformers 5.23 renamed it; earlier releases of the supported range have only the old name.
            enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
            enable()
        loss = model(
            input_ids=ids,
            attention_mask=mask,
            input_features=features,
            input_features_mask=features_mask,
            labels=labels,
            use_cache=False,
        ).loss
        loss.backward()
        grads[checkpointing] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert grads[True].keys() == grads[False].keys()
    assert any(n.startswith("model.audio_transformer.") for n in grads[True])
    assert any(n.startswith("model.audio_tower.") for n in grads[True])
    for name, grad in grads[False].items():
        torch.testing.assert_close(grads[True][name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_cache_follows_batch_operations():
    model = tiny_model()
    features, features_mask = random_audio_inputs([2, 1])
    ids, mask = _prompts([5, 5])
    cache = model(
        input_ids=ids, attention_mask=mask, input_features=features, input_features_mask=features_mask, use_cache=True
    )[CACHE_KWARG]
    keys, values, audio_mask = cache.get_audio_states(1)
    # Stored contiguous: every decoding step reads them, and attention kernels copy strided views at each call.
    assert keys.is_contiguous() and values.is_contiguous()
    cache.batch_repeat_interleave(2)
    assert cache.get_audio_states(1)[0].shape[0] == 4
    cache.reorder_cache(torch.tensor([3, 2, 1, 0]))
    reordered_keys, _, reordered_mask = cache.get_audio_states(1)
    assert torch.equal(reordered_keys[0], keys[1]) and torch.equal(reordered_keys[3], keys[0])
    assert torch.equal(reordered_mask[0], audio_mask[1])
    cache.batch_select_indices(torch.tensor([3]))
    assert torch.equal(cache.get_audio_states(1)[0][0], keys[0])


@pytest.mark.parametrize(
    ("features_shape", "mask_shape", "message"),
    [
        ((1, 2, 1001), (1, 2), r"input_features must have shape \(batch, windows, frames, 64\)"),
        ((1, 2, 1001, 32), (1, 2), r"input_features must have shape"),
        ((1, 2, 1001, 64), (1, 3), r"input_features_mask must have shape \(batch, windows\) = \(1, 2\)"),
        ((2, 2, 1001, 64), (2, 2), r"input_features has 2 samples but the text has 1"),
    ],
)
def test_mismatched_inputs_raise_clear_errors(features_shape, mask_shape, message):
    model = tiny_model()
    ids, _ = _prompts([5])
    with pytest.raises(ValueError, match=message):
        model(
            input_ids=ids,
            input_features=torch.zeros(features_shape),
            input_features_mask=torch.ones(mask_shape, dtype=torch.long),
        )


def test_sample_without_any_window_is_rejected():
    model = tiny_model()
    ids, _ = _prompts([5, 5])
    features, _ = random_audio_inputs([1, 1])
    with pytest.raises(ValueError, match=r"no window as valid for batch index\(es\) \[1\]"):
        model(input_ids=ids, input_features=features, input_features_mask=torch.tensor([[1], [0]]))


def test_foreign_cache_with_audio_is_rejected():
    from transformers import DynamicCache

    model = tiny_model()
    features, features_mask = random_audio_inputs([1])
    ids, _ = _prompts([5])
    with pytest.raises(ValueError, match="pass an AudioFlamingo2Cache"):
        model(
            input_ids=ids,
            input_features=features,
            input_features_mask=features_mask,
            **{CACHE_KWARG: DynamicCache()},
            use_cache=True,
        )


def test_package_registers_with_transformers():
    assert transformers_af2.AudioFlamingo2Config.model_type == "audioflamingo2"
    config = AutoConfig.for_model("audioflamingo2")
    assert isinstance(config, transformers_af2.AudioFlamingo2Config)


def test_decode_step_compiles_without_graph_breaks():
    """A whole decoding step, audio read back from the cache, traces as one graph (fullgraph=True raises on a
    break). The eager backend checks the tracing only; inductor would compile the same graph."""
    model = tiny_model()
    features, features_mask = random_audio_inputs([2, 1])
    ids, mask = _prompts([5, 4])
    with torch.no_grad():
        cache = model(
            input_ids=ids,
            attention_mask=mask,
            input_features=features,
            input_features_mask=features_mask,
            use_cache=True,
        )[CACHE_KWARG]
        step_ids = torch.tensor([[5], [6]])
        step_mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], dim=1)
        expected = model(input_ids=step_ids, attention_mask=step_mask, **{CACHE_KWARG: cache}).logits
        cache.crop(-1)  # undo the step so the compiled call sees the same cache
        torch._dynamo.reset()
        compiled = torch.compile(model, fullgraph=True, backend="eager")
        got = compiled(input_ids=step_ids, attention_mask=step_mask, **{CACHE_KWARG: cache}).logits
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("grad", [True, False])
@pytest.mark.parametrize("shape", [(1, 24), (3, 24), (2, 8, 24), (16, 24), (17, 24), (4, 40, 24), (2, 0, 24)])
def test_fast_cpu_linear_equals_nn_linear(shape, bias, grad):
    from transformers_af2.modeling.cpu_linear import FastCPULinear

    torch.manual_seed(0)
    reference = torch.nn.Linear(24, 40, bias=bias)
    fast = FastCPULinear(24, 40, bias=bias)
    fast.load_state_dict(reference.state_dict())
    # Both CPU paths (few rows; oneDNN for many rows without autograd) and the default one (with autograd).
    inputs = torch.randn(shape, requires_grad=grad)
    with torch.set_grad_enabled(grad):
        got, expected = fast(inputs), reference(inputs)
    assert got.shape == expected.shape == (*shape[:-1], 40)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    if grad and inputs.numel():
        (grad_got,) = torch.autograd.grad(got.sum(), inputs)
        (grad_expected,) = torch.autograd.grad(expected.sum(), inputs)
        torch.testing.assert_close(grad_got, grad_expected, atol=1e-5, rtol=0)


def test_every_linear_is_a_plain_nn_linear(tmp_path):
    """Quantizers, PEFT and tensor-parallel plans test `type(module) is nn.Linear`: a built model and a loaded one
    have no other linear class; the CPU kernels are an explicit opt-in that can be undone."""
    from transformers_af2.modeling.cpu_linear import (
        FAST_KERNELS,
        disable_fast_cpu_linears,
        enable_fast_cpu_linears,
        linear_kernels_of,
    )

    model = tiny_model()
    model.save_pretrained(tmp_path)
    loaded = AudioFlamingo2ForConditionalGeneration.from_pretrained(tmp_path)
    for candidate in (model, loaded):
        linears = [m for m in candidate.modules() if isinstance(m, torch.nn.Linear)]
        assert len(linears) > 40
        assert all(type(m) is torch.nn.Linear for m in linears)

    features, features_mask = random_audio_inputs([2, 1])
    ids, mask = _prompts([6, 4])
    inputs = dict(input_ids=ids, attention_mask=mask, input_features=features, input_features_mask=features_mask)
    with torch.no_grad():
        expected = model(**inputs).logits
        linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
        count = enable_fast_cpu_linears(model)
        assert count == len(linears)
        # The opt-in routes the products through other kernels; the layers keep their class.
        assert all(type(m) is torch.nn.Linear and linear_kernels_of(m) == FAST_KERNELS for m in linears)
        torch.testing.assert_close(model(**inputs).logits, expected, atol=1e-5, rtol=0)
        assert disable_fast_cpu_linears(model) == count
        assert all(type(m) is torch.nn.Linear and "forward" not in vars(m) for m in linears)
        assert torch.equal(model(**inputs).logits, expected)


def test_cross_attention_runs_at_every_decoding_step():
    """The audio reaches every generated token: the cross-attention block runs once per forward (prefill + each new
    token), its keys/values come from the cache after the prefill, and cached greedy ids equal uncached ones."""
    model = tiny_model()
    # Non-zero gates, so that a block that did not run would change the answer.
    for layer in model.model.language_model.layers:
        if layer.cross_attn is not None:
            layer.cross_attn.attn_gate.data.fill_(1.0)
            layer.cross_attn.ff_gate.data.fill_(1.0)
    features, features_mask = random_audio_inputs([2, 1])
    ids, mask = _prompts([6, 4])
    inputs = dict(input_ids=ids, attention_mask=mask, input_features=features, input_features_mask=features_mask)
    blocks = [layer.cross_attn for layer in model.model.language_model.layers if layer.cross_attn is not None]
    calls = []
    hooks = [
        block.register_forward_hook(lambda module, args, output: calls.append(args[0].shape[1])) for block in blocks
    ]
    new_tokens = 6
    try:
        with torch.no_grad():
            cached = model.generate(
                **inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=97
            )
    finally:
        for hook in hooks:
            hook.remove()
    # One call per block per forward: the prompt (6 positions), then one position per further token.
    assert calls == [6] + [1] * (new_tokens - 1)
    with torch.no_grad():
        uncached = model.generate(
            **inputs,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=97,
            use_cache=False,
        )
        without_audio = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False, pad_token_id=97
        )
    assert torch.equal(cached, uncached)
    assert not torch.equal(cached, without_audio)  # the audio does steer the answer
