"""
`transformers_af2.audio_sources`, in process against real sockets on 127.0.0.1/127.0.0.2: what a client's audio may
be, and the opt-in URL fetch's guards (addresses, redirects, size, time).
"""

import base64
import contextlib
import http.server
import socket
import threading
import time

import pytest

from transformers_af2.audio_sources import (
    AudioSourceError,
    AudioSourcePolicy,
    address_is_allowed,
    audio_bytes_from_content_item,
    fetch_url,
)

WAV = b"RIFF\x24\x00\x00\x00WAVEfmt "  # only bytes here: nothing decodes them


class RecordingServer:
    """A real HTTP server on `host` that records every request line and answers from `routes`:
    path -> (status, headers, body), where a `{host2}`-style placeholder may be filled by the test."""

    def __init__(self, host: str, routes: dict):
        self.requests: list[tuple[str, str]] = []
        self.routes = routes
        recorder = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (the standard library's name)
                recorder.requests.append((self.path, self.headers.get("Host")))
                status, headers, body = recorder.routes.get(self.path, (404, {}, b"not here"))
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer((host, 0), Handler)
        self.url = f"http://{host}:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@contextlib.contextmanager
def recording_server(host="127.0.0.1", routes=None):
    server = RecordingServer(host, routes or {})
    try:
        yield server
    finally:
        server.close()


@contextlib.contextmanager
def silent_listener(host="127.0.0.1"):
    """A TCP listener that accepts connections and never answers; yields (url, event set on the first accept)."""
    sock = socket.socket()
    sock.bind((host, 0))
    sock.listen(8)
    accepted, connections, stop = threading.Event(), [], threading.Event()

    def accept():
        sock.settimeout(0.2)
        while not stop.is_set():
            try:
                connections.append(sock.accept()[0])
                accepted.set()
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://{host}:{sock.getsockname()[1]}/clip.wav", accepted, connections
    finally:
        stop.set()
        thread.join()
        for connection in connections:
            connection.close()
        sock.close()


TRUSTED_LOCALHOST = AudioSourcePolicy.from_options(allow_urls=True, trusted_networks=["127.0.0.1/32"], max_bytes=1000)


@pytest.mark.parametrize(
    ("address", "allowed"),
    [
        ("8.8.8.8", True),
        ("2606:4700:4700::1111", True),
        ("127.0.0.1", False),
        ("127.0.0.2", False),
        ("10.1.2.3", False),
        ("172.16.0.1", False),
        ("192.168.1.1", False),
        ("169.254.169.254", False),  # cloud metadata
        ("100.100.100.200", False),  # shared address space (a cloud's metadata service)
        ("0.0.0.0", False),
        ("224.0.0.1", False),
        ("::1", False),
        ("fe80::1%eth0", False),
        ("fd00:ec2::254", False),
        ("::ffff:127.0.0.1", False),
        ("::ffff:169.254.169.254", False),
    ],
)
def test_only_public_addresses_are_allowed(address, allowed):
    assert address_is_allowed(address, AudioSourcePolicy(allow_urls=True)) is allowed


def test_the_operators_trusted_networks_are_allowed_and_nothing_else():
    policy = AudioSourcePolicy.from_options(allow_urls=True, trusted_networks=["10.1.2.0/24", "127.0.0.1"])
    assert address_is_allowed("10.1.2.77", policy) and address_is_allowed("127.0.0.1", policy)
    assert not address_is_allowed("10.1.3.1", policy) and not address_is_allowed("127.0.0.2", policy)
    with pytest.raises(ValueError, match="not an IP address or network"):
        AudioSourcePolicy.from_options(trusted_networks=["intranet"])


def test_data_is_accepted_with_its_format_or_as_a_data_uri():
    policy = AudioSourcePolicy()
    data = base64.b64encode(WAV).decode()
    item = {"type": "input_audio", "input_audio": {"data": data, "format": "wav"}}
    assert audio_bytes_from_content_item(item, policy) == WAV
    uri = {"type": "audio_url", "audio_url": {"url": f"data:audio/wav;base64,{data}"}}
    assert audio_bytes_from_content_item(uri, policy) == WAV
    with pytest.raises(AudioSourceError, match="media type 'image/png'"):
        audio_bytes_from_content_item(
            {"type": "audio_url", "audio_url": {"url": f"data:image/png;base64,{data}"}}, policy
        )
    with pytest.raises(AudioSourceError, match="over 4 bytes"):
        audio_bytes_from_content_item(item, AudioSourcePolicy(max_bytes=4))
    with pytest.raises(AudioSourceError, match="not valid base64"):
        audio_bytes_from_content_item({"type": "input_audio", "input_audio": {"data": "%%%", "format": "wav"}}, policy)


def test_paths_and_urls_are_refused_by_default_with_one_message_and_nothing_fetched(tmp_path):
    existing = tmp_path / "clip.wav"
    existing.write_bytes(WAV)
    policy = AudioSourcePolicy()
    with recording_server(routes={"/clip.wav": (200, {}, WAV)}) as server:
        messages = set()
        for url in (str(existing), str(tmp_path / "missing.wav"), f"file://{existing}", f"{server.url}/clip.wav"):
            with pytest.raises(AudioSourceError) as caught:
                audio_bytes_from_content_item({"type": "audio_url", "audio_url": {"url": url}}, policy)
            messages.add(str(caught.value))
        assert server.requests == []
    assert len(messages) == 1  # the same words whether the file exists or not
    assert "does not read audio from paths or URLs" in messages.pop()
    for audio in (str(existing), {"data": str(existing)}, {"data": str(tmp_path / "missing.wav")}):
        with pytest.raises(AudioSourceError, match="input_audio|format"):
            audio_bytes_from_content_item({"type": "input_audio", "input_audio": audio}, policy)


def test_an_allowed_url_is_fetched_from_the_checked_address_with_its_host_header():
    with recording_server(routes={"/clip.wav": (200, {}, WAV)}) as server:
        assert fetch_url(f"{server.url}/clip.wav", TRUSTED_LOCALHOST) == WAV
        assert server.requests == [("/clip.wav", server.url.removeprefix("http://"))]


def test_internal_addresses_and_redirects_into_them_are_refused_before_any_request():
    with recording_server("127.0.0.2", {"/secret": (200, {}, WAV)}) as internal:
        routes = {
            "/to-internal": (302, {"Location": f"{internal.url}/secret"}, b""),
            "/loop": (302, {"Location": "/loop"}, b""),
            "/big": (200, {}, b"x" * 5000),
        }
        with recording_server(routes=routes) as public:
            for url in (f"{internal.url}/secret", f"{public.url}/to-internal", "http://169.254.169.254/latest/"):
                with pytest.raises(AudioSourceError, match="non-public address"):
                    fetch_url(url, TRUSTED_LOCALHOST)
            with pytest.raises(AudioSourceError, match="more than 3 redirects"):
                fetch_url(f"{public.url}/loop", TRUSTED_LOCALHOST)
            with pytest.raises(AudioSourceError, match="over 1000 bytes"):
                fetch_url(f"{public.url}/big", TRUSTED_LOCALHOST)
            for url in ("ftp://127.0.0.1/clip.wav", "file:///etc/hostname", "gopher://127.0.0.1/"):
                with pytest.raises(AudioSourceError, match="only http and https"):
                    fetch_url(url, TRUSTED_LOCALHOST)
            only_other_hosts = AudioSourcePolicy.from_options(
                allow_urls=True, allowed_hosts=["cdn.example.com"], trusted_networks=["127.0.0.1"]
            )
            with pytest.raises(AudioSourceError, match="not among the hosts"):
                fetch_url(f"{public.url}/big", only_other_hosts)
            # The redirect was asked for (1), the loop 4 times (first + 3 redirects); nothing else.
            assert [path for path, _ in public.requests] == ["/to-internal", *["/loop"] * 4, "/big"]
        assert internal.requests == []


def test_a_url_that_never_answers_times_out_without_retries():
    policy = AudioSourcePolicy.from_options(
        allow_urls=True, trusted_networks=["127.0.0.1"], connect_timeout=1.0, read_timeout=1.0
    )
    with silent_listener() as (url, accepted, connections):
        started = time.monotonic()
        with pytest.raises(AudioSourceError, match="did not answer in time"):
            fetch_url(url, policy)
        assert accepted.is_set()
        assert time.monotonic() - started < 30  # a safety net; the limit is 1 s per read
        assert len(connections) == 1  # one connection: no retry
