"""Parity with the original AF2 code on the shared fixtures (tolerances from ../shared/parity/README.md)."""

import pytest
import torch

import transformers_af2  # noqa: F401  (registers the Auto classes)

STAGE_TOLERANCE = 1e-4
END_TO_END_LOGITS_TOLERANCE = 1e-3
LOSS_TOLERANCE = 1e-4
SAMPLES = ("s0", "s1")


def _max_diff(a, b):
    return (a.float() - b.float()).abs().max().item()


@pytest.mark.parametrize("sample", SAMPLES)
def test_audio_tower_stage(loaded, sample):
    fixture, model, _ = loaded
    mel = fixture.tensors[f"{sample}.mel"]
    with torch.no_grad():
        tokens = model.model.audio_tower(mel.unsqueeze(1)).last_hidden_state.flatten(2).transpose(1, 2)
    assert _max_diff(tokens, fixture.tensors[f"{sample}.clap_encodings"]) <= STAGE_TOLERANCE


@pytest.mark.parametrize("sample", SAMPLES)
def test_audio_transformer_stage(loaded, sample):
    fixture, model, _ = loaded
    encodings = fixture.tensors[f"{sample}.clap_encodings"]
    tokens = encodings.reshape(1, -1, encodings.shape[-1])
    with torch.no_grad():
        out = model.model.audio_transformer(tokens, torch.ones(tokens.shape[:2], dtype=torch.bool))
    assert _max_diff(out[0], fixture.tensors[f"{sample}.audio_transformer_out"]) <= STAGE_TOLERANCE


@pytest.mark.parametrize("sample", SAMPLES)
def test_language_model_stage(loaded, sample):
    """Teacher-forced logits from the fixture's own mel and token ids."""
    fixture, model, _ = loaded
    mel = fixture.tensors[f"{sample}.mel"].unsqueeze(0)
    with torch.no_grad():
        logits = model(input_ids=fixture.ids(f"{sample}.train_ids"), input_features=mel).logits
    expected = fixture.tensors[f"{sample}.train_logits"].reshape(logits.shape)
    assert _max_diff(logits, expected) <= STAGE_TOLERANCE


@pytest.mark.parametrize("sample", SAMPLES)
def test_greedy_stage(loaded, sample):
    fixture, model, _ = loaded
    mel = fixture.tensors[f"{sample}.mel"].unsqueeze(0)
    prompt = fixture.ids(f"{sample}.prompt_ids")
    with torch.no_grad():
        out = model.generate(
            input_ids=prompt,
            input_features=mel,
            do_sample=False,
            output_scores=True,
            return_dict_in_generate=True,
            max_new_tokens=fixture.reference["max_new_tokens"],
        )
    assert torch.equal(out.sequences, fixture.ids(f"{sample}.greedy_ids"))
    scores = torch.stack(out.scores, dim=1)[0]
    expected_scores = fixture.tensors[f"{sample}.greedy_scores"].reshape(scores.shape)
    assert _max_diff(scores, expected_scores) <= STAGE_TOLERANCE


def test_tokenizer_has_af2_tokens(loaded):
    fixture, model, processor = loaded
    for token, token_id in fixture.reference["special_tokens"].items():
        assert processor.tokenizer.convert_tokens_to_ids(token) == token_id
    assert len(processor.tokenizer) == fixture.reference["vocab_size"] == model.config.text_config.vocab_size
    assert model.config.audio_token_id == fixture.reference["special_tokens"]["<audio>"]
    assert model.config.sep_token_id == fixture.reference["special_tokens"]["<SEP>"]


@pytest.mark.parametrize("index", [0, 1])
def test_end_to_end_from_wav(loaded, index):
    """Processor on the WAV file -> converted checkpoint: prompt ids, features, logits, greedy ids."""
    fixture, model, processor = loaded
    sample = SAMPLES[index]
    inputs = processor(text=fixture.reference["prompts"][index], audio=str(fixture.wav(index)))
    assert torch.equal(inputs["input_ids"], fixture.ids(f"{sample}.prompt_ids"))
    assert inputs["input_features_mask"].sum().item() == fixture.reference[f"{sample}.num_windows"]
    with torch.no_grad():
        logits = model(
            input_ids=fixture.ids(f"{sample}.train_ids"),
            input_features=inputs["input_features"],
            input_features_mask=inputs["input_features_mask"],
        ).logits
        expected = fixture.tensors[f"{sample}.train_logits"].reshape(logits.shape)
        assert _max_diff(logits, expected) <= END_TO_END_LOGITS_TOLERANCE
        generated = model.generate(**inputs, do_sample=False, max_new_tokens=fixture.reference["max_new_tokens"])
    assert torch.equal(generated, fixture.ids(f"{sample}.greedy_ids"))


def test_end_to_end_batch_loss(loaded):
    """Both WAVs as one batch (windows padded to the longest) with the fixture's right-padded ids and labels."""
    fixture, model, processor = loaded
    features = processor.feature_extractor([str(fixture.wav(0)), str(fixture.wav(1))], return_tensors="pt")
    assert torch.equal(
        features["input_features_mask"].to(fixture.tensors["batch.audio_mask"].dtype),
        fixture.tensors["batch.audio_mask"],
    )
    attention_mask = fixture.tensors["batch.attention_mask"]
    with torch.no_grad():
        out = model(
            input_ids=fixture.tensors["batch.input_ids"],
            attention_mask=attention_mask,
            labels=fixture.tensors["batch.labels"],
            **features,
        )
    assert abs(out.loss.item() - fixture.reference["batch.loss"]) <= LOSS_TOLERANCE
    valid = attention_mask.bool()
    assert _max_diff(out.logits[valid], fixture.tensors["batch.logits"][valid]) <= END_TO_END_LOGITS_TOLERANCE


def test_batched_generation_matches_per_sample_greedy(loaded):
    """Both prompts left-padded in one generate call give each sample's reference greedy continuation."""
    fixture, model, processor = loaded
    inputs = processor(text=fixture.reference["prompts"], audio=[str(fixture.wav(0)), str(fixture.wav(1))])
    with torch.no_grad():
        generated = model.generate(**inputs, do_sample=False, max_new_tokens=fixture.reference["max_new_tokens"])
    prompt_length = inputs["input_ids"].shape[1]
    for row, sample in enumerate(SAMPLES):
        expected = fixture.ids(f"{sample}.greedy_ids")[0]
        expected_new = expected[fixture.ids(f"{sample}.prompt_ids").shape[1] :]
        assert torch.equal(generated[row, prompt_length : prompt_length + len(expected_new)], expected_new)
