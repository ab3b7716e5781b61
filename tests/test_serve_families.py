"""
`af2 serve` with Audio Flamingo 3 and Music Flamingo checkpoints (tiny random ones, tests/families_fixtures.py): a
real server on 127.0.0.1 called with the official `openai` client. Concurrent greedy requests are batched by the
server and each answer equals transformers' own one-at-a-time answer (its chat template, processor and `generate`,
no code of this package); the family's limits and refusals reach the client as 400s.
"""

from concurrent.futures import ThreadPoolExecutor

import pytest
from families_fixtures import save_tiny_checkpoint, tiny_model, tiny_processor
from test_families import NEW_TOKENS, _noise, _reference_answer
from test_serve import audio_message, running_server

openai = pytest.importorskip("openai", reason="the [serve] extra (openai, fastapi, uvicorn) is not installed")
pytest.importorskip("fastapi", reason="the [serve] extra (fastapi, uvicorn) is not installed")

QUESTIONS = ["Describe the audio.", "What is the sound?"]
CLIP_SECONDS = [7.0, 3.0, 33.0]  # one window, one window, two windows (all under the tiny processors' limit)


@pytest.fixture(scope="module", params=["audioflamingo3", "musicflamingo"])
def family_server(request, tmp_path_factory):
    model_type = request.param
    folder = save_tiny_checkpoint(tmp_path_factory.mktemp(model_type), model_type)
    clips_folder = tmp_path_factory.mktemp("clips")
    clips = [_noise(clips_folder / f"clip{i}.wav", seconds, seed=10 + i) for i, seconds in enumerate(CLIP_SECONDS)]
    log_path = tmp_path_factory.mktemp("serve") / "server.log"
    with running_server(folder, log_path, "--max-batch-size", "8") as (url, _):
        client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=300)
        yield model_type, folder, clips, client, log_path


def test_concurrent_requests_equal_one_at_a_time_answers(family_server):
    model_type, folder, clips, client, _ = family_server
    model, processor = tiny_model(model_type), tiny_processor(model_type)
    pairs = [(question, clip) for clip in clips for question in QUESTIONS]
    expected = [_reference_answer(model, processor, question, clip)[0] for question, clip in pairs]
    assert len(set(expected)) > 1  # answers that tell requests apart, or a leak between rows could not show

    def ask(pair):
        question, clip = pair
        response = client.chat.completions.create(
            model=str(folder),
            messages=audio_message(clip.read_bytes(), question),
            max_tokens=NEW_TOKENS,
            temperature=0,
        )
        return response.choices[0].message.content, response.usage.prompt_tokens

    with ThreadPoolExecutor(len(pairs)) as pool:
        answers = list(pool.map(ask, pairs))
    assert [answer for answer, _ in answers] == expected
    # The prompt tokens are what the model read: the chat template with the clip's <sound> tokens expanded.
    _, inputs = _reference_answer(model, processor, *pairs[0])
    assert answers[0][1] == int(inputs["attention_mask"].sum())


def test_family_refusals_are_400s_naming_the_problem(family_server):
    _, folder, clips, client, _ = family_server
    audio = clips[0].read_bytes()
    with pytest.raises(openai.BadRequestError, match="exactly one audio"):
        client.chat.completions.create(
            model=str(folder),
            messages=[{"role": "user", "content": [{"type": "text", "text": "What is it?"}]}],
            max_tokens=2,
        )
    with pytest.raises(openai.BadRequestError, match=r"roles \['system', 'user'\]"):
        client.chat.completions.create(
            model=str(folder),
            messages=[{"role": "system", "content": "Be brief."}, *audio_message(audio)],
            max_tokens=2,
        )
    with pytest.raises(openai.BadRequestError, match="cannot decode this audio"):
        client.chat.completions.create(model=str(folder), messages=audio_message(b"RIFF not a wav"), max_tokens=2)
