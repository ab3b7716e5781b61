"""Generation safeguards on tiny random models: NaN/inf logits stop generation with an error naming the input, and a
user's `max_length` is obeyed although the generation config sets `max_new_tokens`."""

import pytest
import torch
from conftest import random_audio_inputs, tiny_model
from transformers import GenerationConfig, LogitsProcessorList

from transformers_af2 import AudioFlamingo2ForConditionalGeneration
from transformers_af2.generation_utils import (
    NonFiniteLogitsCheck,
    NonFiniteLogitsError,
    generate_kwargs_honouring_max_length,
    with_non_finite_check,
)

# Two prompts of the same length; token 50 appears in the second only.
PROMPTS = torch.tensor([[95, 10, 11, 12], [95, 10, 50, 12]])


def _inputs(rows=2):
    features, mask = random_audio_inputs([1] * rows)
    ids = PROMPTS[:rows]
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "input_features": features,
        "input_features_mask": mask,
    }


def _generate(model, inputs, **kwargs):
    kwargs = {"max_new_tokens": 4, "pad_token_id": 97, "eos_token_id": None, **kwargs}
    with torch.no_grad():
        return model.generate(**inputs, **kwargs)


def _poison(model, value, token=None):
    """`value` (NaN/inf) in the whole LM head (every row's logits) or in one token's embedding (the rows holding it)."""
    with torch.no_grad():
        if token is None:
            model.lm_head.weight.fill_(value)
        else:
            model.get_input_embeddings().weight[token] = value
    return model


# ---------------------------------------------------------------------------------------------------------------------
# non-finite logits
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("do_sample", [False, True])
def test_non_finite_logits_raise_naming_the_row(value, do_sample):
    model = _poison(tiny_model(), value)
    check = LogitsProcessorList([NonFiniteLogitsCheck(["audio 'a.wav'", "audio 'b.wav'"])])
    with pytest.raises(NonFiniteLogitsError) as raised:
        _generate(model, _inputs(), do_sample=do_sample, logits_processor=check)
    message = str(raised.value)
    assert "batch row 0 (audio 'a.wav')" in message and "rows [0, 1] in all" in message
    if value != value:
        assert "99 NaN and 0 +inf of 99 logits" in message
    else:  # inf weights times activations of both signs: +inf, -inf and NaN (inf - inf) logits
        assert " +inf of 99 logits" in message and "0 NaN and 0 +inf" not in message
    assert f"sequence position {PROMPTS.shape[1]}" in message  # the first step


def test_only_the_poisoned_input_is_named():
    model = _poison(tiny_model(), float("nan"), token=50)  # token 50: in the second prompt only
    check = LogitsProcessorList([NonFiniteLogitsCheck(["audio 'a.wav'", "audio 'b.wav'"])])
    with pytest.raises(NonFiniteLogitsError, match=r"batch row 1 \(audio 'b.wav'\) has 99 NaN and 0 \+inf of 99"):
        _generate(model, _inputs(), logits_processor=check)
    # The clean input alone still generates, through the same check.
    assert _generate(model, _inputs(rows=1), logits_processor=check).shape == (1, PROMPTS.shape[1] + 4)


def test_rows_per_input_follow_beams_and_return_sequences():
    model = _poison(tiny_model(), float("nan"), token=50)
    check = LogitsProcessorList([NonFiniteLogitsCheck(["first", "second"])])
    with pytest.raises(NonFiniteLogitsError, match=r"batch row 3 \(second\)"):  # 3 beams per input: rows 3..5
        _generate(model, _inputs(), num_beams=3, logits_processor=check)
    with pytest.raises(NonFiniteLogitsError, match=r"batch row 2 \(second\)"):
        _generate(model, _inputs(), do_sample=True, num_return_sequences=2, logits_processor=check)


def test_minus_inf_alone_is_allowed_but_a_row_without_any_finite_logit_is_not():
    check = NonFiniteLogitsCheck()
    ids = torch.zeros(2, 3, dtype=torch.long)
    masked = torch.tensor([[0.0, -float("inf"), 1.0], [2.0, -float("inf"), -float("inf")]])
    assert check(ids, masked) is masked
    with pytest.raises(NonFiniteLogitsError, match="batch row 1 has no finite logit"):
        check(ids, torch.tensor([[0.0, 1.0, 2.0], [-float("inf")] * 3]))


def test_with_non_finite_check_puts_one_check_first():
    from transformers import MinLengthLogitsProcessor

    other = MinLengthLogitsProcessor(3, eos_token_id=98)
    named = NonFiniteLogitsCheck(["x"])
    merged = with_non_finite_check([other, named])
    assert list(merged) == [named, other]  # an existing check moves to the front and keeps its names
    renamed = with_non_finite_check(merged, ["y"])
    assert len(renamed) == 2 and renamed[0].input_names == ["y"] and renamed[1] is other
    assert isinstance(with_non_finite_check(None)[0], NonFiniteLogitsCheck)


def test_model_hook_checks_every_generate_call():
    """With the hook in the model class, a plain generate() call raises too (no processor passed)."""
    model = _poison(tiny_model(), float("nan"))
    with pytest.raises(NonFiniteLogitsError, match="batch row 0 has 99 NaN"):
        _generate(model, _inputs())
    with pytest.raises(NonFiniteLogitsError, match="batch row 0 has 99 NaN"):
        _generate(model, _inputs(), do_sample=True)


# ---------------------------------------------------------------------------------------------------------------------
# max_length over the generation config's max_new_tokens
# ---------------------------------------------------------------------------------------------------------------------


def _with_default_max_new_tokens(model):
    """As a converted checkpoint: the generation config pins max_new_tokens (256)."""
    model.generation_config.max_new_tokens = 256
    model.generation_config.pad_token_id = 97
    model.generation_config.eos_token_id = None
    return model


@pytest.mark.parametrize("how", ["kwarg", "generation_config"])
def test_model_hook_honours_max_length(how):
    model = _with_default_max_new_tokens(tiny_model())
    user = {"max_length": 7} if how == "kwarg" else {"generation_config": GenerationConfig(max_length=7)}
    with torch.no_grad():
        out = model.generate(**_inputs(), **user)
    assert out.shape[1] == 7
    model.generation_config.max_new_tokens = 9
    with torch.no_grad():  # both given: transformers' rule, max_new_tokens wins
        both = model.generate(**_inputs(), max_length=7, max_new_tokens=5)
        default = model.generate(**_inputs(rows=1))  # neither: the generation config's max_new_tokens
    assert both.shape[1] == PROMPTS.shape[1] + 5
    assert default.shape[1] == PROMPTS.shape[1] + 9


def test_generate_kwargs_honouring_max_length():
    model = _with_default_max_new_tokens(tiny_model())
    assert generate_kwargs_honouring_max_length({"do_sample": False}) == {"do_sample": False}
    assert generate_kwargs_honouring_max_length({"max_length": 5, "max_new_tokens": 2}) == {
        "max_length": 5,
        "max_new_tokens": 2,
    }
    kwargs = generate_kwargs_honouring_max_length({"max_length": 6})
    assert kwargs == {"max_length": 6, "max_new_tokens": None}
    user = GenerationConfig(max_length=7)
    kwargs = generate_kwargs_honouring_max_length({"generation_config": user})
    assert kwargs["generation_config"] is not user and user.max_new_tokens is None  # the user's object is untouched
    with torch.no_grad():
        assert model.generate(**_inputs(), **kwargs).shape[1] == 7
        assert model.generate(**_inputs(), max_length=6, max_new_tokens=None).shape[1] == 6


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_loading_non_finite_weights_is_an_error_naming_them(tmp_path, dtype):
    """A saved model with NaN/inf weights is refused at load with the tensors' names (conversion refuses them too)."""
    model = tiny_model().to(dtype)
    layer = next(layer for layer in model.model.language_model.layers if layer.cross_attn is not None)
    poisoned = {
        "cross_attn.q_proj.weight": (layer.cross_attn.q_proj.weight, float("nan")),
        "audio_transformer.layers.0.fc1.weight": (model.model.audio_transformer.layers[0].fc1.weight, float("inf")),
        "lm_head.weight": (model.lm_head.weight, float("-inf")),
    }
    with torch.no_grad():
        for weight, value in poisoned.values():
            weight[1, 2] = value
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"3 weight tensor\(s\) hold NaN or inf") as error:
        AudioFlamingo2ForConditionalGeneration.from_pretrained(tmp_path, dtype=dtype)
    assert all(name in str(error.value) for name in poisoned)
    with torch.no_grad():
        for weight, _ in poisoned.values():
            weight[1, 2] = 0.0
    model.save_pretrained(tmp_path)
    AudioFlamingo2ForConditionalGeneration.from_pretrained(tmp_path, dtype=dtype)  # finite again: loads
