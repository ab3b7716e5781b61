"""The package on the installed transformers release: the cache's name, no deprecation notices of our own making,
and code written for the other spelling still working."""

import logging
import warnings

import pytest
import torch
import transformers
from conftest import random_audio_inputs, tiny_model
from packaging.version import Version
from transformers import pipeline
from transformers.utils import logging as hf_logging

from transformers_af2 import AudioFlamingo2Cache
from transformers_af2.compat import CACHE_KWARG


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(level=logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture
def transformers_warnings():
    """Everything transformers' loggers warn about during the test (they do not propagate to pytest's caplog)."""
    handler = _Records()
    root = hf_logging.get_logger("transformers")
    root.addHandler(handler)
    ours = logging.getLogger("transformers_af2")
    ours.addHandler(handler)
    try:
        yield handler.messages
    finally:
        root.removeHandler(handler)
        ours.removeHandler(handler)


def _inputs():
    features, features_mask = random_audio_inputs([2, 1])
    ids = torch.tensor([[95, 5, 6, 7, 94], [97, 97, 95, 8, 94]])
    mask = (ids != 97).long()
    return dict(input_ids=ids, attention_mask=mask, input_features=features, input_features_mask=features_mask)


def test_cache_kwarg_is_the_installed_releases_name():
    renamed = Version(transformers.__version__).release >= (5, 24)
    expected = "cache" if renamed else "past_key_values"
    assert CACHE_KWARG == expected


def test_no_deprecation_notice_from_the_package(transformers_warnings, tmp_path):
    """Forward with labels, generate with audio, save/load and the pipeline's generation path on the installed
    release: neither a Python DeprecationWarning/FutureWarning nor a transformers log line about deprecation."""
    model = tiny_model()
    inputs = _inputs()
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        warnings.simplefilter("error", FutureWarning)
        out = model(**inputs, labels=inputs["input_ids"])
        assert isinstance(out[CACHE_KWARG], AudioFlamingo2Cache)
        assert torch.isfinite(out.loss)
        generated = model.generate(**inputs, max_new_tokens=4, do_sample=False, pad_token_id=97)
        assert generated.shape == (2, 9)
        model.save_pretrained(tmp_path)
        type(model).from_pretrained(tmp_path)
    deprecations = [m for m in transformers_warnings if "deprecat" in m.lower()]
    assert deprecations == []


def test_the_old_cache_name_still_works(transformers_warnings):
    """Code written for releases before 5.24 (`past_key_values=`) gives the same logits on every supported release."""
    model = tiny_model()
    inputs = _inputs()
    with torch.no_grad():
        prefill = model(**inputs, use_cache=True)
        cache = prefill[CACHE_KWARG]
        step_ids = torch.tensor([[3], [4]])
        step_mask = torch.cat([inputs["attention_mask"], torch.ones(2, 1, dtype=torch.long)], dim=1)
        expected = model(input_ids=step_ids, attention_mask=step_mask, **{CACHE_KWARG: cache}).logits
        cache.crop(-1)
        got = model(input_ids=step_ids, attention_mask=step_mask, past_key_values=cache).logits
    assert torch.equal(got, expected)
    if CACHE_KWARG != "past_key_values":
        assert any("`past_key_values` is named `cache`" in m for m in transformers_warnings)
        with pytest.raises(ValueError, match="Pass the cache once"):
            model(input_ids=step_ids, attention_mask=step_mask, past_key_values=cache, cache=cache)


def test_pipeline_answers_on_the_installed_release(loaded, transformers_warnings):
    """The pipeline's whole generation path (processor, generate with the audio cache, answer rule) on the installed
    release gives the original's greedy continuation from the parity fixture, without deprecation notices."""
    fixture, model, processor = loaded
    pipe = pipeline("audio-text-to-text", model=model, processor=processor)
    prompt_length = fixture.ids("s0.prompt_ids").shape[1]
    expected = fixture.ids("s0.greedy_ids")[0, prompt_length:].tolist()
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        warnings.simplefilter("error", FutureWarning)
        out = pipe(
            audio=str(fixture.wav(0)),
            text=fixture.reference["prompts"][0],
            max_new_tokens=fixture.reference["max_new_tokens"],
            do_sample=False,
            return_tensors=True,
        )
    assert out[0]["generated_token_ids"].tolist() == expected
    assert [m for m in transformers_warnings if "deprecat" in m.lower()] == []


def test_loading_fetches_no_hub_kernels(tmp_path):
    # transformers 5.25 replaces layers with kernels from the hub at load unless told not to; AF2 loads without them
    # through every entry point (its classes and the Auto classes), and a caller can still ask for them.
    from transformers import AutoModel

    from transformers_af2 import AudioFlamingo2ForConditionalGeneration, AudioFlamingo2Model

    tiny_model().save_pretrained(tmp_path)
    for load in (AudioFlamingo2ForConditionalGeneration, AudioFlamingo2Model, AutoModel):
        assert load.from_pretrained(tmp_path).use_kernels is False, load
