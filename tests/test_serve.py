"""
`af2 serve`: a real server process on 127.0.0.1 (transformers' serving app with AF2), called with the official
`openai` client; answers are compared with the pipeline's for the same audio and question.
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
# Sampling with a fixed seed: the tiny random model repeats one token under greedy decoding whatever it hears, so
# only sampled answers show that the audio and the question reach the model.
SAMPLING = {"do_sample": True, "top_k": 30, "top_p": 0.95}
SEED = 0
SERVER_START_TIMEOUT = 180


@contextlib.contextmanager
def running_server(repo, log_path, *extra_args):
    """`af2 serve` for `repo` in its own process on a free port of 127.0.0.1; yields (base URL, process)."""
    port = free_port()
    args = ["serve", "--model", str(repo), "--port", str(port), "--device", "cpu", "--log-level", "warning"]
    with running_af2_command(
        [*args, *extra_args], log_path, f"http://127.0.0.1:{port}/health", SERVER_START_TIMEOUT
    ) as process:
        yield f"http://127.0.0.1:{port}/v1", process


@pytest.fixture(scope="module")
def server(converted_fixture, tmp_path_factory):
    log_path = tmp_path_factory.mktemp("serve") / "server.log"
    with running_server(converted_fixture.repo, log_path) as (url, process):
        yield converted_fixture, url, process


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[1], api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def pipeline_answers(loaded):
    """The pipeline's answers for each fixture clip, greedy and sampled with SEED, as the reference."""
    from transformers import pipeline

    fixture, model, processor = loaded
    pipe = pipeline("audio-text-to-text", model=model, processor=processor)
    answers = {}
    for index in range(2):
        wav = str(fixture.wav(index))
        answers[index, "greedy"] = pipe(audio=wav, text=QUESTION, max_new_tokens=MAX_TOKENS, do_sample=False)[0][
            "generated_text"
        ]
        torch.manual_seed(SEED)
        answers[index, "sampled"] = pipe(audio=wav, text=QUESTION, max_new_tokens=MAX_TOKENS, **SAMPLING)[0][
            "generated_text"
        ]
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


def sampled_body() -> dict:
    """transformers' server extensions: a generation config (JSON) and a seed."""
    return {"generation_config": json.dumps({**SAMPLING, "max_new_tokens": MAX_TOKENS}), "seed": SEED}


def assert_streamed_answer(streamed: str, answer: str) -> None:
    """
    The streamed text equals the answer, except that a stream stopped by the token limit in the middle of a UTF-8
    character ends before it: transformers' streamer (tokenizers' DecodeStream) holds an incomplete byte sequence
    back and does not flush it at the end, where a whole decode shows it as U+FFFD.
    """
    if streamed != answer:
        assert answer.endswith("\ufffd") and streamed == answer[:-1], (streamed, answer)


def test_answer_equals_pipeline_non_streaming_and_streaming(server, client, pipeline_answers):
    fixture, _, _ = server
    model = str(fixture.repo)
    for index in range(2):
        messages = audio_message(fixture.wav(index).read_bytes())
        greedy = client.chat.completions.create(model=model, messages=messages, max_tokens=MAX_TOKENS, temperature=0)
        assert greedy.choices[0].message.content == pipeline_answers[index, "greedy"]
        assert greedy.usage.completion_tokens == MAX_TOKENS
        sampled = client.chat.completions.create(model=model, messages=messages, extra_body=sampled_body())
        assert sampled.choices[0].message.content == pipeline_answers[index, "sampled"]

        chunks = client.chat.completions.create(model=model, messages=messages, stream=True, extra_body=sampled_body())
        deltas = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
        assert_streamed_answer("".join(deltas), pipeline_answers[index, "sampled"])
        assert len(deltas) > 1  # streamed piece by piece, not in one block


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


def test_concurrent_requests_all_answer(server, client, pipeline_answers):
    fixture, _, _ = server
    model = str(fixture.repo)

    def ask(index: int, stream: bool) -> str:
        messages = audio_message(fixture.wav(index).read_bytes())
        kwargs = dict(model=model, messages=messages, max_tokens=MAX_TOKENS, temperature=0)
        if not stream:
            return client.chat.completions.create(**kwargs).choices[0].message.content
        chunks = client.chat.completions.create(stream=True, **kwargs)
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

    jobs = [(index % 2, index % 3 == 0) for index in range(6)]
    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        answers = list(pool.map(lambda job: ask(*job), jobs))
    assert answers == [pipeline_answers[index, "greedy"] for index, _ in jobs]


def test_the_model_name_given_to_serve_is_accepted_and_others_are_refused(server, client):
    fixture, _, _ = server
    messages = audio_message(fixture.wav(0).read_bytes())
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="some-other-model", messages=messages, max_tokens=2)
    assert "pinned" in caught.value.message


def test_bnb_8bit_quantization(converted_fixture, tmp_path):
    pytest.importorskip("bitsandbytes", reason="bitsandbytes (the [train] extra) is not installed")
    from transformers import AutoModelForMultimodalLM, AutoProcessor, BitsAndBytesConfig, pipeline

    # The same quantized model in process: every linear layer of AF2 becomes an 8-bit bitsandbytes layer.
    model = AutoModelForMultimodalLM.from_pretrained(
        converted_fixture.repo, quantization_config=BitsAndBytesConfig(load_in_8bit=True), device_map="cpu"
    )
    # transformers keeps the output layer (lm_head) unquantized, as for every model.
    unquantized = [
        n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and type(m).__name__ != "Linear8bitLt"
    ]
    assert unquantized == ["lm_head"]
    pipe = pipeline("audio-text-to-text", model=model, processor=AutoProcessor.from_pretrained(converted_fixture.repo))
    torch.manual_seed(SEED)
    expected = pipe(audio=str(converted_fixture.wav(0)), text=QUESTION, max_new_tokens=MAX_TOKENS, **SAMPLING)[0][
        "generated_text"
    ]

    with running_server(converted_fixture.repo, tmp_path / "server.log", "--quantization", "bnb-8bit") as (url, _):
        client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=120)
        messages = audio_message(converted_fixture.wav(0).read_bytes())
        answer = client.chat.completions.create(
            model=str(converted_fixture.repo), messages=messages, extra_body=sampled_body()
        )
        assert answer.choices[0].message.content == expected
        chunks = client.chat.completions.create(
            model=str(converted_fixture.repo), messages=messages, stream=True, extra_body=sampled_body()
        )
        assert_streamed_answer("".join(c.choices[0].delta.content or "" for c in chunks if c.choices), expected)


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
