"""The model follows transformers' conventions: tuple outputs, loading from a state dict, weight initialisation on
the meta device and for missing keys, the tensor-parallel plan, torch.export / torch.compile, explicit caches and
`get_audio_features`' output object."""

import pytest
import torch
from conftest import random_audio_inputs, tiny_config, tiny_model
from huggingface_hub.errors import StrictDataclassClassValidationError
from safetensors.torch import load_file, save_file
from test_modeling import _greedy, _prompts
from transformers import DynamicCache, StaticCache
from transformers.modeling_layers import GradientCheckpointingLayer

from transformers_af2 import (
    AudioFlamingo2Cache,
    AudioFlamingo2ForConditionalGeneration,
    AudioFlamingo2Model,
)
from transformers_af2.compat import CACHE_KWARG
from transformers_af2.modeling.modeling_audioflamingo2 import AudioFlamingo2AudioOutput


def _inputs(lengths=(6, 4), window_counts=(2, 1)):
    features, features_mask = random_audio_inputs(list(window_counts))
    ids, mask = _prompts(list(lengths))
    return dict(input_ids=ids, attention_mask=mask, input_features=features, input_features_mask=features_mask)


def test_return_dict_false_gives_the_fields_as_a_tuple():
    model = tiny_model()
    inputs = _inputs()
    with torch.no_grad():
        expected = model(**inputs, use_cache=False)
        as_tuple = model(**inputs, use_cache=False, return_dict=False)
        assert isinstance(as_tuple, tuple)
        torch.testing.assert_close(as_tuple[0], expected.logits, atol=0, rtol=0)
        torch.testing.assert_close(as_tuple[1], expected.audio_embeds, atol=0, rtol=0)
        base = model.model(**inputs, use_cache=False, return_dict=False)
        assert isinstance(base, tuple)
        torch.testing.assert_close(base[0], model.model(**inputs, use_cache=False).last_hidden_state, atol=0, rtol=0)
        # also when the config asks for tuples
        model.config.return_dict = False
        torch.testing.assert_close(model(**inputs, use_cache=False)[0], expected.logits, atol=0, rtol=0)


def test_from_pretrained_with_config_and_state_dict_only():
    model = tiny_model()
    inputs = _inputs()
    loaded = AudioFlamingo2ForConditionalGeneration.from_pretrained(
        None, config=model.config, state_dict=model.state_dict()
    ).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, model(**inputs).logits, atol=0, rtol=0)


def _check_initialised_extras(model):
    for layer in model.model.language_model.layers:
        if layer.cross_attn is not None:
            assert layer.cross_attn.attn_gate.item() == 0 and layer.cross_attn.ff_gate.item() == 0
    attentions = [m for m in model.model.audio_tower.modules() if hasattr(m, "relative_position_index")]
    assert attentions
    for attention in attentions:
        assert torch.equal(attention.relative_position_index, attention.create_relative_position_index())
    rotary = model.model.audio_transformer.rotary_emb
    assert torch.equal(rotary.inv_freq, rotary.compute_inv_freq())


def test_model_built_on_the_meta_device_initialises_every_tensor():
    with torch.device("meta"):
        model = AudioFlamingo2ForConditionalGeneration(tiny_config())
    model.to_empty(device="cpu")
    model.init_weights()
    model.eval()
    _check_initialised_extras(model)
    with torch.no_grad():
        logits = model(**_inputs()).logits
    assert torch.isfinite(logits).all()


def test_checkpoint_without_gates_or_position_buffers_loads_their_initial_values(tmp_path):
    model = tiny_model()  # non-zero gates
    model.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    dropped = [k for k in weights if k.endswith(("attn_gate", "ff_gate", "relative_position_index"))]
    assert len([k for k in dropped if k.endswith("gate")]) == 2 and len(dropped) > 2
    save_file({k: v for k, v in weights.items() if k not in dropped}, tmp_path / "model.safetensors")
    loaded = AudioFlamingo2ForConditionalGeneration.from_pretrained(tmp_path).eval()
    _check_initialised_extras(loaded)
    zero_gates = tiny_model(nonzero_gates=False)  # same seed, so same weights with gates 0
    inputs = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, zero_gates(**inputs).logits, atol=1e-6, rtol=0)


def test_tied_lm_head_has_a_tensor_parallel_plan_entry():
    model = tiny_model(text_config=dict(tiny_config().text_config.to_dict(), tie_word_embeddings=True))
    assert model.lm_head.weight is model.model.language_model.embed_tokens.weight
    assert model.tp_plan["lm_head"] == "colwise_gather_output"
    assert model.tp_plan["model.language_model.embed_tokens"] == "embedding_rowwise"


def test_export_with_audio_matches_eager():
    """torch.export traces the prefill with audio (no data-dependent branch); the program is right for any window
    padding of the same shapes, not only the traced one."""
    model = tiny_model()
    inputs = dict(_inputs(), use_cache=False)
    program = torch.export.export(model, args=(), kwargs=inputs, strict=False)
    other_padding = dict(inputs)
    other_padding["input_features"], other_padding["input_features_mask"] = random_audio_inputs([1, 2], seed=3)
    with torch.no_grad():
        for case in (inputs, other_padding):
            torch.testing.assert_close(program.module()(**case).logits, model(**case).logits, atol=1e-5, rtol=0)


def test_compiled_model_in_inference_mode_on_cpu_matches_eager():
    model = tiny_model()
    ids, mask = _prompts([12, 10])  # 24 rows per linear: more than the few-row path of the optional CPU linears
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    torch._dynamo.reset()
    compiled = torch.compile(model)
    with torch.inference_mode():
        got = compiled(input_ids=ids, attention_mask=mask, use_cache=False).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="an offloaded cache needs an accelerator stream, which CPU-only torch lacks"
)
def test_offloaded_cache_implementation_is_kept():
    model = tiny_model().to("cuda")
    inputs = {k: v.to("cuda") for k, v in _inputs().items()}
    expected = _greedy(model, **inputs)
    out = _greedy(model, **inputs, cache_implementation="offloaded", return_dict_in_generate=True)
    cache = out[CACHE_KWARG]
    assert isinstance(cache, AudioFlamingo2Cache) and cache.offloading
    assert cache.has_audio
    assert torch.equal(out.sequences, expected)


def test_cache_that_cannot_hold_the_audio_is_refused_before_generating():
    model = tiny_model()
    inputs = _inputs()
    with pytest.raises(ValueError, match=r"cache_implementation='static' \(a StaticCache\) cannot hold them"):
        _greedy(model, **inputs, cache_implementation="static")
    with pytest.raises(ValueError, match=rf"the DynamicCache passed as `{CACHE_KWARG}` cannot hold them"):
        _greedy(model, **inputs, **{CACHE_KWARG: DynamicCache()})
    # text only: a user's cache of any kind is used as given
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    static = StaticCache(config=model.config.text_config, max_cache_len=16)
    with_static = _greedy(model, input_ids=ids, attention_mask=mask, **{CACHE_KWARG: static})
    assert torch.equal(with_static, _greedy(model, input_ids=ids, attention_mask=mask))
    assert static.get_seq_length() > 0


@pytest.mark.parametrize("model_class", [AudioFlamingo2Model, AudioFlamingo2ForConditionalGeneration])
def test_get_audio_features_returns_an_output_object(model_class):
    torch.manual_seed(0)
    model = model_class(tiny_config()).eval()
    features, features_mask = random_audio_inputs([3, 1, 2])
    num_layers = model.config.audio_transformer_num_layers
    with torch.no_grad():
        audio = model.get_audio_features(features, features_mask)
        assert isinstance(audio, AudioFlamingo2AudioOutput)
        assert audio.last_hidden_state.shape == (3, 3 * 64, model.config.audio_hidden_size)
        assert audio.audio_attention_mask.sum(dim=1).tolist() == [3 * 64, 64, 2 * 64]
        assert audio.hidden_states is None and audio.attentions is None
        # hidden states come from one call over the padded batch: the embeddings must not change
        with_states = model.get_audio_features(features, features_mask, output_hidden_states=True)
        assert len(with_states.hidden_states) == num_layers + 1
        torch.testing.assert_close(with_states.hidden_states[-1][audio.audio_attention_mask], audio.last_hidden_state[
            audio.audio_attention_mask])  # fmt: skip
        torch.testing.assert_close(with_states.last_hidden_state, audio.last_hidden_state, atol=1e-5, rtol=0)
        model.set_attn_implementation("eager")
        with_attentions = model.get_audio_features(features, features_mask, output_attentions=True)
        assert len(with_attentions.attentions) == num_layers
        assert with_attentions.attentions[0].shape == (3, model.config.audio_transformer_num_heads, 192, 192)
        # padded keys get no weight
        assert with_attentions.attentions[0][1, :, :, 64:].abs().max() == 0
        as_tuple = model.get_audio_features(features, features_mask, return_dict=False)
        assert isinstance(as_tuple, tuple)
        torch.testing.assert_close(as_tuple[0], audio.last_hidden_state, atol=1e-5, rtol=0)
        model.config.output_hidden_states = True  # the config's default applies too
        assert len(model.get_audio_features(features, features_mask).hidden_states) == num_layers + 1


def test_zero_cross_attention_period_is_a_clear_error():
    invalid = (ValueError, StrictDataclassClassValidationError)
    with pytest.raises(invalid, match="cross_attention_every_n_layers must be >= 1, got 0"):
        tiny_config(cross_attention_every_n_layers=0)


def test_encoder_and_decoder_layers_checkpoint_through_transformers():
    model = tiny_model().train()
    layers = [*model.model.audio_transformer.layers, *model.model.language_model.layers]
    assert all(isinstance(layer, GradientCheckpointingLayer) for layer in layers)
    # transformers 5.23 renamed it; earlier releases of the supported range have only the old name.
    (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
    assert all(layer.gradient_checkpointing for layer in layers)


def test_audio_tower_attention_backend_is_resolved_with_the_model(tmp_path):
    model = tiny_model()
    assert model.config.audio_config._attn_implementation == "sdpa"
    model.save_pretrained(tmp_path)
    eager = AudioFlamingo2ForConditionalGeneration.from_pretrained(tmp_path, attn_implementation="eager")
    assert eager.config.audio_config._attn_implementation == "eager"
    mixed = AudioFlamingo2ForConditionalGeneration.from_pretrained(
        tmp_path, attn_implementation={"": "sdpa", "audio_config": "eager", "text_config": "sdpa"}
    )
    assert mixed.config.audio_config._attn_implementation == "eager"
    assert mixed.config.text_config._attn_implementation == "sdpa"
