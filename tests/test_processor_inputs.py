"""Bad text and model inputs: each gets a clear error naming the input, or the documented result."""

import numpy as np
import pytest
import torch
from conftest import random_audio_inputs, tiny_model
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoProcessor
from transformers.testing_utils import CaptureLogger

from transformers_af2.processing import processing_audioflamingo2 as processing_module


@pytest.fixture(scope="module")
def processor(converted_fixture):
    return AutoProcessor.from_pretrained(converted_fixture.repo)


def test_plain_question_becomes_af2_prompt(processor):
    prompt = processor.build_prompt("  What Is This Sound?  ")
    assert prompt == "<audio>what is this sound?<SEP>"
    assert processor.build_prompt("<audio>Keep As Given<SEP>") == "<audio>Keep As Given<SEP>"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("<SEP> a question holding <audio><audio>", r"text\[0\] contains the special token\(s\) \['<audio>'\]"),
        ("<audio>two markers<audio><SEP>", r"text\[0\] starts with <audio>, .* but it holds 2 <audio>"),
        ("<audio>a ready prompt without its separator", r"text\[0\] starts with <audio>, .* but it holds 0 <SEP>"),
    ],
)
def test_audio_marker_count_is_checked(processor, text, message):
    with pytest.raises(ValueError, match=message):
        processor(text=[text], audio=[np.zeros(16000, dtype=np.float32) + 0.1], sampling_rate=16000)


def test_text_and_audio_counts_must_match(processor):
    with pytest.raises(ValueError, match="got 2 texts but 1 audios"):
        processor(text=["a", "b"], audio=[np.full(1600, 0.1)], sampling_rate=16000)


def test_text_must_be_strings(processor):
    with pytest.raises(TypeError, match="text must be a string"):
        processor(text=[123])


def test_prompt_over_the_limit_is_cut_with_a_warning(processor):
    question = "word " * 2000
    with CaptureLogger(processing_module.logger) as captured:
        batch = processor(text=[question, "short"])
    assert "batch index 0 is" in captured.out and "Keeping the first 512" in captured.out
    assert batch["input_ids"].shape[1] == processor.max_prompt_length


def test_audio_error_names_the_batch_index(processor):
    with pytest.raises(ValueError, match=r"audio\[1\]: .*NaN"):
        processor(text=["a", "b"], audio=[np.full(1600, 0.1), np.full(1600, np.nan)], sampling_rate=16000)


def test_features_in_another_dtype_are_cast_to_the_tower():
    model = tiny_model().to(torch.bfloat16)
    features, mask = random_audio_inputs([1])
    ids = torch.tensor([[95, 3, 4, 5]])
    out = model(input_ids=ids, input_features=features.double(), input_features_mask=mask)
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.logits.float()).all()


def test_features_on_another_device_raise_a_clear_error():
    model = tiny_model()
    features, mask = random_audio_inputs([1])
    ids = torch.tensor([[95, 3, 4, 5]])
    with pytest.raises(ValueError, match="input_features is on meta but the model is on cpu"):
        model(input_ids=ids, input_features=features.to("meta"), input_features_mask=mask)


@settings(
    max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    question=st.text(max_size=300)
    | st.lists(st.sampled_from(["<audio>", "<SEP>", "<|endoftext|>", "<|im_start|>", " a", "B "]), max_size=6).map(
        "".join
    )
)
def test_text_path_fuzz(processor, question):
    """Any string: a prompt with one <audio> first and one <SEP>, never a control token from the question; or the
    error naming the special tokens in it (or, for a text starting with <audio>, the ready-prompt error)."""
    audio = np.full(1600, 0.1, dtype=np.float32)
    try:
        batch = processor(text=[question], audio=[audio], sampling_rate=16000)
    except ValueError as error:
        if question.startswith("<audio>"):
            assert "used as a ready prompt" in str(error)
        else:
            found = processor.control_tokens_in(question.lower().strip())
            assert found and f"contains the special token(s) {found}" in str(error)
        return
    ids = batch["input_ids"][0].tolist()
    sep_id = processor.tokenizer.convert_tokens_to_ids("<SEP>")
    assert ids[0] == processor.audio_token_id and ids.count(processor.audio_token_id) == 1 and ids.count(sep_id) == 1
    if not question.startswith("<audio>"):
        assert ids[-1] == sep_id
        assert not set(ids[1:-1]) & set(processor.tokenizer.get_added_vocab().values())
    assert torch.isfinite(batch["input_features"]).all()
