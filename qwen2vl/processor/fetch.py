"""Getting the bytes of an image or video: local path, file://, http(s)://, data: URI, raw base64.

Every way in goes through one `MediaPolicy`, so a server can switch remote fetching off, confine
local files to one folder, or refuse hosts (loopback, private networks) without touching the
decoding code.
"""
from __future__ import annotations

import base64
import binascii
import os
import re
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from qwen2vl.errors import MediaError

DEFAULT_MAX_MEDIA_BYTES = 64 << 20
_BASE64 = re.compile(r"[A-Za-z0-9+/\s]+={0,2}\s*")
_READ_CHUNK = 1 << 16


@dataclass(frozen=True)
class MediaPolicy:
    """Where media may come from and how much of it.

    `check_host(hostname)` is called for every remote URL, redirects included, and refuses a host
    by raising `MediaError` (or any `ValueError`); a server passes one that rejects loopback and
    private addresses. `allowed_dir`, when set, is the only folder local files may come from.
    """

    allow_remote: bool = True
    max_bytes: int = DEFAULT_MAX_MEDIA_BYTES
    timeout: float = 10.0
    allowed_dir: Path | None = None
    check_host: Callable[[str], None] | None = None


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


def fetch_url(url: str, policy: MediaPolicy) -> MediaSource:
    if not policy.allow_remote:
        raise MediaError(f"fetching remote media is disabled: {_short(url)}")
    _check_host(url, policy)
    opener = urllib.request.build_opener(_CheckedRedirects(policy))
    try:
        with opener.open(urllib.request.Request(url, headers={"User-Agent": "qwen2vl"}), timeout=policy.timeout) as response:
            declared = response.headers.get("Content-Length")
            if declared is not None and declared.isdigit() and int(declared) > policy.max_bytes:
                raise MediaError(f"{_short(url)} is {int(declared)} bytes, over the limit of {policy.max_bytes}")
            data = _read_capped(response, policy.max_bytes, _short(url))
            media_type = response.headers.get_content_type() if response.headers.get("Content-Type") else None
    except MediaError:
        raise
    except urllib.error.HTTPError as e:
        raise MediaError(f"fetching {_short(url)} failed: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        if isinstance(reason, TimeoutError) or isinstance(e, TimeoutError):
            raise MediaError(f"fetching {_short(url)} timed out after {policy.timeout}s") from None
        raise MediaError(f"fetching {_short(url)} failed: {reason}") from None
    if not data:
        raise MediaError(f"{_short(url)} returned no data")
    return MediaSource(data=data, origin=_short(url), media_type=media_type)


class _CheckedRedirects(urllib.request.HTTPRedirectHandler):
    """Applies the host check to every redirect target, so a public URL cannot bounce inward."""

    def __init__(self, policy: MediaPolicy):
        self.policy = policy

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if not newurl.startswith(("http://", "https://")):
            raise MediaError(f"redirect to unsupported URL {_short(newurl)}")
        _check_host(newurl, self.policy)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _check_host(url: str, policy: MediaPolicy) -> None:
    if policy.check_host is None:
        return
    host = urllib.parse.urlsplit(url).hostname or ""
    try:
        policy.check_host(host)
    except MediaError:
        raise
    except ValueError as e:
        raise MediaError(f"host {host!r} refused: {e}") from None


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
