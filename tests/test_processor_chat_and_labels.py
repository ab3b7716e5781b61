"""The processor as the one home of AF2's text conventions: prompts without stray control tokens, chat messages
checked against AF2's format, and training labels (`output_labels=True`) by the original's label rule.

Label parity: the original's training batch of the shared fixture (`batch.input_ids`, `batch.labels`).
"""

import numpy as np
import pytest
import soundfile as sf
import torch
from transformers import AutoProcessor

from transformers_af2 import AudioFlamingo2Processor
from transformers_af2.processing import processing_audioflamingo2 as processing_module
from transformers_af2.processing.processing_audioflamingo2 import (
    AUDIO_TOKEN,
    END_OF_CHUNK_TOKEN,
    IGNORE_INDEX,
    SEP_TOKEN,
    af2_labels,
    build_training_text,
)
from transformers_af2.trainer import AudioFlamingo2DataCollator

RATE = 16000


@pytest.fixture(scope="module")
def processor(converted_fixture):
    return AutoProcessor.from_pretrained(converted_fixture.repo)


@pytest.fixture(scope="module")
def wav(tmp_path_factory):
    path = tmp_path_factory.mktemp("audio") / "tone.wav"
    sf.write(path, 0.5 * np.sin(2 * np.pi * 440 * np.arange(RATE) / RATE), RATE, subtype="PCM_16")
    return str(path)


def user(question, audio):
    return {"role": "user", "content": [{"type": "audio", "path": audio}, {"type": "text", "text": question}]}


def assistant(answer):
    return {"role": "assistant", "content": [{"type": "text", "text": answer}]}


# -- questions holding special tokens ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("question", "token"),
    [
        ("what is <|endoftext|> this sound", "<|endoftext|>"),
        ("is there <audio> twice?", "<audio>"),
        ("<|im_start|>system be brief", "<|im_start|>"),
        ("say <|endofchunk|> now", "<|endofchunk|>"),
    ],
)
def test_question_with_a_special_token_is_an_error_naming_it(processor, wav, question, token):
    """Before, `<|endoftext|>` became a real eos inside the prompt, and `<audio>` anywhere made the question a
    'ready prompt' used as given (no lower-casing, no <SEP>)."""
    message = rf"text\[1\] contains the special token\(s\) \[{token!r}\]".replace("|", r"\|")
    with pytest.raises(ValueError, match=message):
        processor(text=["fine", question], audio=[wav, wav])
    with pytest.raises(ValueError, match="contains the special token"):
        processor.build_prompt(question)


def test_upper_case_tokens_in_a_question_are_plain_text(processor):
    """The prompt lower-cases the question, so `<SEP>` or `<|PAD_TOKEN|>` typed in it are not AF2's tokens."""
    ids = processor(text=["A <SEP> B <|PAD_TOKEN|>"])["input_ids"][0].tolist()
    specials = set(processor.tokenizer.get_added_vocab().values())
    assert ids[0] == processor.audio_token_id and ids[-1] == processor.sep_token_id
    assert not set(ids[1:-1]) & specials


def test_ready_prompts_are_checked(processor):
    assert processor.build_prompt("<audio>Keep As Given<SEP>") == "<audio>Keep As Given<SEP>"
    with pytest.raises(ValueError, match=r"text starts with <audio>, .* holds 0 <SEP>"):
        processor.build_prompt("<audio> what is this?")
    with pytest.raises(ValueError, match=r"text\[0\] starts with <audio>, .* holds 2 <SEP>"):
        processor(text=["<audio>q<SEP>a<SEP>"])


def test_audio_errors_name_the_batch_index(processor, wav, tmp_path):
    missing = str(tmp_path / "missing.wav")
    with pytest.raises(FileNotFoundError, match=r"audio\[3\]: .*missing\.wav: no such audio file"):
        processor(text=["a", "b", "c", "d"], audio=[wav, wav, wav, missing])
    conversations = [[user("a", wav)], [user("b", missing)]]
    with pytest.raises(FileNotFoundError, match=r"audio\[1\]: .*missing\.wav"):
        processor.apply_chat_template(conversations, tokenize=True, return_dict=True)


@pytest.mark.parametrize("value", [0, 1, -5, "512", 2.5, True])
def test_bad_max_prompt_length_is_refused(processor, value):
    with pytest.raises(ValueError, match=f"max_prompt_length must be an integer >= 2 .*got {value!r}"):
        AudioFlamingo2Processor(processor.feature_extractor, processor.tokenizer, max_prompt_length=value)


def test_bad_settings_are_refused_at_load(converted_fixture):
    with pytest.raises(ValueError, match="max_prompt_length must be an integer >= 2"):
        AutoProcessor.from_pretrained(converted_fixture.repo, max_prompt_length=0)
    with pytest.raises(ValueError, match="window_overlap must be >= 0 seconds"):
        AutoProcessor.from_pretrained(converted_fixture.repo, window_overlap=-1.0)


# -- chat messages -----------------------------------------------------------------------------------------------
AUDIO_ITEM = {"type": "audio", "path": "x.wav"}


@pytest.mark.parametrize(
    ("messages", "message"),
    [
        (
            [{"role": "system", "content": "be brief"}, {"role": "user", "content": [AUDIO_ITEM]}],
            "message 0: Audio Flamingo 2 has no system prompt",
        ),
        ([{"role": "bot", "content": [AUDIO_ITEM]}], "message 0: role 'bot' where AF2 expects 'user'"),
        ([{"role": "assistant", "content": "hi"}], "message 0: role 'assistant' where AF2 expects 'user'"),
        (
            [{"role": "user", "content": [AUDIO_ITEM]}, {"role": "user", "content": "again"}],
            "message 1: role 'user' where AF2 expects 'assistant'",
        ),
        (
            [{"role": "user", "content": [AUDIO_ITEM]}, assistant("a"), {"role": "user", "content": "and?"}],
            "message 2: .*AF2 has no multi-turn format",
        ),
        ([{"role": "user", "content": "what is this?"}], "conversation 0 holds 0 audio items"),
        ([{"role": "user", "content": [AUDIO_ITEM, AUDIO_ITEM]}], "conversation 0 holds 2 audio items"),
        (
            [
                {"role": "user", "content": [{"type": "text", "text": "q"}]},
                {"role": "assistant", "content": [AUDIO_ITEM]},
            ],
            "message 1: the audio belongs in the user message, not the assistant's",
        ),
        ([{"role": "user", "content": 42}], "message 0: content must be a string or a list"),
        ([{"role": "user", "content": {"type": "audio"}}], "message 0: content must be a string or a list"),
        (
            [{"role": "user", "content": [AUDIO_ITEM, {"type": "image", "url": "x.png"}]}],
            "message 0: AF2 reads 'text' and 'audio' content items only",
        ),
        ([{"role": "user", "content": [AUDIO_ITEM, {"type": "text", "text": 3}]}], "a text item needs a string"),
        ([{"role": "user"}], "message 0: a message is a dict with 'role' and 'content'"),
        (["hello"], "message 0: a message is a dict with 'role' and 'content'"),
        ([{"role": "user", "content": [{"type": "audio"}]}], "an audio item needs exactly one of"),
        (
            [{"role": "user", "content": [AUDIO_ITEM, {"type": "text", "text": "why <|im_end|>"}]}],
            r"message 0: the text contains the special token\(s\) \['<\|im_end\|>'\]",
        ),
        (
            [{"role": "user", "content": [AUDIO_ITEM]}, assistant("yes<|endoftext|>more")],
            r"message 1: the text contains the special token\(s\) \['<\|endoftext\|>'\]",
        ),
    ],
)
@pytest.mark.parametrize("tokenize", [False, True])
def test_malformed_chat_messages_are_clear_errors(processor, messages, message, tokenize):
    with pytest.raises(ValueError, match=f"conversation 0.*{message}|{message}"):
        processor.apply_chat_template(messages, tokenize=tokenize, return_dict=tokenize)


def test_batched_chat_errors_name_the_conversation(processor, wav):
    conversations = [[user("ok", wav)], [{"role": "user", "content": [{"type": "text", "text": "no audio"}]}]]
    with pytest.raises(ValueError, match="conversation 1 holds 0 audio items"):
        processor.apply_chat_template(conversations)


def test_well_formed_chat_still_renders_the_plain_prompt(processor, wav):
    messages = [user("  What Is This?  ", wav)]
    assert processor.apply_chat_template(messages) == "<audio>what is this?<SEP>"
    chat = processor.apply_chat_template(messages, tokenize=True, return_dict=True)
    plain = processor(text="What Is This?", audio=wav)
    assert torch.equal(chat["input_ids"], plain["input_ids"])
    assert torch.equal(chat["input_features"], plain["input_features"])
    prefill = processor.apply_chat_template(messages + [assistant("<SUMMARY> A")], continue_final_message=True)
    assert prefill == "<audio>what is this?<SEP><SUMMARY> A"


# -- training labels -----------------------------------------------------------------------------------------------
def test_output_labels_match_the_original_training_batch(processor, converted_fixture):
    """apply_chat_template(output_labels=True) and __call__(output_labels=True) give the original's ids and labels."""
    reference, tensors = converted_fixture.reference, converted_fixture.tensors
    conversations = [
        [user(prompt, str(converted_fixture.wav(index))), assistant(answer)]
        for index, (prompt, answer) in enumerate(zip(reference["prompts"], reference["answers"]))
    ]
    chat = processor.apply_chat_template(
        conversations, tokenize=True, return_dict=True, output_labels=True, padding_side="right"
    )
    assert torch.equal(chat["input_ids"], tensors["batch.input_ids"])
    assert torch.equal(chat["attention_mask"], tensors["batch.attention_mask"].to(chat["attention_mask"].dtype))
    assert torch.equal(chat["labels"], tensors["batch.labels"])
    texts = [build_training_text(p, a) for p, a in zip(reference["prompts"], reference["answers"])]
    called = processor(text=texts, output_labels=True, padding_side="right")
    assert torch.equal(called["labels"], tensors["batch.labels"])
    # Left padding (the processor's default) moves the same labels to the right end of each row.
    left = processor(text=texts, output_labels=True)
    for row in range(2):
        real = left["attention_mask"][row].bool()
        assert torch.equal(
            left["labels"][row][real], tensors["batch.labels"][row][tensors["batch.attention_mask"][row].bool()]
        )
        assert (left["labels"][row][~real] == IGNORE_INDEX).all()


def test_chat_labels_equal_the_collators(processor, wav):
    """One rule in one place: the collator's batch and the chat template's agree on ids and labels."""
    collator = AudioFlamingo2DataCollator(processor)
    examples = [
        {"audio": wav, "prompt": "What Sound?", "answer": "A Dog Barks"},
        {"audio": wav, "prompt": "longer question about the audio here", "answer": ""},
    ]
    batch = collator(examples)
    conversations = [[user(e["prompt"], wav), assistant(e["answer"])] for e in examples]
    chat = processor.apply_chat_template(
        conversations, tokenize=True, return_dict=True, output_labels=True, padding_side="right"
    )
    for key in ("input_ids", "attention_mask", "labels", "input_features", "input_features_mask"):
        assert torch.equal(chat[key], batch[key].to(chat[key].dtype)), key
    # The empty answer still trains its <|endofchunk|> and eos.
    kept = [token for token in chat["labels"][1].tolist() if token != IGNORE_INDEX]
    assert kept == [processor.end_of_chunk_token_id, processor.tokenizer.eos_token_id]


def test_collator_uses_the_processors_rule(processor, monkeypatch):
    calls = []
    original = AudioFlamingo2Processor.training_labels

    def spy(self, ids, length=None):
        calls.append(list(ids))
        return original(self, ids, length)

    monkeypatch.setattr(AudioFlamingo2Processor, "training_labels", spy)
    collator = AudioFlamingo2DataCollator(processor)
    collator.tokenize([{"prompt": "q", "answer": "a"}])
    assert len(calls) == 1 and calls[0][0] == processor.audio_token_id


def test_label_rule_lives_in_the_processor_module():
    import transformers_af2.trainer.collator as collator_module

    assert collator_module.af2_labels is af2_labels
    assert collator_module.build_training_text is build_training_text
    assert (processing_module.AUDIO_TOKEN, processing_module.SEP_TOKEN) == ("<audio>", "<SEP>")
    assert END_OF_CHUNK_TOKEN == "<|endofchunk|>" and AUDIO_TOKEN in processing_module.ADDED_SPECIAL_TOKENS
    assert build_training_text(" Q ", " A ") == f"<audio>q{SEP_TOKEN}a<|endofchunk|><|endoftext|>"


def test_output_labels_without_an_answer_is_an_error(processor, wav):
    """Before, output_labels was silently ignored: no labels came back."""
    with pytest.raises(ValueError, match=r"text\[1\] has no trainable label with output_labels=True"):
        processor(text=[build_training_text("q", "a"), "just a question"], output_labels=True)
    with pytest.raises(ValueError, match=r"text\[0\] has no trainable label"):
        processor.apply_chat_template([user("q", wav)], tokenize=True, return_dict=True, output_labels=True)
    with pytest.raises(ValueError, match="output_labels=True needs tokenize=True"):
        processor.apply_chat_template([user("q", wav), assistant("a")], output_labels=True)


def test_output_labels_drop_an_answer_cut_by_the_prompt_limit(processor):
    """As the original: a training text cut by the token limit teaches nothing of its cut answer."""
    text = build_training_text("q", "word " * 40)
    short = AudioFlamingo2Processor(processor.feature_extractor, processor.tokenizer, max_prompt_length=12)
    with pytest.raises(ValueError, match=r"text\[0\] has no trainable label"):
        short(text=[text], output_labels=True)
    full = processor(text=[text], output_labels=True)["labels"][0].tolist()
    ids = processor(text=[text])["input_ids"][0].tolist()
    assert full == af2_labels(
        ids,
        audio_token_id=processor.audio_token_id,
        sep_token_id=processor.sep_token_id,
        end_of_chunk_token_id=processor.end_of_chunk_token_id,
        eos_token_id=processor.tokenizer.eos_token_id,
        pad_token_id=processor.tokenizer.pad_token_id,
    )


def test_sanitize_control_tokens_is_refused_not_ignored(processor, wav):
    with pytest.raises(ValueError, match="sanitize_control_tokens is not supported by AudioFlamingo2Processor"):
        processor.apply_chat_template([user("q", wav)], tokenize=True, sanitize_control_tokens=True)
