"""pipeline("audio-text-to-text"), AF2 in pipeline("any-to-any"), the chat template, streamers and the SoundCoT
repair step, on the converted parity fixture: every answer is checked against direct `generate` and the fixture."""

import logging
import threading
from contextlib import contextmanager

import pytest
import torch
from transformers import (
    AutoModelForMultimodalLM,
    AutoProcessor,
    LogitsProcessor,
    LogitsProcessorList,
    TextIteratorStreamer,
    TextStreamer,
    pipeline,
)
from transformers.utils import logging as hf_logging

import transformers_af2
from transformers_af2.pipelines import AudioTextToTextPipeline
from transformers_af2.soundcot import SOUNDCOT_REPAIR_SUFFIX, soundcot_repair_prefix

SAMPLES = ("s0", "s1")


@pytest.fixture(scope="module")
def pipe(loaded):
    _, model, processor = loaded
    return pipeline("audio-text-to-text", model=model, processor=processor, device="cpu")


def _expected_new_ids(fixture, sample):
    """The original's greedy continuation (the fixture), i.e. what direct `generate` must give too."""
    prompt_length = fixture.ids(f"{sample}.prompt_ids").shape[1]
    return fixture.ids(f"{sample}.greedy_ids")[0, prompt_length:].tolist()


def _direct_generate(model, processor, question, audio, **kwargs):
    inputs = processor(text=question, audio=audio)
    with torch.no_grad():
        generated = model.generate(**inputs, **kwargs)
    return generated[0, inputs["input_ids"].shape[1] :].tolist()


@contextmanager
def transformers_log_records():
    """transformers' loggers do not propagate to the root logger; collect their records directly."""
    records = []

    class Collect(logging.Handler):
        def emit(self, record):
            records.append(record)

    handler = Collect(level=logging.DEBUG)
    root = hf_logging.get_logger("transformers")
    root.addHandler(handler)
    try:
        yield records
    finally:
        root.removeHandler(handler)


# ---------------------------------------------------------------------------------------------------------------------
# pipeline("audio-text-to-text")
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("index", [0, 1])
def test_pipeline_answer_ids_equal_direct_generate(loaded, pipe, index):
    fixture, model, processor = loaded
    sample, question, wav = SAMPLES[index], fixture.reference["prompts"][index], str(fixture.wav(index))
    max_new = fixture.reference["max_new_tokens"]
    out = pipe(audio=wav, text=question, max_new_tokens=max_new, do_sample=False, return_tensors=True)
    assert isinstance(out, list) and len(out) == 1
    direct = _direct_generate(model, processor, question, wav, max_new_tokens=max_new, do_sample=False)
    assert out[0]["generated_token_ids"].tolist() == direct == _expected_new_ids(fixture, sample)
    assert out[0]["generated_text"] == processor.batch_decode([direct], skip_special_tokens=True)[0].strip()
    assert out[0]["input_text"] == question


def test_pipeline_answer_is_clean_text_after_sep(loaded, pipe):
    fixture, _, _ = loaded
    out = pipe(audio=str(fixture.wav(1)), text=fixture.reference["prompts"][1], max_new_tokens=8)
    answer = out[0]["generated_text"]
    for token in ("<audio>", "<SEP>", "<|endofchunk|>", "<|endoftext|>", "<|PAD_TOKEN|>"):
        assert token not in answer
    assert fixture.reference["prompts"][1].lower().strip() not in answer
    assert answer == answer.strip() and answer


def test_pipeline_batch_matches_each_input_alone(loaded, pipe):
    """Two audios of 3 and 1 windows in one left-padded batch: each gets the fixture's greedy ids."""
    fixture, _, _ = loaded
    max_new = fixture.reference["max_new_tokens"]
    outs = pipe(
        audio=[str(fixture.wav(0)), str(fixture.wav(1))],
        text=fixture.reference["prompts"],
        max_new_tokens=max_new,
        batch_size=2,
        return_tensors=True,
    )
    assert len(outs) == 2 and all(isinstance(records, list) and len(records) == 1 for records in outs)
    for records, sample in zip(outs, SAMPLES):
        assert records[0]["generated_token_ids"].tolist() == _expected_new_ids(fixture, sample)


def test_pipeline_one_question_for_several_audios(loaded, pipe):
    fixture, _, _ = loaded
    question = fixture.reference["prompts"][0]
    outs = pipe(audio=[str(fixture.wav(0)), str(fixture.wav(0))], text=question, max_new_tokens=6, return_tensors=True)
    assert [records[0]["input_text"] for records in outs] == [question, question]
    assert outs[0][0]["generated_token_ids"].tolist() == outs[1][0]["generated_token_ids"].tolist()


def test_pipeline_from_repo_path_with_device_and_dtype(loaded):
    fixture, _, _ = loaded
    pipe = pipeline("audio-text-to-text", model=str(fixture.repo), device="cpu", dtype=torch.float32)
    assert isinstance(pipe, AudioTextToTextPipeline)
    assert pipe.model.dtype == torch.float32 and pipe.device.type == "cpu"
    max_new = fixture.reference["max_new_tokens"]
    out = pipe(
        audio=str(fixture.wav(1)), text=fixture.reference["prompts"][1], max_new_tokens=max_new, return_tensors=True
    )
    assert out[0]["generated_token_ids"].tolist() == _expected_new_ids(fixture, "s1")


def test_pipeline_passes_generation_kwargs(loaded, pipe):
    fixture, _, _ = loaded
    kwargs = {"audio": str(fixture.wav(1)), "text": "describe", "return_tensors": True}
    assert len(pipe(**kwargs, max_new_tokens=3)[0]["generated_token_ids"]) == 3
    sampled = pipe(**kwargs, max_new_tokens=5, do_sample=True, top_k=30, top_p=0.95, num_return_sequences=3)
    assert len(sampled) == 3 and all(len(record["generated_token_ids"]) == 5 for record in sampled)
    # generate() rejects what it does not know, with its own message.
    with pytest.raises(ValueError, match="not_a_generate_argument"):
        pipe(**kwargs, max_new_tokens=2, not_a_generate_argument=1)


@pytest.mark.parametrize(
    "call, message",
    [
        ({"text": "what is it?"}, "needs audio= and text="),
        ({"audio": ["a.wav", "b.wav", "c.wav"], "text": ["q1", "q2"]}, "3 audios and 2 questions"),
        ({"audio": "missing.wav", "text": "q"}, "no such audio file"),
    ],
)
def test_pipeline_bad_inputs_raise_clear_errors(pipe, call, message):
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        pipe(**call, max_new_tokens=2)


def test_pipeline_honours_max_length(loaded, pipe):
    """The converted generation config pins max_new_tokens=256; a user's max_length must still apply."""
    from transformers import GenerationConfig

    fixture, _, processor = loaded
    question, wav = fixture.reference["prompts"][1], str(fixture.wav(1))
    prompt_length = processor(text=question, audio=wav)["input_ids"].shape[1]
    assert pipe.model.generation_config.max_new_tokens == 256
    expected = _expected_new_ids(fixture, "s1")[:3]
    by_kwarg = pipe(audio=wav, text=question, max_length=prompt_length + 3, return_tensors=True)
    assert by_kwarg[0]["generated_token_ids"].tolist() == expected
    config = GenerationConfig(max_length=prompt_length + 3, do_sample=False)
    by_config = pipe(audio=wav, text=question, generation_config=config, return_tensors=True)
    assert by_config[0]["generated_token_ids"].tolist() == expected
    assert config.max_new_tokens is None  # the user's object is left as it was
    # Both given: transformers' rule, max_new_tokens wins.
    both = pipe(audio=wav, text=question, max_length=prompt_length + 3, max_new_tokens=5, return_tensors=True)
    assert len(both[0]["generated_token_ids"]) == 5


def _poisoned_copy(loaded, question):
    """A copy of the fixture model whose embedding of a token that only `question` holds is NaN."""
    import copy

    fixture, model, processor = loaded
    others = {
        t for q in fixture.reference["prompts"] if q != question for t in processor(text=q)["input_ids"][0].tolist()
    }
    token = next(t for t in processor(text=question)["input_ids"][0].tolist() if t not in others)
    poisoned = copy.deepcopy(model)
    embeddings = poisoned.get_input_embeddings().weight.detach().clone()
    embeddings[token] = float("nan")
    # Untied from the LM head (which would otherwise make that token's logit NaN in every row).
    poisoned.get_input_embeddings().weight = torch.nn.Parameter(embeddings)
    return poisoned


@pytest.mark.parametrize("do_sample", [False, True])
def test_pipeline_nan_logits_raise_naming_the_input(loaded, do_sample):
    from transformers_af2.generation_utils import NonFiniteLogitsError

    fixture, _, processor = loaded
    questions, wavs = fixture.reference["prompts"], [str(fixture.wav(0)), str(fixture.wav(1))]
    poisoned = pipeline("audio-text-to-text", model=_poisoned_copy(loaded, questions[1]), processor=processor)
    with pytest.raises(NonFiniteLogitsError) as raised:
        poisoned(audio=wavs, text=questions, batch_size=2, max_new_tokens=4, do_sample=do_sample)
    message = str(raised.value)
    assert f"batch row 1 (audio {wavs[1]!r}) has " in message and "NaN" in message
    assert "weights or this input's audio features" in message


def test_answer_each_keeps_the_answers_of_the_other_inputs(loaded, tmp_path):
    """An undecodable file, a missing one and NaN logits each fail alone; the others get their fixture answers."""
    from transformers_af2.generation_utils import NonFiniteLogitsError

    fixture, _, processor = loaded
    questions = fixture.reference["prompts"]
    not_audio = tmp_path / "notes.wav"
    not_audio.write_text("not audio")
    poisoned = pipeline("audio-text-to-text", model=_poisoned_copy(loaded, questions[1]), processor=processor)
    inputs = [
        {"audio": str(fixture.wav(0)), "text": questions[0]},
        {"audio": str(not_audio), "text": questions[0]},
        {"audio": str(fixture.wav(1)), "text": questions[1]},  # NaN logits: its question holds the NaN token
        {"audio": str(tmp_path / "missing.wav"), "text": questions[0]},
        _messages(questions[0], fixture.wav(0)),
    ]
    max_new = fixture.reference["max_new_tokens"]
    results = list(poisoned.answer_each(inputs, batch_size=3, max_new_tokens=max_new, return_tensors=True))
    assert [index for index, _, _ in results] == [0, 1, 2, 3, 4]
    for index in (0, 4):
        assert results[index][2] is None
        assert results[index][1][0]["generated_token_ids"].tolist() == _expected_new_ids(fixture, "s0")
    assert isinstance(results[1][2], ValueError) and "notes.wav: cannot decode" in str(results[1][2])
    assert isinstance(results[2][2], NonFiniteLogitsError) and "clip_7s.wav" in str(results[2][2])
    assert isinstance(results[3][2], FileNotFoundError) and "missing.wav" in str(results[3][2])
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        next(poisoned.answer_each(inputs, batch_size=0))


# ---------------------------------------------------------------------------------------------------------------------
# chat template
# ---------------------------------------------------------------------------------------------------------------------


def _messages(question, wav, audio_first=True):
    items = [{"type": "audio", "path": str(wav)}, {"type": "text", "text": question}]
    return [{"role": "user", "content": items if audio_first else items[::-1]}]


@pytest.mark.parametrize("index", [0, 1])
@pytest.mark.parametrize("audio_first", [True, False])
def test_chat_template_ids_equal_plain_question_ids(loaded, index, audio_first):
    fixture, _, processor = loaded
    question, wav = fixture.reference["prompts"][index], fixture.wav(index)
    messages = _messages(question, wav, audio_first)
    assert processor.apply_chat_template(messages) == "<audio>" + question.lower().strip() + "<SEP>"
    chat = processor.apply_chat_template(messages, tokenize=True, return_dict=True, return_tensors="pt")
    plain = processor(text=question, audio=str(wav))
    assert torch.equal(chat["input_ids"], fixture.ids(f"{SAMPLES[index]}.prompt_ids"))
    assert set(chat.keys()) == set(plain.keys())
    for key in plain:
        assert torch.equal(chat[key], plain[key]), key
    assert torch.equal(processor.apply_chat_template(messages, tokenize=True), plain["input_ids"])


def test_chat_template_batch_and_saved_with_the_processor(loaded, tmp_path):
    fixture, _, processor = loaded
    conversations = [_messages(q, fixture.wav(i)) for i, q in enumerate(fixture.reference["prompts"])]
    chat = processor.apply_chat_template(conversations, tokenize=True, return_dict=True)
    plain = processor(text=fixture.reference["prompts"], audio=[str(fixture.wav(0)), str(fixture.wav(1))])
    for key in plain:
        assert torch.equal(chat[key], plain[key]), key
    # The converted repository carries the template, and it survives a save/load round trip.
    assert AutoProcessor.from_pretrained(fixture.repo).chat_template == processor.chat_template
    processor.save_pretrained(tmp_path)
    assert AutoProcessor.from_pretrained(tmp_path).chat_template == processor.chat_template


def test_chat_template_assistant_turn_and_prefill(loaded):
    fixture, _, processor = loaded
    messages = _messages("What is it?", fixture.wav(1)) + [
        {"role": "assistant", "content": [{"type": "text", "text": "<REASONING>A Dog."}]}
    ]
    assert (
        processor.apply_chat_template(messages)
        == "<audio>what is it?<SEP><REASONING>A Dog.<|endofchunk|><|endoftext|>"
    )
    assert (
        processor.apply_chat_template(messages, continue_final_message=True)
        == "<audio>what is it?<SEP><REASONING>A Dog."
    )


def test_chat_template_errors(loaded):
    fixture, _, processor = loaded
    with pytest.raises(ValueError, match="holds 0 audio items"):
        processor.apply_chat_template([{"role": "user", "content": "hello"}], tokenize=True)
    two_audios = _messages("q", fixture.wav(0))
    two_audios[0]["content"].append({"type": "audio", "path": str(fixture.wav(1))})
    with pytest.raises(ValueError, match="holds 2 audio items"):
        processor.apply_chat_template(two_audios, tokenize=True)
    with pytest.raises(Exception, match="no system prompt"):
        processor.apply_chat_template([{"role": "system", "content": "be nice"}] + _messages("q", fixture.wav(0)))


def test_chat_template_reads_arrays_and_base64(loaded):
    import base64

    import soundfile as sf

    fixture, _, processor = loaded
    wav = fixture.wav(1)
    samples, rate = sf.read(wav, dtype="float64")
    plain = processor(text="q", audio=str(wav))
    array_item = {"type": "audio", "audio": samples, "sampling_rate": rate}
    b64_item = {"type": "audio", "base64": base64.b64encode(wav.read_bytes()).decode()}
    for item in (array_item, b64_item):
        messages = [{"role": "user", "content": [item, {"type": "text", "text": "q"}]}]
        chat = processor.apply_chat_template(messages, tokenize=True, return_dict=True)
        assert torch.equal(chat["input_ids"], plain["input_ids"])
        assert torch.allclose(chat["input_features"], plain["input_features"], atol=1e-4)


# ---------------------------------------------------------------------------------------------------------------------
# chat input to the pipelines, any-to-any
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("as_text_kwarg", [False, True])
def test_pipeline_chat_input_equals_plain_question(loaded, pipe, as_text_kwarg):
    fixture, _, _ = loaded
    messages = _messages(fixture.reference["prompts"][0], fixture.wav(0))
    max_new = fixture.reference["max_new_tokens"]
    call = {"text": messages} if as_text_kwarg else {"audio": messages}
    out = pipe(**call, max_new_tokens=max_new, return_tensors=True)
    assert out[0]["generated_token_ids"].tolist() == _expected_new_ids(fixture, "s0")
    assert out[0]["input_text"] == messages
    batch = pipe([messages, messages], max_new_tokens=max_new, batch_size=2)
    assert [records[0]["generated_text"] for records in batch] == [out[0]["generated_text"]] * 2


def test_pipeline_continues_a_final_assistant_message(loaded, pipe):
    fixture, model, processor = loaded
    messages = _messages(fixture.reference["prompts"][1], fixture.wav(1)) + [
        {"role": "assistant", "content": [{"type": "text", "text": "<REASONING>"}]}
    ]
    inputs = processor.apply_chat_template(messages, tokenize=True, return_dict=True, continue_final_message=True)
    assert processor.decode(inputs["input_ids"][0]).endswith("<SEP><REASONING>")
    with torch.no_grad():
        direct = model.generate(**inputs, max_new_tokens=8, do_sample=False)[0, inputs["input_ids"].shape[1] :]
    out = pipe(messages, max_new_tokens=8, return_tensors=True)
    assert out[0]["generated_token_ids"].tolist() == direct.tolist()
    assert out[0]["generated_text"] == processor.decode(direct, skip_special_tokens=True).strip()


def test_any_to_any_pipeline_supports_af2_without_warnings(loaded):
    fixture, model, processor = loaded
    with transformers_log_records() as records:
        any_to_any = pipeline("any-to-any", model=model, processor=processor, device="cpu")
    assert not [r for r in records if "not supported" in r.getMessage()]
    messages = _messages(fixture.reference["prompts"][1], fixture.wav(1))
    max_new = fixture.reference["max_new_tokens"]
    out = any_to_any(text=messages, max_new_tokens=max_new, return_full_text=False)
    expected = processor.decode_answers([_expected_new_ids(fixture, "s1")])[0]
    assert out[0]["generated_text"] == expected
    full = any_to_any(text=messages, max_new_tokens=max_new)
    assert full[0]["generated_text"][-1] == {"role": "assistant", "content": expected}
    tensors = any_to_any(text=messages, max_new_tokens=max_new, return_tensors=True)
    prompt_length = fixture.ids("s1.prompt_ids").shape[1]
    assert tensors[0]["generated_token_ids"][prompt_length:].tolist() == _expected_new_ids(fixture, "s1")
    # A file path as `audio=` is read by AF2's own front end (no sampling_rate needed).
    by_path = any_to_any(
        {"text": fixture.reference["prompts"][1], "audio": str(fixture.wav(1))},
        max_new_tokens=max_new,
        return_full_text=False,
    )
    assert by_path[0]["generated_text"] == expected


def test_af2_is_a_multimodal_lm_for_pipelines_and_auto_class(loaded):
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_MULTIMODAL_LM_MAPPING,
        MODEL_FOR_MULTIMODAL_LM_MAPPING_NAMES,
    )

    fixture, _, _ = loaded
    # What AnyToAnyPipeline.check_model_type reads: the names, plus the registered models when the names dict
    # points back to the lazy mapping (transformers 5.23); AF2 must be among them either way.
    names = set(MODEL_FOR_MULTIMODAL_LM_MAPPING_NAMES.values())
    lazy = getattr(MODEL_FOR_MULTIMODAL_LM_MAPPING_NAMES, "_model_mapping", None)
    if lazy is not None:
        names |= {model.__name__ for model in lazy._extra_content.values()}
    assert "AudioFlamingo2ForConditionalGeneration" in names
    assert transformers_af2.AudioFlamingo2ForConditionalGeneration in list(MODEL_FOR_MULTIMODAL_LM_MAPPING.values())
    len(MODEL_FOR_MULTIMODAL_LM_MAPPING.items())  # the lazy mapping still iterates
    model = AutoModelForMultimodalLM.from_pretrained(fixture.repo)
    assert type(model) is transformers_af2.AudioFlamingo2ForConditionalGeneration
    transformers_af2.register_pipelines()  # idempotent: no duplicate registration warning, same class
    from transformers.pipelines import PIPELINE_REGISTRY

    assert PIPELINE_REGISTRY.supported_tasks["audio-text-to-text"]["impl"] is AudioTextToTextPipeline


def test_post_process_multimodal_output_gives_the_answer(loaded):
    _, _, processor = loaded
    tok = processor.tokenizer
    ids = tok("<audio>what is it?<SEP> a dog<|endofchunk|><|endoftext|><|PAD_TOKEN|>")["input_ids"]
    assert processor.post_process_multimodal_output(torch.tensor([ids])) == ["a dog"]
    assert processor.post_process_multimodal_output(torch.tensor(ids)) == "a dog"
    prompt_only = tok("<audio>what is it?<SEP>")["input_ids"]
    assert processor.post_process_multimodal_output(torch.tensor([prompt_only])) == [""]
    with pytest.raises(ValueError, match="generates text only"):
        processor.post_process_multimodal_output(torch.tensor([ids]), generation_mode="audio")


# ---------------------------------------------------------------------------------------------------------------------
# streaming
# ---------------------------------------------------------------------------------------------------------------------


def test_text_iterator_streamer_collects_the_decoded_answer(loaded):
    fixture, model, processor = loaded
    inputs = processor(text=fixture.reference["prompts"][0], audio=str(fixture.wav(0)))
    max_new = fixture.reference["max_new_tokens"]
    streamer = TextIteratorStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=60)
    result = {}

    def run():
        with torch.no_grad():
            result["ids"] = model.generate(**inputs, max_new_tokens=max_new, do_sample=False, streamer=streamer)

    thread = threading.Thread(target=run)
    thread.start()
    streamed = "".join(streamer)
    thread.join()
    new = result["ids"][:, inputs["input_ids"].shape[1] :]
    assert new[0].tolist() == _expected_new_ids(fixture, "s0")
    assert streamed == processor.batch_decode(new, skip_special_tokens=True)[0]


def test_text_streamer_prints_the_answer(loaded, pipe, capsys):
    fixture, _, processor = loaded
    max_new = fixture.reference["max_new_tokens"]
    out = pipe(
        audio=str(fixture.wav(1)),
        text=fixture.reference["prompts"][1],
        max_new_tokens=max_new,
        streamer=TextStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True),
    )
    assert capsys.readouterr().out.strip() == out[0]["generated_text"]


# ---------------------------------------------------------------------------------------------------------------------
# SoundCoT repair
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "answer, prefix",
    [
        ("a dog barks.", None),
        ("<SUMMARY>x</SUMMARY><REASONING>r.</REASONING><CONCLUSION>a dog</CONCLUSION>", None),
        (
            " <Summary>S</Summary><Reasoning>First. Then</REASONING> more",
            " <summary>s</summary><reasoning>first. then",
        ),
        ("<REASONING>the dog barks. it rains", "<reasoning>the dog barks"),
        ("<REASONING>no full stop", "<reasoning>no full sto"),  # the original's rfind(".") == -1 drops a character
        ("<REASONING>" + "a. " * 300, "<reasoning>" + ("a. " * 167)[:-2]),  # first 512 chars, stripped, last "."
    ],
)
def test_soundcot_repair_prefix_follows_the_original(answer, prefix):
    expected = None if prefix is None else prefix + SOUNDCOT_REPAIR_SUFFIX
    assert soundcot_repair_prefix(answer) == expected


class ForceContinuations(LogitsProcessor):
    """Forces the text after `<SEP>` to follow the first target it is a prefix of, then eos."""

    def __init__(self, sep_id, targets):
        self.sep_id, self.targets = sep_id, targets

    def __call__(self, input_ids, scores):
        for row, ids in enumerate(input_ids.tolist()):
            done = ids[len(ids) - ids[::-1].index(self.sep_id) :]
            for target in self.targets:
                if target[: len(done)] == done and len(done) < len(target):
                    scores[row] = -float("inf")
                    scores[row, target[len(done)]] = 0.0
                    break
        return scores


def test_pipeline_soundcot_repair_generates_the_conclusion_again(loaded, pipe):
    fixture, _, processor = loaded
    tok = processor.tokenizer
    question, wav = fixture.reference["prompts"][1], str(fixture.wav(1))
    unfinished = "<REASONING>Dog. Rain"
    prefix = "<reasoning>dog" + SOUNDCOT_REPAIR_SUFFIX
    # The second pass must see exactly the original's repaired prompt: prompt + lower-cased cut reasoning + tags.
    repaired_prompt = tok(processor.build_prompt(question) + prefix)["input_ids"]
    sep = tok.convert_tokens_to_ids("<SEP>")
    conclusion = tok(" Rain.")["input_ids"] + [tok.eos_token_id]
    targets = [
        tok(unfinished)["input_ids"] + [tok.eos_token_id],
        repaired_prompt[repaired_prompt.index(sep) + 1 :] + conclusion,
    ]
    force = LogitsProcessorList([ForceContinuations(sep, targets)])
    kwargs = {"audio": wav, "text": question, "max_new_tokens": 40, "logits_processor": force, "return_tensors": True}

    plain = pipe(**kwargs)
    assert plain[0]["generated_text"] == unfinished
    repaired = pipe(**kwargs, soundcot_repair=True)
    assert repaired[0]["soundcot_repaired"] is True
    assert repaired[0]["generated_text"] == prefix + " Rain."
    assert repaired[0]["generated_token_ids"].tolist() == conclusion
    batch = pipe(**{**kwargs, "audio": [wav, wav]}, soundcot_repair=True, batch_size=2)
    assert [records[0]["generated_text"] for records in batch] == [repaired[0]["generated_text"]] * 2
    # An answer that concludes is left alone.
    concluded = pipe(audio=wav, text=question, max_new_tokens=6, soundcot_repair=True)
    assert concluded[0]["soundcot_repaired"] is False


# ---------------------------------------------------------------------------------------------------------------------
# examples/
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("script", ["quickstart.py", "stream.py", "soundcot.py"])
def test_examples_run_on_the_fixture(converted_fixture, script, monkeypatch, capsys):
    import runpy
    from pathlib import Path

    examples = Path(__file__).resolve().parents[1] / "examples"
    monkeypatch.setattr("sys.argv", [script, "--model", str(converted_fixture.repo), "--max-new-tokens", "6"])
    runpy.run_path(str(examples / script), run_name="__main__")
    out = capsys.readouterr().out
    if script == "quickstart.py":  # three ways, one answer
        answers = {line.split(":", 1)[1].strip() for line in out.splitlines()}
        assert len(answers) == 1 and answers != {""}
    assert out.strip()


def test_batch_errors_name_the_input_by_its_position(loaded, pipe, tmp_path):
    """Each input of a list is encoded alone; its error still names its position in the caller's list."""
    fixture = loaded[0]
    missing = tmp_path / "missing.wav"
    with pytest.raises(FileNotFoundError, match=r"audio\[2\]: .*missing\.wav"):
        pipe(audio=[str(fixture.wav(0)), str(fixture.wav(1)), str(missing)], text="What is it?", max_new_tokens=2)
    with pytest.raises(ValueError, match=r"text\[1\]"):
        pipe(audio=[str(fixture.wav(0))] * 2, text=["What is it?", "Why <|endoftext|>?"], max_new_tokens=2)
