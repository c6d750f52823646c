"""Getting the bytes of an image or video: local path, file://, http(s)://, data: URI, raw base64.

Every way in goes through one `MediaPolicy`, so a server can switch remote fetching off, confine
local files to one folder, or refuse addresses (loopback, private networks) without touching the
decoding code.
"""
from __future__ import annotations

import base64
import binascii
import http.client
import ipaddress
import os
import re
import socket
import ssl
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from qwen2vl.errors import MediaError

DEFAULT_MAX_MEDIA_BYTES = 64 << 20
_BASE64 = re.compile(r"[A-Za-z0-9+/\s]+={0,2}\s*")
_READ_CHUNK = 1 << 16
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_MAX_REDIRECTS = 10
_PRINTABLE_ASCII = bytes(range(0x21, 0x7F)).decode()  # a request target keeps these; others are %-escaped
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class MediaPolicy:
    """Where media may come from and how much of it: the one set of media-source settings, the
    processor's (`Processor.from_pretrained(media_policy=)`) and the server's (`create_app(media=)`,
    `qwen2vl.server.limits.SERVER_MEDIA` its default, `serve`'s "media sources" options).

    `check_address(host, address)` is called for every address a remote URL's host resolves to,
    redirects included, and refuses one by raising `MediaError` (or any `ValueError`); a server
    passes one that rejects loopback and private addresses. The fetcher resolves each host once and
    connects only to addresses that passed. `timeout` bounds a whole fetch, redirects included.
    `allowed_dir`, when set, is the only folder local files may come from.
    """

    allow_remote: bool = True
    max_bytes: int = DEFAULT_MAX_MEDIA_BYTES
    timeout: float = 10.0
    allowed_dir: Path | None = None
    check_address: Callable[[str, IPAddress], None] | None = None


@dataclass(frozen=True)
class MediaSource:
    """A resolved source: either `data` (bytes in memory) or `path` (a local file), never both.

    `origin` says what the user sent, for messages ("data URI", "file cat.png", the URL);
    `media_type` is the type the sender declared (a data URI's or an HTTP Content-Type), if any.
    """

    data: bytes | None = None
    path: Path | None = None
    origin: str = "the media"
    media_type: str | None = None

    def head(self, size: int = 16) -> bytes:
        """The first bytes, to tell the user what they sent."""
        if self.data is not None:
            return self.data[:size]
        with open(self.path, "rb") as f:
            return f.read(size)

    def not_a(self, kind: str, reader: str) -> str:
        """Why these bytes are no `kind` ("image", "video") that `reader` can read, in the user's terms."""
        article = "an" if kind[0] in "aeiou" else "a"
        if self.media_type not in (None, "application/octet-stream") and not self.media_type.startswith(kind + "/"):
            return f"{self.origin} of type {self.media_type} is not {article} {kind}"
        return f"{self.origin} is not {article} {kind} {reader} can read (it starts with {self.head()!r})"



def resolve(source: str, policy: MediaPolicy) -> MediaSource:
    """Turn a media string into bytes or a checked local path; raises `MediaError`."""
    if source.startswith(("http://", "https://")):
        return fetch_url(source, policy)
    if source.startswith("data:"):
        return _decode_data_uri(source, policy)
    if source.startswith("file://"):
        return _local_file(source[len("file://"):], policy)
    if "://" in source[:16]:
        raise MediaError(f"unsupported URL scheme {source.split('://', 1)[0]!r} (use a path, file://, http(s):// or data:)")
    if os.path.exists(source) or not _BASE64.fullmatch(source[:4096]) or len(source) < 64:
        return _local_file(source, policy)
    return MediaSource(data=_decode_base64(source, policy), origin="the base64 data")


def relative_to(source: str, folder: str | os.PathLike) -> str:
    """`source` with a relative local path joined onto `folder` (a conversations file's media are
    relative to the file); URLs, data URIs, absolute and `~` paths and raw base64 (as `resolve`
    tells them apart) as they are. `resolve` checks the result like any path (`allowed_dir`)."""
    if source.startswith(("data:", "~")) or "://" in source[:16] or os.path.isabs(source):
        return source
    joined = os.path.join(folder, source)
    if not os.path.exists(joined) and len(source) >= 64 and _BASE64.fullmatch(source[:4096]):
        return source
    return joined


def fetch_url(url: str, policy: MediaPolicy) -> MediaSource:
    """The body of an http(s) URL, following redirects. Each hop's host is resolved once, every
    address it resolves to checked, and the connection made to a checked address (never through a
    proxy, which would resolve the name again); all hops together must finish within
    `policy.timeout` seconds, the name lookups aside."""
    if not policy.allow_remote:
        raise MediaError(f"fetching remote media is disabled: {_short(url)}")
    what = _short(url)
    deadline = time.monotonic() + policy.timeout
    try:
        return _follow(url, what, policy, deadline)
    except MediaError:
        raise
    except TimeoutError:
        raise MediaError(f"fetching {what} timed out after {policy.timeout}s") from None
    except (OSError, http.client.HTTPException, ValueError) as e:
        raise MediaError(f"fetching {what} failed: {e}") from None


def _follow(url: str, what: str, policy: MediaPolicy, deadline: float) -> MediaSource:
    for _ in range(_MAX_REDIRECTS + 1):
        connection = _connect(url, policy, deadline)
        try:
            connection.request("GET", _request_target(url), headers={"User-Agent": "qwen2vl", "Connection": "close"})
            response = connection.getresponse()
            location = response.getheader("Location")
            if response.status in _REDIRECTS and location:
                url = _redirect_target(url, location)
                continue
            if not 200 <= response.status < 300:
                raise MediaError(f"fetching {what} failed: HTTP {response.status} {response.reason}")
            declared = response.getheader("Content-Length")
            if declared is not None and declared.isdigit() and int(declared) > policy.max_bytes:
                raise MediaError(f"{what} is {int(declared)} bytes, over the limit of {policy.max_bytes}")
            data = _read_capped(response, policy.max_bytes, what)
            if not data:
                raise MediaError(f"{what} returned no data")
            media_type = response.headers.get_content_type() if response.getheader("Content-Type") else None
            return MediaSource(data=data, origin=what, media_type=media_type)
        finally:
            connection.close()
    raise MediaError(f"fetching {what} failed: more than {_MAX_REDIRECTS} redirects")


def _redirect_target(url: str, location: str) -> str:
    target = urllib.parse.urljoin(url, location)
    if not target.startswith(("http://", "https://")):
        raise MediaError(f"redirect to unsupported URL {_short(target)}")
    return target


def _request_target(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return urllib.parse.quote(target, safe=_PRINTABLE_ASCII)


def _connect(url: str, policy: MediaPolicy, deadline: float) -> _CheckedConnection:
    """A connection (not yet opened) to `url`'s host at the addresses it resolves to, each checked."""
    parts = urllib.parse.urlsplit(url)
    host, tls = parts.hostname, parts.scheme == "https"
    if not host:
        raise MediaError(f"{_short(url)} has no host")
    port = parts.port or (443 if tls else 80)
    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as e:
        raise MediaError(f"cannot resolve host {host!r}: {e}") from None
    _remaining(deadline)
    if policy.check_address is not None:
        for *_, sockaddr in addresses:
            _check_address(host, ipaddress.ip_address(sockaddr[0].split("%")[0]), policy.check_address)
    return _CheckedConnection(host, port, addresses, deadline, tls)


def _check_address(host: str, address: IPAddress, check: Callable[[str, IPAddress], None]) -> None:
    try:
        check(host, address)
    except MediaError:
        raise
    except ValueError as e:
        raise MediaError(f"host {host!r} ({address}) refused: {e}") from None


class _CheckedConnection(http.client.HTTPConnection):
    """HTTP or HTTPS to addresses resolved and checked beforehand: the host name is never resolved
    again (it cannot rebind to an address nobody checked), while TLS still sends it as SNI and
    verifies the certificate against it. Every blocking step ends by `deadline`."""

    def __init__(self, host: str, port: int, addresses: list, deadline: float, tls: bool):
        super().__init__(host, port)
        self.default_port = 443 if tls else 80  # the Host header leaves the default port out
        self.addresses = addresses
        self.deadline = deadline
        self.tls = tls

    def connect(self) -> None:
        sock = _open_socket(self.addresses, self.deadline)
        if self.tls:
            try:
                sock.settimeout(_remaining(self.deadline))  # bounds the whole handshake
                sock = _tls_context().wrap_socket(sock, server_hostname=self.host)
            except BaseException:
                sock.close()
                raise
            sock.deadline = self.deadline
        self.sock = sock


def _tls_context() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.sslsocket_class = _DeadlineSSLSocket
    return context


def _open_socket(addresses: list, deadline: float) -> socket.socket:
    """A TCP connection to the first of `addresses` (`getaddrinfo` entries) that accepts one."""
    error = None
    for family, kind, proto, _, sockaddr in addresses:
        sock = _DeadlineSocket(family, kind, proto)
        sock.deadline = deadline
        try:
            sock.settimeout(_remaining(deadline))
            sock.connect(sockaddr)
            return sock
        except OSError as e:
            sock.close()
            if isinstance(e, TimeoutError):
                raise
            error = e
    raise error


class _Deadline:
    """Mixed into a socket class: each receive and send waits only until `deadline` (a
    `time.monotonic()` value), so a peer dripping a byte at a time is cut off at the deadline too,
    in the headers as in the body."""

    deadline: float  # set on each socket as soon as it exists

    def recv_into(self, *args, **kwargs):
        self.settimeout(_remaining(self.deadline))
        return super().recv_into(*args, **kwargs)

    def sendall(self, *args, **kwargs):
        self.settimeout(_remaining(self.deadline))
        return super().sendall(*args, **kwargs)


class _DeadlineSocket(_Deadline, socket.socket):
    pass


class _DeadlineSSLSocket(_Deadline, ssl.SSLSocket):
    pass


def _remaining(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("the fetch's deadline passed")
    return left


def _read_capped(stream, limit: int, what: str) -> bytes:
    chunks, size = [], 0
    while chunk := stream.read(_READ_CHUNK):
        size += len(chunk)
        if size > limit:
            raise MediaError(f"{what} is over the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _local_file(path: str, policy: MediaPolicy) -> MediaSource:
    resolved = Path(path).expanduser().resolve()
    if policy.allowed_dir is not None and not resolved.is_relative_to(Path(policy.allowed_dir).resolve()):
        raise MediaError(f"local file {path!r} is outside the allowed media folder")
    if resolved.is_dir():
        raise MediaError(f"{_short(path)} is a directory, not a file")
    if not resolved.is_file():
        raise MediaError(f"file not found: {_short(path)}")
    size = resolved.stat().st_size
    if size > policy.max_bytes:
        raise MediaError(f"file {_short(path)} is {size} bytes, over the limit of {policy.max_bytes}")
    if size == 0:
        raise MediaError(f"file {_short(path)} is empty")
    return MediaSource(path=resolved, origin=f"file {_short(path)}")


def _decode_data_uri(uri: str, policy: MediaPolicy) -> MediaSource:
    header, sep, payload = uri.partition(",")
    if not sep or not header.endswith(";base64"):
        raise MediaError("a data: URI must be base64-encoded (data:<type>;base64,<data>)")
    media_type = header[len("data:"):-len(";base64")].split(";", 1)[0].strip().lower() or None
    return MediaSource(data=_decode_base64(payload, policy), origin="data URI", media_type=media_type)


def _decode_base64(text: str, policy: MediaPolicy) -> bytes:
    if len(text) * 3 // 4 > policy.max_bytes + 3:
        raise MediaError(f"base64 media is over the limit of {policy.max_bytes} bytes")
    try:
        data = base64.b64decode(text, validate=False)
    except (binascii.Error, ValueError) as e:
        raise MediaError(f"invalid base64 media: {e}") from None
    if not data:
        raise MediaError("base64 media is empty")
    return data


def _short(text: str, limit: int = 120) -> str:
    return text if len(text) <= limit else text[:limit] + "..."
