"""
`af2 serve` for a well-behaved client: a real server process on 127.0.0.1, called with the official `openai`
client; answers are compared with the pipeline's for the same audio, question and generation settings. OpenAI's
fields mean what they mean (temperature, top_p, n, seed, stop, max_tokens) or are refused with a 400 naming them.
"""

import base64
import contextlib
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from conftest import free_port, running_af2_command

openai = pytest.importorskip("openai", reason="the [serve] extra (openai, fastapi, uvicorn) is not installed")
pytest.importorskip("fastapi", reason="the [serve] extra (fastapi, uvicorn) is not installed")
pytest.importorskip("uvicorn", reason="the [serve] extra (fastapi, uvicorn) is not installed")

QUESTION = "What is the sound in this audio?"
MAX_TOKENS = 12
# OpenAI's sampling: temperature and nucleus top_p over the whole distribution (no top-k). The tiny random model
# repeats one token under greedy decoding whatever it hears, so only sampled answers show that the audio and the
# question reach the model.
TEMPERATURE, TOP_P = 1.0, 0.95
SAMPLING = {"do_sample": True, "temperature": TEMPERATURE, "top_p": TOP_P, "top_k": 0}
SEED = 0
SERVER_START_TIMEOUT = 180


@contextlib.contextmanager
def running_server(repo, log_path, *extra_args, env=None):
    """`af2 serve` for `repo` in its own process on a free port of 127.0.0.1; yields (base URL, process)."""
    port = free_port()
    args = ["serve", "--model", str(repo), "--port", str(port), "--device", "cpu", "--log-level", "warning"]
    with running_af2_command(
        [*args, *extra_args], log_path, f"http://127.0.0.1:{port}/health", SERVER_START_TIMEOUT, env=env
    ) as process:
        yield f"http://127.0.0.1:{port}/v1", process


@pytest.fixture(scope="module")
def server(converted_fixture, tmp_path_factory):
    log_path = tmp_path_factory.mktemp("serve") / "server.log"
    with running_server(converted_fixture.repo, log_path, "--max-tokens-limit", "4096") as (url, process):
        yield converted_fixture, url, process


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[1], api_key="unused", max_retries=0, timeout=120)


def pipeline_answer(pipe, wav, max_new_tokens=MAX_TOKENS, seed=None, **generate):
    if seed is not None:
        torch.manual_seed(seed)
    return pipe(audio=str(wav), text=QUESTION, max_new_tokens=max_new_tokens, **generate)[0]["generated_text"]


@pytest.fixture(scope="module")
def pipe(loaded):
    from transformers import pipeline

    _, model, processor = loaded
    return pipeline("audio-text-to-text", model=model, processor=processor)


@pytest.fixture(scope="module")
def pipeline_answers(loaded, pipe):
    """The pipeline's answers for each fixture clip, greedy and sampled with SEED, as the reference."""
    fixture = loaded[0]
    answers = {}
    for index in range(2):
        answers[index, "greedy"] = pipeline_answer(pipe, fixture.wav(index), do_sample=False)
        answers[index, "sampled"] = pipeline_answer(pipe, fixture.wav(index), seed=SEED, **SAMPLING)
    # The reference must tell the clips apart, or equal answers would prove nothing about the audio.
    assert answers[0, "sampled"] != answers[1, "sampled"]
    return answers


def audio_message(audio_bytes: bytes, question: str = QUESTION, fmt: str = "wav") -> list[dict]:
    data = base64.b64encode(audio_bytes).decode()
    return [
        {
            "role": "user",
            "content": [
                {"type": "input_audio", "input_audio": {"data": data, "format": fmt}},
                {"type": "text", "text": question},
            ],
        }
    ]


def streamed(chunks) -> tuple[str, list[str], str | None]:
    """(text, its deltas, finish reason) of choice 0 of a stream."""
    deltas, reason = [], None
    for chunk in chunks:
        for choice in chunk.choices:
            if choice.delta.content:
                deltas.append(choice.delta.content)
            reason = choice.finish_reason or reason
    return "".join(deltas), deltas, reason


def test_answer_equals_pipeline_non_streaming_and_streaming(server, client, pipeline_answers):
    fixture, _, _ = server
    model = str(fixture.repo)
    sampling = dict(temperature=TEMPERATURE, top_p=TOP_P, seed=SEED, max_tokens=MAX_TOKENS)
    for index in range(2):
        messages = audio_message(fixture.wav(index).read_bytes())
        greedy = client.chat.completions.create(model=model, messages=messages, max_tokens=MAX_TOKENS, temperature=0)
        assert greedy.choices[0].message.content == pipeline_answers[index, "greedy"]
        assert greedy.usage.completion_tokens == MAX_TOKENS
        assert greedy.choices[0].finish_reason == "length"
        sampled = client.chat.completions.create(model=model, messages=messages, **sampling)
        assert sampled.choices[0].message.content == pipeline_answers[index, "sampled"]

        chunks = client.chat.completions.create(model=model, messages=messages, stream=True, **sampling)
        text, deltas, reason = streamed(chunks)
        assert text == pipeline_answers[index, "sampled"]
        assert len(deltas) > 1  # streamed piece by piece, not in one block
        assert reason == "length"


def test_temperature_samples_and_the_default_is_openais(server, client, pipe, pipeline_answers):
    """temperature > 0 samples (OpenAI's default is 1.0 with top_p 1.0); the same seed gives the same answer."""
    fixture, _, _ = server
    model = str(fixture.repo)
    messages = audio_message(fixture.wav(0).read_bytes())
    default = client.chat.completions.create(model=model, messages=messages, max_tokens=MAX_TOKENS, seed=SEED)
    expected = pipeline_answer(pipe, fixture.wav(0), seed=SEED, do_sample=True, temperature=1.0, top_p=1.0, top_k=0)
    assert default.choices[0].message.content == expected
    assert expected != pipeline_answers[0, "greedy"]  # sampling, not greedy


def test_n_choices(server, client, pipe, pipeline_answers):
    fixture, _, _ = server
    model = str(fixture.repo)
    messages = audio_message(fixture.wav(1).read_bytes())
    sampled = client.chat.completions.create(
        model=model, messages=messages, n=3, temperature=TEMPERATURE, top_p=TOP_P, seed=SEED, max_tokens=MAX_TOKENS
    )
    torch.manual_seed(SEED)
    expected = pipe(audio=str(fixture.wav(1)), text=QUESTION, max_new_tokens=MAX_TOKENS, num_return_sequences=3,
                    **SAMPLING)  # fmt: skip
    assert [c.message.content for c in sampled.choices] == [e["generated_text"] for e in expected]
    assert [c.index for c in sampled.choices] == [0, 1, 2]
    assert len({c.message.content for c in sampled.choices}) > 1
    greedy = client.chat.completions.create(model=model, messages=messages, n=2, temperature=0, max_tokens=MAX_TOKENS)
    assert [c.message.content for c in greedy.choices] == [pipeline_answers[1, "greedy"]] * 2
    assert greedy.usage.completion_tokens == 2 * MAX_TOKENS


def test_stop_strings_streamed_and_not(server, client, pipeline_answers):
    fixture, _, _ = server
    model = str(fixture.repo)
    answer = pipeline_answers[1, "sampled"]
    # A stop string from the middle of the known answer: the answer ends before its first occurrence.
    stop = answer[len(answer) // 2 : len(answer) // 2 + 3]
    expected = answer[: answer.index(stop)]
    assert 0 < len(expected) < len(answer)
    messages = audio_message(fixture.wav(1).read_bytes())
    sampling = dict(temperature=TEMPERATURE, top_p=TOP_P, seed=SEED, max_tokens=MAX_TOKENS)
    whole = client.chat.completions.create(model=model, messages=messages, stop=[stop, "never-there"], **sampling)
    assert whole.choices[0].message.content == expected
    assert whole.choices[0].finish_reason == "stop"
    chunks = client.chat.completions.create(model=model, messages=messages, stop=stop, stream=True, **sampling)
    text, _, reason = streamed(chunks)
    assert (text, reason) == (expected, "stop")


def test_max_completion_tokens_and_usage_in_the_stream(server, client, pipeline_answers):
    fixture, _, _ = server
    model = str(fixture.repo)
    messages = audio_message(fixture.wav(0).read_bytes())
    short = client.chat.completions.create(model=model, messages=messages, max_completion_tokens=4, temperature=0)
    assert short.usage.completion_tokens == 4
    assert pipeline_answers[0, "greedy"].startswith(short.choices[0].message.content)
    chunks = list(
        client.chat.completions.create(
            model=model, messages=messages, max_tokens=4, temperature=0, stream=True,
            stream_options={"include_usage": True},
        )
    )  # fmt: skip
    assert chunks[-1].usage.completion_tokens == 4 and chunks[-1].choices == []


def test_seed_gives_the_same_answer_whatever_runs_concurrently(server, client, pipeline_answers):
    fixture, _, _ = server
    model = str(fixture.repo)

    def ask(job):
        index, kind = job
        messages = audio_message(fixture.wav(index).read_bytes())
        if kind == "greedy":
            extra = dict(temperature=0)
        elif kind == "unseeded":
            extra = dict(temperature=TEMPERATURE, top_p=TOP_P)
        else:
            extra = dict(temperature=TEMPERATURE, top_p=TOP_P, seed=SEED)
        return client.chat.completions.create(model=model, messages=messages, max_tokens=MAX_TOKENS, **extra)

    jobs = [(i % 2, kind) for i, kind in enumerate(["seeded", "greedy", "unseeded", "seeded"] * 3)]
    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        answers = list(pool.map(ask, jobs))
    for (index, kind), answer in zip(jobs, answers):
        if kind in ("seeded", "greedy"):
            assert (
                answer.choices[0].message.content == pipeline_answers[index, "sampled" if kind == "seeded" else kind]
            )
        assert answer.usage.completion_tokens == MAX_TOKENS


def test_bad_audio_is_a_400_with_the_reason_and_the_server_keeps_serving(server, client, pipeline_answers):
    fixture, _, process = server
    model = str(fixture.repo)
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=model, messages=audio_message(b"RIFF\x10\x00\x00\x00WAVEjunk" * 8))
    assert caught.value.status_code == 400
    assert "cannot decode this audio" in caught.value.message

    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": [{"type": "text", "text": QUESTION}]}]
        )
    assert "0 audio items" in caught.value.message

    with pytest.raises(openai.BadRequestError) as caught:  # streaming requests are checked before the stream opens
        client.chat.completions.create(model=model, messages=audio_message(b"\x00" * 64), stream=True)
    assert "cannot decode this audio" in caught.value.message

    assert process.poll() is None
    after = client.chat.completions.create(
        model=model, messages=audio_message(fixture.wav(0).read_bytes()), max_tokens=MAX_TOKENS, temperature=0
    )
    assert after.choices[0].message.content == pipeline_answers[0, "greedy"]


def test_a_question_over_the_prompt_limit_is_refused_not_cut(server, client):
    fixture, _, _ = server
    messages = audio_message(fixture.wav(0).read_bytes(), question="what " * 600)
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=str(fixture.repo), messages=messages, max_tokens=2)
    assert "AF2 takes at most 512" in caught.value.message


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"logprobs": True}, "logprobs"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ({"presence_penalty": 0.5}, "presence_penalty"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"temperature": 2.5}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"n": 0}, "n"),
        ({"max_tokens": 5000}, "max_tokens"),
        ({"max_tokens": 4, "max_completion_tokens": 5}, "max_tokens"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"stop": [""]}, "stop"),
        ({"seed": -1}, "seed"),
        ({"extra_body": {"generation_config": "{}"}}, "generation_config"),
        ({"extra_body": {"top_k": 5}}, "top_k"),
    ],
)
def test_unsupported_or_invalid_fields_are_400s_naming_the_field(server, client, fields, named):
    fixture, _, _ = server
    messages = audio_message(fixture.wav(0).read_bytes())
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=str(fixture.repo), messages=messages, **fields)
    assert caught.value.status_code == 400
    assert named in caught.value.message
    assert caught.value.body["param"] == named


def test_routes_it_does_not_offer_are_404s_naming_those_it_does(server, client):
    fixture, _, _ = server
    wav = fixture.wav(0)
    for call in (
        lambda: client.responses.create(model=str(fixture.repo), input="hi"),
        lambda: client.completions.create(model=str(fixture.repo), prompt="hi"),
        lambda: client.audio.transcriptions.create(model=str(fixture.repo), file=wav.open("rb")),
    ):
        with pytest.raises(openai.NotFoundError) as caught:
            call()
        assert "POST /v1/chat/completions" in caught.value.message
    assert [m.id for m in client.models.list()] == [str(fixture.repo)]


def test_concurrent_requests_all_answer(server, client, pipeline_answers):
    fixture, _, _ = server
    model = str(fixture.repo)

    def ask(index: int, stream: bool) -> str:
        messages = audio_message(fixture.wav(index).read_bytes())
        kwargs = dict(model=model, messages=messages, max_tokens=MAX_TOKENS, temperature=0)
        if not stream:
            return client.chat.completions.create(**kwargs).choices[0].message.content
        return streamed(client.chat.completions.create(stream=True, **kwargs))[0]

    jobs = [(index % 2, index % 3 == 0) for index in range(6)]
    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        answers = list(pool.map(lambda job: ask(*job), jobs))
    assert answers == [pipeline_answers[index, "greedy"] for index, _ in jobs]


def test_the_model_name_given_to_serve_is_accepted_and_others_are_refused(server, client):
    fixture, _, _ = server
    messages = audio_message(fixture.wav(0).read_bytes())
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="some-other-model", messages=messages, max_tokens=2)
    assert "is not served here" in caught.value.message


def test_bnb_8bit_quantization(converted_fixture, tmp_path):
    pytest.importorskip("bitsandbytes", reason="bitsandbytes (the [train] extra) is not installed")
    from transformers import AutoModelForMultimodalLM, AutoProcessor, pipeline

    from transformers_af2.quantization import quantization_config

    # The same quantized model in process, as every command loads it (`--quantization bnb-8bit`): the language
    # model's linears (and the cross-attention's q/o and feed-forward) become 8-bit layers; the audio side and the
    # head tied to the embedding stay as they are.
    model = AutoModelForMultimodalLM.from_pretrained(
        converted_fixture.repo, quantization_config=quantization_config("bnb-8bit"), device_map="cpu"
    )
    linears = {n: type(m).__name__ for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    unquantized = {n for n, kind in linears.items() if kind != "Linear8bitLt"}
    assert unquantized and len(unquantized) < len(linears)
    assert all(
        n == "lm_head" or n.startswith(("model.audio_tower.", "model.audio_transformer.")) or n.endswith(".kv_proj")
        for n in unquantized
    )
    assert any(".layers." in n and n.endswith("q_proj") and kind == "Linear8bitLt" for n, kind in linears.items())
    pipe = pipeline("audio-text-to-text", model=model, processor=AutoProcessor.from_pretrained(converted_fixture.repo))
    expected = pipeline_answer(pipe, converted_fixture.wav(0), seed=SEED, **SAMPLING)

    with running_server(converted_fixture.repo, tmp_path / "server.log", "--quantization", "bnb-8bit") as (url, _):
        client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=120)
        messages = audio_message(converted_fixture.wav(0).read_bytes())
        sampling = dict(temperature=TEMPERATURE, top_p=TOP_P, seed=SEED, max_tokens=MAX_TOKENS)
        answer = client.chat.completions.create(model=str(converted_fixture.repo), messages=messages, **sampling)
        assert answer.choices[0].message.content == expected
        chunks = client.chat.completions.create(
            model=str(converted_fixture.repo), messages=messages, stream=True, **sampling
        )
        assert streamed(chunks)[0] == expected


def test_original_layout_checkpoints_are_served_from_their_converted_copy(converted_fixture, monkeypatch, tmp_path):
    from transformers_af2.serving import resolve_model_path

    monkeypatch.setenv("AF2_CACHE", str(tmp_path / "cache"))
    original = converted_fixture.fixture_dir / "original"
    served = Path(resolve_model_path(str(original), str(converted_fixture.yaml_path)))
    assert tmp_path / "cache" in served.parents
    assert json.loads((served / "config.json").read_text())["model_type"] == "audioflamingo2"
    assert resolve_model_path(str(original), str(converted_fixture.yaml_path)) == str(served)  # cached
    assert resolve_model_path(str(converted_fixture.repo)) == str(converted_fixture.repo)
    with pytest.raises(ValueError, match="--config is for checkpoints in the original layout"):
        resolve_model_path(str(converted_fixture.repo), str(converted_fixture.yaml_path))
