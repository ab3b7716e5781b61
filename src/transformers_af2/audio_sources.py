"""
What audio a remote client may send, in one place for every command that answers someone else (`af2 serve`, and any
later server or web page): the safety rules live here, not in each command.

By default a client sends the audio itself and nothing else: base64 data with its format (OpenAI's
`{"type": "input_audio", "input_audio": {"data": ..., "format": "wav"}}`), or a `data:` URI. Anything that names a
place instead (a server path, `file://`, any URL) is refused with `AudioSourceError` before anything is touched, and
the message is the same whether or not such a file or host exists, so the server's files and network stay invisible.

Fetching URLs is the operator's opt-in (`AudioSourcePolicy(allow_urls=True)`): http/https only; every hop's host is
resolved and each of its addresses must be public (not loopback, private, link-local such as the cloud metadata
address 169.254.169.254, shared, multicast, reserved, unspecified), unless the operator listed it in
`trusted_networks`; the connection goes to the address that was checked (so a DNS answer that changes between
check and connect cannot redirect it); redirects are followed by hand, each checked the same way, at most
`max_redirects`; the body is read with a size cap and a deadline; no retries. `fetch_url` blocks: call it off an
event loop (a worker thread).

    policy = AudioSourcePolicy()                                    # data only
    audio = audio_bytes_from_content_item(item, policy)             # bytes, or AudioSourceError with the reason
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import socket
import time
import urllib.parse
from collections.abc import Iterable
from dataclasses import dataclass, field

# What libsndfile, the feature extractor's reader, decodes; the names OpenAI's `format` and MIME subtypes use.
AUDIO_FORMATS = ("wav", "mp3", "flac", "ogg")
_MIME_SUBTYPES = {"wav": "wav", "x-wav": "wav", "wave": "wav", "vnd.wave": "wav", "mpeg": "mp3", "mp3": "mp3",
                  "flac": "flac", "x-flac": "flac", "ogg": "ogg", "vorbis": "ogg", "opus": "ogg"}  # fmt: skip
DEFAULT_MAX_AUDIO_BYTES = 50 * 1024 * 1024

HOW_TO_SEND_AUDIO = (
    'send the audio itself: {"type": "input_audio", "input_audio": {"data": <base64 of the file>, "format": '
    f'"wav"}} (formats: {", ".join(AUDIO_FORMATS)}), or {{"type": "audio_url", "audio_url": {{"url": '
    '"data:audio/wav;base64,<base64>"}}'
)


class AudioSourceError(ValueError):
    """The client's audio reference is not allowed or not readable; the message says why and how to send audio."""


@dataclass(frozen=True)
class AudioSourcePolicy:
    """
    What a client's audio may be.

    Args:
        allow_urls: fetch http(s) URLs (the server then makes requests on the client's behalf, under the rules of the
            module docstring). Off: only data.
        allowed_hosts: with `allow_urls`, the host names a URL may name (each redirect too); empty: any public host.
        trusted_networks: addresses the operator allows although they are not public (an internal mirror, a test's
            127.0.0.1); only the operator sets these, a client cannot.
        max_bytes: the largest audio accepted, decoded from base64 or downloaded.
        connect_timeout, read_timeout: seconds for a connection and for each read of a download.
        total_timeout: seconds for a whole download, redirects included.
        max_redirects: redirects followed per URL.
    """

    allow_urls: bool = False
    allowed_hosts: frozenset[str] = frozenset()
    trusted_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = field(default_factory=tuple)
    max_bytes: int = DEFAULT_MAX_AUDIO_BYTES
    connect_timeout: float = 5.0
    read_timeout: float = 10.0
    total_timeout: float = 30.0
    max_redirects: int = 3

    @classmethod
    def from_options(
        cls,
        allow_urls: bool = False,
        allowed_hosts: Iterable[str] = (),
        trusted_networks: Iterable[str] = (),
        **options,
    ) -> AudioSourcePolicy:
        """A policy from command-line strings: host names, and networks as addresses or CIDR (`10.0.0.0/8`)."""
        networks = []
        for value in trusted_networks:
            try:
                networks.append(ipaddress.ip_network(value.strip(), strict=False))
            except ValueError:
                raise ValueError(
                    f"trusted network {value!r} is not an IP address or network (e.g. 10.1.2.3/32)."
                ) from None
        hosts = frozenset(host.strip().lower().rstrip(".") for host in allowed_hosts if host.strip())
        return cls(allow_urls=allow_urls, allowed_hosts=hosts, trusted_networks=tuple(networks), **options)


# ---------------------------------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------------------------------


def decode_base64_audio(data, audio_format, policy: AudioSourcePolicy, where: str = "audio") -> bytes:
    """Base64 audio (or a `data:` URI, whose media type then gives the format) -> its bytes."""
    if not isinstance(data, str) or not data:
        raise AudioSourceError(f"{where}: 'data' must be a non-empty base64 string; {HOW_TO_SEND_AUDIO}.")
    if data.startswith("data:"):
        return decode_data_uri(data, policy, where)
    if audio_format is None:
        raise AudioSourceError(
            f"{where}: 'format' is missing; the audio's format is required (one of {', '.join(AUDIO_FORMATS)}). "
            "Audio is never read from a path or URL: " + HOW_TO_SEND_AUDIO + "."
        )
    if not isinstance(audio_format, str) or audio_format.lower() not in AUDIO_FORMATS:
        raise AudioSourceError(f"{where}: format {audio_format!r} is not supported; use one of {AUDIO_FORMATS}.")
    return _b64decode(data, policy, where)


def decode_data_uri(uri: str, policy: AudioSourcePolicy, where: str = "audio") -> bytes:
    """`data:audio/<subtype>;base64,<data>` -> the bytes."""
    header, comma, payload = uri.partition(",")
    parts = header[len("data:") :].split(";")
    if not comma or "base64" not in parts[1:]:
        raise AudioSourceError(f"{where}: a data URI must be data:audio/<format>;base64,<data>; {HOW_TO_SEND_AUDIO}.")
    media = parts[0].lower()
    if media and media != "application/octet-stream":
        kind, _, subtype = media.partition("/")
        if kind != "audio" or subtype not in _MIME_SUBTYPES:
            raise AudioSourceError(
                f"{where}: data URI media type {media!r} is not audio AF2 reads; use audio/wav, audio/mpeg, "
                "audio/flac or audio/ogg."
            )
    return _b64decode(payload, policy, where)


def _b64decode(data: str, policy: AudioSourcePolicy, where: str) -> bytes:
    # 4 characters hold 3 bytes: a payload over the cap is refused before it is decoded.
    if len(data) // 4 * 3 > policy.max_bytes + 3:
        raise AudioSourceError(f"{where}: the audio is over {policy.max_bytes} bytes, the server's limit.")
    try:
        decoded = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as error:
        raise AudioSourceError(f"{where}: 'data' is not valid base64 ({error}); {HOW_TO_SEND_AUDIO}.") from None
    if not decoded:
        raise AudioSourceError(f"{where}: the audio data is empty.")
    if len(decoded) > policy.max_bytes:
        raise AudioSourceError(f"{where}: the audio is over {policy.max_bytes} bytes, the server's limit.")
    return decoded


# ---------------------------------------------------------------------------------------------------------------------
# content items (OpenAI chat messages)
# ---------------------------------------------------------------------------------------------------------------------


def audio_bytes_from_content_item(item: dict, policy: AudioSourcePolicy, where: str = "audio") -> bytes:
    """
    The audio of one OpenAI content item, `input_audio` or `audio_url`, as bytes of an encoded file. Never opens a
    server path; fetches a URL only when the policy allows it (then blocking: call from a worker thread).
    """
    kind = item.get("type")
    if kind == "input_audio":
        audio = item.get("input_audio")
        if not isinstance(audio, dict):
            raise AudioSourceError(
                f"{where}: 'input_audio' must be an object with 'data' (base64) and 'format'; {HOW_TO_SEND_AUDIO}."
            )
        return decode_base64_audio(audio.get("data"), audio.get("format"), policy, where)
    if kind == "audio_url":
        audio = item.get("audio_url")
        url = audio.get("url") if isinstance(audio, dict) else audio
        if not isinstance(url, str) or not url:
            raise AudioSourceError(f"{where}: 'audio_url' needs a 'url'; {HOW_TO_SEND_AUDIO}.")
        if url.startswith("data:"):
            return decode_data_uri(url, policy, where)
        return fetch_url(url, policy, where)
    raise AudioSourceError(f"{where}: content type {kind!r} is not audio; {HOW_TO_SEND_AUDIO}.")


# ---------------------------------------------------------------------------------------------------------------------
# URLs (opt-in)
# ---------------------------------------------------------------------------------------------------------------------


def _refuse_reference(url: str, where: str) -> AudioSourceError:
    # The same words for every path and URL, whether it exists or not.
    return AudioSourceError(
        f"{where}: this server does not read audio from paths or URLs (it fetches nothing on a client's behalf); "
        f"{HOW_TO_SEND_AUDIO}."
    )


def address_is_allowed(address: str, policy: AudioSourcePolicy) -> bool:
    """True for a public unicast address, or one in the operator's `trusted_networks`."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])  # an IPv6 scope id is not part of the address
    if any(ip in network for network in policy.trusted_networks if network.version == ip.version):
        return True
    if ip.version == 6 and ip.ipv4_mapped is not None:  # ::ffff:127.0.0.1 is 127.0.0.1
        return address_is_allowed(str(ip.ipv4_mapped), policy)
    # is_global is False for loopback, private, link-local (169.254.169.254, the cloud metadata service),
    # shared (100.64/10), reserved, unspecified and documentation ranges; multicast is not unicast.
    return ip.is_global and not ip.is_multicast


def _checked_target(url: str, policy: AudioSourcePolicy, where: str) -> tuple[urllib.parse.SplitResult, str]:
    """The URL's parts and the resolved address to connect to, after every check; AudioSourceError otherwise."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise AudioSourceError(f"{where}: only http and https URLs are fetched, not {parts.scheme or 'a path'}.")
    host = (parts.hostname or "").lower().rstrip(".")
    if not host:
        raise AudioSourceError(f"{where}: the URL has no host.")
    if parts.username or parts.password:
        raise AudioSourceError(f"{where}: URLs with credentials are not fetched.")
    if policy.allowed_hosts and host not in policy.allowed_hosts:
        raise AudioSourceError(f"{where}: host {host!r} is not among the hosts this server fetches audio from.")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise AudioSourceError(f"{where}: the URL's port is not a number.") from None
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        raise AudioSourceError(f"{where}: host {host!r} could not be resolved.") from None
    addresses = list(dict.fromkeys(info[4][0] for info in infos))
    refused = [address for address in addresses if not address_is_allowed(address, policy)]
    if refused or not addresses:
        # Every address must pass: a name with one public and one internal address could be connected to either.
        raise AudioSourceError(
            f"{where}: host {host!r} resolves to a loopback, private, link-local or otherwise non-public address; "
            "this server fetches audio from public addresses only."
        )
    return parts, addresses[0]


def fetch_url(url: str, policy: AudioSourcePolicy, where: str = "audio") -> bytes:
    """
    The body of an http(s) URL under the policy (see the module docstring); refused without `allow_urls`. Blocking.
    Raises `AudioSourceError` for a refused or failed download (the client's problem: a 4xx).
    """
    if not policy.allow_urls:
        raise _refuse_reference(url, where)
    import httpx

    deadline = time.monotonic() + policy.total_timeout
    timeout = httpx.Timeout(policy.read_timeout, connect=policy.connect_timeout)
    # trust_env=False: no proxy from the environment, which would connect elsewhere than to the checked address.
    with httpx.Client(timeout=timeout, follow_redirects=False, trust_env=False) as client:
        for _ in range(policy.max_redirects + 1):
            parts, address = _checked_target(url, policy, where)
            # Connect to the checked address (a second DNS answer cannot send the request elsewhere); the Host
            # header and, for https, the TLS server name (SNI and certificate check) stay the URL's host.
            netloc = f"[{address}]" if ":" in address else address
            if parts.port:
                netloc += f":{parts.port}"
            target = urllib.parse.urlunsplit((parts.scheme, netloc, parts.path or "/", parts.query, ""))
            headers = {"Host": parts.netloc.rsplit("@", 1)[-1], "Accept": "audio/*"}
            extensions = {"sni_hostname": parts.hostname} if parts.scheme == "https" else {}
            try:
                with client.stream("GET", target, headers=headers, extensions=extensions) as response:
                    if response.is_redirect:
                        location = response.headers.get("location")
                        if not location:
                            raise AudioSourceError(f"{where}: the server answered a redirect without a location.")
                        url = urllib.parse.urljoin(url, location)
                        continue
                    if response.status_code != 200:
                        raise AudioSourceError(f"{where}: the URL answered HTTP {response.status_code}.")
                    return _read_capped(response, policy, deadline, where)
            except httpx.TimeoutException:
                raise AudioSourceError(f"{where}: the URL did not answer in time.") from None
            except httpx.HTTPError as error:
                raise AudioSourceError(f"{where}: the URL could not be fetched ({type(error).__name__}).") from None
        raise AudioSourceError(f"{where}: more than {policy.max_redirects} redirects.")


def _read_capped(response, policy: AudioSourcePolicy, deadline: float, where: str) -> bytes:
    declared = response.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > policy.max_bytes:
        raise AudioSourceError(f"{where}: the audio is over {policy.max_bytes} bytes, the server's limit.")
    body = bytearray()
    for chunk in response.iter_bytes():
        body += chunk
        if len(body) > policy.max_bytes:
            raise AudioSourceError(f"{where}: the audio is over {policy.max_bytes} bytes, the server's limit.")
        if time.monotonic() > deadline:
            raise AudioSourceError(f"{where}: the download took longer than {policy.total_timeout:g} s.")
    if not body:
        raise AudioSourceError(f"{where}: the URL's body is empty.")
    return bytes(body)


__all__ = [
    "AUDIO_FORMATS",
    "HOW_TO_SEND_AUDIO",
    "AudioSourceError",
    "AudioSourcePolicy",
    "address_is_allowed",
    "audio_bytes_from_content_item",
    "decode_base64_audio",
    "decode_data_uri",
    "fetch_url",
]
