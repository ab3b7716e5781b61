"""
`af2 serve` against an untrusted client: real server processes on 127.0.0.1, the official `openai` client, httpx
for what it cannot send, real HTTP servers that record every request, and a listener that never answers.
"""

import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from test_serve import MAX_TOKENS, audio_message, pipeline_answer, running_server, streamed
from test_serve_audio_sources import recording_server, silent_listener

openai = pytest.importorskip("openai", reason="the [serve] extra (openai, fastapi, uvicorn) is not installed")
pytest.importorskip("fastapi", reason="the [serve] extra (fastapi, uvicorn) is not installed")

API_KEY = "test-key-7f3a"
WAIT = 120  # seconds; a safety net only
POLL = 0.05  # seconds between looks at /health while waiting for a state (not a timing assumption)
# The keyed server's per-request limit: short requests end well within it, 1900 tokens of the tiny model do not.
REQUEST_TIMEOUT = 8


@pytest.fixture(scope="module")
def greedy_answers(loaded):
    from transformers import pipeline

    fixture, model, processor = loaded
    pipe = pipeline("audio-text-to-text", model=model, processor=processor)
    return {index: pipeline_answer(pipe, fixture.wav(index), do_sample=False) for index in range(2)}


@pytest.fixture(scope="module")
def keyed_server(converted_fixture, tmp_path_factory):
    """API key and admin routes; audio as data only (the default)."""
    log = tmp_path_factory.mktemp("keyed") / "server.log"
    options = ["--admin-routes", "--request-timeout", str(REQUEST_TIMEOUT), "--max-tokens-limit", "2000"]
    with running_server(converted_fixture.repo, log, *options, env={"AF2_API_KEY": API_KEY}) as (url, _):
        yield url


@pytest.fixture(scope="module")
def url_server(converted_fixture, tmp_path_factory):
    """URL fetching opted in, with 127.0.0.1 as the operator's trusted address (standing in for a public host);
    127.0.0.2 stays internal. Small queue and batches for the load tests."""
    log = tmp_path_factory.mktemp("urls") / "server.log"
    options = ["--allow-audio-urls", "--audio-url-trusted-networks", "127.0.0.1/32", "--max-audio-mb", "1",
               "--audio-url-timeout", "60", "--max-batch-size", "4", "--max-queue", "1", "--max-tokens-limit", "2000"]  # fmt: skip
    with running_server(converted_fixture.repo, log, *options) as (url, _):
        yield url


def openai_client(url, key=API_KEY):
    return openai.OpenAI(base_url=url, api_key=key, max_retries=0, timeout=WAIT)


def url_message(url: str, question: str = "What is the sound in this audio?") -> list[dict]:
    content = [{"type": "audio_url", "audio_url": {"url": url}}, {"type": "text", "text": question}]
    return [{"role": "user", "content": content}]


def test_every_route_but_health_needs_the_api_key(keyed_server, converted_fixture, greedy_answers):
    model = str(converted_fixture.repo)
    messages = audio_message(converted_fixture.wav(0).read_bytes())
    client = openai_client(keyed_server, "wrong-key")
    with pytest.raises(openai.AuthenticationError):
        client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=2)
    with pytest.raises(openai.AuthenticationError):
        client.models.list()
    base = keyed_server.removesuffix("/v1")
    no_key = httpx.post(f"{keyed_server}/chat/completions", json={"model": model, "messages": messages})
    assert no_key.status_code == 401 and no_key.headers["WWW-Authenticate"] == "Bearer"
    assert httpx.get(f"{keyed_server}/models").status_code == 401
    assert httpx.get(f"{base}/health").status_code == 200
    answer = openai_client(keyed_server).chat.completions.create(
        model=model, messages=messages, temperature=0, max_tokens=MAX_TOKENS
    )
    assert answer.choices[0].message.content == greedy_answers[0]


def test_admin_routes_need_the_key_and_load_only_the_served_model(keyed_server, converted_fixture, greedy_answers):
    base = keyed_server.removesuffix("/v1")
    auth = {"Authorization": f"Bearer {API_KEY}"}
    model = str(converted_fixture.repo)
    assert httpx.post(f"{base}/reset").status_code == 401
    assert httpx.post(f"{base}/load_model", json={"model": model}).status_code == 401
    assert httpx.get(f"{base}/health").json()["status"] == "ok"  # nothing happened

    assert httpx.post(f"{base}/reset", headers=auth, timeout=WAIT).json() == {"status": "unloaded"}
    assert httpx.get(f"{base}/health").json()["status"] == "unloaded"
    client = openai_client(keyed_server)
    messages = audio_message(converted_fixture.wav(1).read_bytes())
    with pytest.raises(openai.InternalServerError) as caught:
        client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=2)
    assert caught.value.status_code == 503 and "unloaded" in caught.value.message
    other = httpx.post(f"{base}/load_model", json={"model": "/tmp"}, headers=auth, timeout=WAIT)
    assert other.status_code == 400 and "only the model it was started with" in other.json()["error"]["message"]
    loaded = httpx.post(f"{base}/load_model", json={"model": model}, headers=auth, timeout=WAIT)
    assert loaded.json()["status"] == "loaded"
    answer = client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=MAX_TOKENS)
    assert answer.choices[0].message.content == greedy_answers[1]


def test_admin_routes_are_off_unless_asked_for(url_server):
    base = url_server.removesuffix("/v1")
    for route in ("/reset", "/load_model"):
        response = httpx.post(f"{base}{route}", json={"model": "/tmp"})
        assert response.status_code == 404
        assert "POST /v1/chat/completions" in response.json()["error"]["message"]


def test_server_paths_and_urls_are_refused_the_same_way_and_never_touched(keyed_server, converted_fixture, tmp_path):
    client = openai_client(keyed_server)
    model = str(converted_fixture.repo)
    existing = str(converted_fixture.wav(0))  # a real audio file: read, it would be answered
    missing = str(tmp_path / "missing.wav")
    with recording_server(routes={"/clip.wav": (200, {}, converted_fixture.wav(0).read_bytes())}) as recorder:
        by_reference = {}
        for name, reference in {
            "existing path": existing,
            "missing path": missing,
            "file URL": f"file://{existing}",
            "missing file URL": f"file://{missing}",
            "http URL": f"{recorder.url}/clip.wav",
        }.items():
            with pytest.raises(openai.BadRequestError) as caught:
                client.chat.completions.create(model=model, messages=url_message(reference))
            by_reference[name] = caught.value.message
        assert recorder.requests == []
    assert len(set(by_reference.values())) == 1, by_reference  # the answer says nothing about the file system
    assert "base64" in by_reference["existing path"]

    def input_audio(value):
        return [
            {"role": "user", "content": [{"type": "input_audio", "input_audio": value}, {"type": "text", "text": "?"}]}
        ]

    refusals = []
    for messages in (
        input_audio(existing),  # a bare string
        input_audio({"data": existing}),  # no format
        input_audio({"data": missing}),
        [{"role": "user", "content": [{"type": "audio", "path": existing}, {"type": "text", "text": "?"}]}],
    ):
        with pytest.raises(openai.BadRequestError) as caught:
            client.chat.completions.create(model=model, messages=messages)
        refusals.append(caught.value.message)
    assert refusals[1] == refusals[2]
    assert "content type 'audio' is not supported" in refusals[3]


def test_opted_in_urls_fetch_public_addresses_only_and_never_follow_redirects_inward(
    url_server, converted_fixture, greedy_answers
):
    client = openai_client(url_server)
    model = str(converted_fixture.repo)
    wav = converted_fixture.wav(0).read_bytes()
    with recording_server("127.0.0.2", {"/secret.wav": (200, {}, wav)}) as internal:
        routes = {
            "/clip.wav": (200, {}, wav),
            "/to-internal": (302, {"Location": f"{internal.url}/secret.wav"}, b""),
            "/big.wav": (200, {}, wav * 8),
        }
        with recording_server(routes=routes) as public:
            answer = client.chat.completions.create(
                model=model, messages=url_message(f"{public.url}/clip.wav"), temperature=0, max_tokens=MAX_TOKENS
            )
            assert answer.choices[0].message.content == greedy_answers[0]
            for url, reason in (
                (f"{internal.url}/secret.wav", "non-public address"),
                (f"{public.url}/to-internal", "non-public address"),
                ("http://169.254.169.254/latest/meta-data/", "non-public address"),
                (f"{public.url}/big.wav", "over 1048576 bytes"),
                ("ftp://127.0.0.1/clip.wav", "only http and https"),
            ):
                with pytest.raises(openai.BadRequestError) as caught:
                    client.chat.completions.create(model=model, messages=url_message(url))
                assert reason in caught.value.message
            assert [path for path, _ in public.requests] == ["/clip.wav", "/to-internal", "/big.wav"]
        assert internal.requests == []


def test_a_url_that_never_answers_stalls_nobody_else(url_server, converted_fixture, greedy_answers):
    client = openai_client(url_server)
    model = str(converted_fixture.repo)
    base = url_server.removesuffix("/v1")
    with silent_listener() as (url, accepted, connections), ThreadPoolExecutor(1) as pool:
        stalled = pool.submit(
            lambda: httpx.post(
                f"{url_server}/chat/completions", json={"model": model, "messages": url_message(url)}, timeout=WAIT
            )
        )
        assert accepted.wait(WAIT)  # the server is now waiting on the silent host
        assert httpx.get(f"{base}/health", timeout=10).status_code == 200
        assert [m.id for m in client.models.list()] == [model]
        answer = client.chat.completions.create(
            model=model, messages=audio_message(converted_fixture.wav(1).read_bytes()), temperature=0,
            max_tokens=MAX_TOKENS,
        )  # fmt: skip
        assert answer.choices[0].message.content == greedy_answers[1]
        assert not stalled.done()  # all of that while the download still hangs
        for connection in connections:  # the host gives up: the stalled request ends with a 400
            connection.close()
        response = stalled.result(timeout=WAIT)
    assert response.status_code == 400
    assert "could not be fetched" in response.json()["error"]["message"]


def test_a_full_queue_is_a_503_with_retry_after_and_a_client_that_leaves_is_cancelled(
    url_server, converted_fixture, greedy_answers
):
    model = str(converted_fixture.repo)
    base = url_server.removesuffix("/v1")
    wav = converted_fixture.wav(0).read_bytes()
    before = httpx.get(f"{base}/health").json()
    long_body = {"model": model, "messages": audio_message(wav), "max_tokens": 1900, "temperature": 0, "stream": True}
    # A greedy request that cannot join the long one's batch only if it differs in kind: a seeded sampled one.
    queued_body = {"model": model, "messages": audio_message(wav), "max_tokens": 2, "seed": 1}
    with httpx.Client(timeout=WAIT) as http, ThreadPoolExecutor(1) as pool:
        with http.stream("POST", f"{url_server}/chat/completions", json=long_body) as stream:
            # Read up to the first piece of the answer (the request is running), keeping the iterator: a closed
            # one would close the response, and the server would cancel the request too early for this test.
            lines = stream.iter_lines()
            while not ('"content": "' in (line := next(lines)) and '"content": ""' not in line):
                pass
            queued = pool.submit(lambda: http.post(f"{url_server}/chat/completions", json=queued_body))
            while httpx.get(f"{base}/health").json()["waiting"] != 1:
                assert not queued.done(), queued.result().text
                time.sleep(POLL)
            refused = http.post(f"{url_server}/chat/completions", json=queued_body)
            assert refused.status_code == 503
            assert int(refused.headers["Retry-After"]) >= 1
            assert "busy" in refused.json()["error"]["message"]
        # The long stream's client has left: its generation stops and the queued request runs.
        assert queued.result(timeout=WAIT).status_code == 200
    after = httpx.get(f"{base}/health").json()
    assert after.get("cancelled", 0) == before.get("cancelled", 0) + 1
    assert after["running"] == 0 and after["waiting"] == 0


def test_load_good_and_bad_requests_mixed(url_server, converted_fixture, greedy_answers):
    """48 requests from 8 clients at once, a third of them bad; every good one answered right, every bad one a 4xx.
    The queue holds one waiting request, so clients retry a 503 after its Retry-After (as OpenAI's client does)."""
    model = str(converted_fixture.repo)
    wavs = {index: converted_fixture.wav(index).read_bytes() for index in range(2)}
    client = openai.OpenAI(base_url=url_server, api_key="unused", max_retries=20, timeout=WAIT)
    bad_messages = {
        "undecodable": audio_message(b"RIFF\x10\x00\x00\x00WAVEjunk" * 8),
        "path": url_message("/etc/passwd"),
        "internal": url_message("http://127.0.0.2:9/clip.wav"),
        "no audio": [{"role": "user", "content": "hello"}],
    }
    lock, outcomes = threading.Lock(), []

    def ask(number: int):
        kind = number % 3
        if kind == 2:
            name = list(bad_messages)[number % len(bad_messages)]
            try:
                client.chat.completions.create(model=model, messages=bad_messages[name], max_tokens=4)
            except openai.BadRequestError as error:
                result = ("bad", error.status_code)
            else:
                result = ("bad", 200)
        else:
            index = number % 2
            kwargs = dict(model=model, messages=audio_message(wavs[index]), temperature=0, max_tokens=MAX_TOKENS)
            if number % 4 == 0:
                text = streamed(client.chat.completions.create(stream=True, **kwargs))[0]
            else:
                text = client.chat.completions.create(**kwargs).choices[0].message.content
            result = ("good", text == greedy_answers[index])
        with lock:
            outcomes.append(result)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(ask, range(48)))
    assert sorted(set(outcomes)) == [("bad", 400), ("good", True)]
    assert len(outcomes) == 48
    assert httpx.get(url_server.removesuffix("/v1") + "/health").json()["status"] == "ok"


def test_binding_beyond_localhost_without_a_key_warns(converted_fixture, tmp_path):
    from conftest import free_port, running_af2_command

    port = free_port()
    args = ["serve", "--model", str(converted_fixture.repo), "--port", str(port), "--device", "cpu", "--host",
            "127.0.0.3", "--log-level", "warning"]  # fmt: skip
    log = tmp_path / "server.log"
    with running_af2_command(args, log, f"http://127.0.0.3:{port}/health", 180):
        assert "without an API key" in log.read_text()


def test_admin_routes_without_a_key_are_refused_at_start(monkeypatch):
    monkeypatch.delenv("AF2_API_KEY", raising=False)
    from transformers_af2.commands import build_parser
    from transformers_af2.commands.serve import settings_from_args

    args = build_parser().parse_args(["serve", "--admin-routes"])
    with pytest.raises(ValueError, match="--admin-routes needs an API key"):
        settings_from_args(args)
    args = build_parser().parse_args(["serve", "--audio-url-trusted-networks", "10.0.0.0/8"])
    with pytest.raises(ValueError, match="applies to --allow-audio-urls"):
        settings_from_args(args)
    args = build_parser().parse_args(["serve", "--allow-audio-urls", "a.example, b.example"])
    assert settings_from_args(args).audio.allowed_hosts == {"a.example", "b.example"}
    assert not settings_from_args(build_parser().parse_args(["serve"])).audio.allow_urls


@pytest.fixture
def timeout_server(converted_fixture, tmp_path):
    options = ["--request-timeout", str(REQUEST_TIMEOUT), "--max-tokens-limit", "2000"]
    with running_server(converted_fixture.repo, tmp_path / "server.log", *options) as (url, process):
        yield url, process


def _held_past_the_time_limit(process) -> None:
    """Holds the server still (SIGSTOP) until its request time limit has passed, then lets it go on. The deadline is
    on the monotonic clock, which runs on while the process is stopped: the request cannot finish in time however fast
    the machine, and a slower machine only makes it later."""
    process.send_signal(signal.SIGSTOP)
    try:
        time.sleep(REQUEST_TIMEOUT + 1)
    finally:
        process.send_signal(signal.SIGCONT)


def _health_once_idle(base: str) -> dict:
    """/health once nothing waits or runs (the model thread has counted every outcome)."""
    deadline = time.monotonic() + WAIT
    while True:
        health = httpx.get(f"{base}/health", timeout=WAIT).json()
        if health["running"] == 0 and health["waiting"] == 0:
            return health
        assert time.monotonic() < deadline, f"the server never became idle: {health}"
        time.sleep(0.05)


def test_a_request_over_the_time_limit_ends_with_a_timeout_and_frees_the_model(timeout_server, converted_fixture):
    url, process = timeout_server
    model = str(converted_fixture.repo)
    base = url.removesuffix("/v1")
    client = openai_client(url)
    messages = audio_message(converted_fixture.wav(0).read_bytes())
    # Streaming: the first chunk shows the request running; the server is then held past its time limit.
    stream = client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=1900,
                                            stream=True)  # fmt: skip
    with pytest.raises(openai.APIError) as caught:
        for index, _ in enumerate(stream):
            if index == 0:
                _held_past_the_time_limit(process)
    assert "request timeout" in caught.value.message
    assert _health_once_idle(base).get("timeout", 0) == 1  # the model was freed
    # Not streaming: /health shows it running, then the same.
    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(
            client.chat.completions.create, model=model, messages=messages, temperature=0, max_tokens=1900
        )
        while httpx.get(f"{base}/health", timeout=WAIT).json()["running"] == 0:
            assert not waiting.done(), "the request ended before it was seen running"
            time.sleep(0.05)
        _held_past_the_time_limit(process)
        with pytest.raises(openai.APIStatusError) as caught:
            waiting.result()
    assert caught.value.status_code == 504 and "request timeout" in caught.value.message
    assert _health_once_idle(base).get("timeout", 0) == 2


def test_the_command_line_does_not_import_the_server_stack():
    import subprocess
    import sys

    code = (
        "import sys; from transformers_af2.commands import build_parser; build_parser().parse_args(['serve']); "
        "print(sorted(m for m in ('fastapi', 'uvicorn', 'starlette') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_malformed_bodies_are_400s(keyed_server):
    auth = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    url = f"{keyed_server}/chat/completions"
    for body in (b"{not json", b"\xff\xfe", b"[" * 100000, b"[]", b'{"messages": []}'):
        response = httpx.post(url, content=body, headers=auth, timeout=WAIT)
        assert response.status_code == 400, (body[:20], response.text)
        assert response.json()["error"]["type"] == "invalid_request_error"


def test_a_waiting_client_that_leaves_is_cancelled(keyed_server, converted_fixture):
    """Non-streaming: the server notices the closed connection while it generates and stops the request (well before
    its 1900 tokens or the request timeout)."""
    model = str(converted_fixture.repo)
    base = keyed_server.removesuffix("/v1")
    before = httpx.get(f"{base}/health").json()
    body = {"model": model, "messages": audio_message(converted_fixture.wav(0).read_bytes()), "temperature": 0,
            "max_tokens": 1900}  # fmt: skip
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with pytest.raises(httpx.ReadTimeout):  # the client gives up after 2 s and closes its connection
        httpx.post(f"{keyed_server}/chat/completions", json=body, headers=headers, timeout=2)
    while (now := httpx.get(f"{base}/health").json())["running"] or now.get("cancelled", 0) == before.get(
        "cancelled", 0
    ):
        assert now.get("timeout", 0) == before.get("timeout", 0), now  # cancelled, not left to time out
        time.sleep(POLL)
    assert now.get("answered", 0) == before.get("answered", 0)
