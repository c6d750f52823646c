"""How much one request, and the server as a whole, may ask for; where media may come from by
default (a `MediaPolicy`, the processor's one name for media-source settings).

Plain settings, cheap to import (the CLI reads their defaults for its help).
"""
from __future__ import annotations

from dataclasses import Field, dataclass, field, replace
from pathlib import Path

from qwen2vl.errors import InputError, Qwen2VLError
from qwen2vl.processor.fetch import MediaPolicy


# The default `max_prompt_bytes` per prompt token: text runs 3-8 bytes a token (code indented by
# runs of spaces the most), so only text that could not fit is refused before it is tokenized.
PROMPT_BYTES_PER_TOKEN = 16


class Overloaded(Qwen2VLError):
    """Too many requests in flight: the client should retry later (HTTP 503 with Retry-After)."""

    retry_after_s = 1


def _limit(default, help: str):
    """A `ServerLimits` field and its `qwen2vl serve` option (see `flag`), with `help` as its help."""
    return field(default=default, metadata={"help": help})


def flag(f: Field) -> str:
    """The `qwen2vl serve` option of a `ServerLimits` field: its name with dashes, less a unit
    suffix (`request_timeout_s`: `--request-timeout`)."""
    return "--" + f.name.removesuffix("_s").replace("_", "-")


@dataclass(frozen=True)
class ServerLimits:
    """Per-request and server-wide limits; every one is a command-line option of `qwen2vl serve`
    (`flag`; the CLI builds them from these fields, help and default included)."""

    max_body_bytes: int = _limit(32 << 20, "HTTP request body, base64 images included (413 over it); routes "
                                               "without a body take none")
    header_timeout_s: float = _limit(10.0, "seconds for a request's line and headers to arrive, from the connection's "
                                           "start or the last response (408 and the connection closed over it; idle "
                                           "connections close too)")
    body_timeout_s: float = _limit(60.0, "seconds for a request's whole body to arrive, from the end of its headers "
                                         "(408 over it)")
    max_connections: int = _limit(1000, "open connections, idle ones included; a request on one more gets 503")
    max_media_per_request: int = _limit(8, "images and videos in one request")
    max_image_pixels: int = _limit(7680 * 4320, "width x height of an image or video frame, as sent and as its "
                                                "per-part options resize it")
    max_video_pixels: int = _limit(256 * 1920 * 1080, "width x height x frames of all the frames sampled from one "
                                                      "video, as decoded")
    max_prompt_tokens: int | None = _limit(None, "default: --max-model-len minus one")
    max_prompt_bytes: int | None = _limit(None, "a request's prompt text (messages and tools, or prompts), UTF-8, "
                                                "refused before it is tokenized (default: "
                                                f"{PROMPT_BYTES_PER_TOKEN} per token of --max-prompt-tokens)")
    max_requests_in_flight: int = _limit(256, "requests preparing, waiting or generating; beyond it new requests "
                                              "get 503 with Retry-After")
    request_timeout_s: float = _limit(600.0, "seconds from arrival to the last token (504 over it)")
    max_choices: int = _limit(16, "choices one request may ask for: n, times the number of prompts for "
                                  "/v1/completions")
    media_workers: int = _limit(4, "threads that fetch and decode media, off the event loop")

    def prompt_token_limit(self, max_model_len: int) -> int:
        return max_model_len - 1 if self.max_prompt_tokens is None else min(self.max_prompt_tokens, max_model_len - 1)

    def check_prompt_bytes(self, num_bytes: int, max_model_len: int, field: str) -> None:
        """Before tokenizing: the UTF-8 bytes of a request's prompt text (all of it: `field`)."""
        tokens = self.prompt_token_limit(max_model_len)
        limit = PROMPT_BYTES_PER_TOKEN * tokens if self.max_prompt_bytes is None else self.max_prompt_bytes
        if num_bytes > limit:
            why = (f"{PROMPT_BYTES_PER_TOKEN} bytes for each of the {tokens} prompt tokens allowed"
                   if self.max_prompt_bytes is None else "the server's --max-prompt-bytes")
            raise InputError(f"the prompt text is {num_bytes} bytes (UTF-8), over the limit of {limit} ({why}); "
                             "shorten it", field=field)

    def check_prompt_length(self, num_tokens: int, max_model_len: int) -> None:
        limit = self.prompt_token_limit(max_model_len)
        if num_tokens > limit:
            raise InputError(
                f"the prompt has {num_tokens} tokens, over the limit of {limit} (the context is {max_model_len} "
                f"tokens, prompt plus answer); shorten it or send smaller images (max_pixels)"
            )

    def check_choices(self, num_choices: int) -> None:
        if not 1 <= num_choices <= self.max_choices:
            raise InputError(f"the request asks for {num_choices} choices; the limit is {self.max_choices} "
                             "(n, times the number of prompts)")


# Where a server's images and videos may come from unless told otherwise (`serve`'s "media sources"
# options): inline data only, each at most 20 MiB. The server refuses local files without
# `allowed_dir` and lets remote URLs reach public hosts only (`qwen2vl.server.media`).
SERVER_MEDIA = MediaPolicy(allow_remote=False, max_bytes=20 << 20)


def MediaAccess(*, allow_remote: bool = SERVER_MEDIA.allow_remote,  # noqa: N802 (a class before)
                allowed_dir: Path | None = SERVER_MEDIA.allowed_dir, max_bytes: int = SERVER_MEDIA.max_bytes,
                fetch_timeout_s: float = SERVER_MEDIA.timeout) -> MediaPolicy:
    """`SERVER_MEDIA` with these settings: the server's `MediaPolicy` under its earlier name."""
    return replace(SERVER_MEDIA, allow_remote=allow_remote, allowed_dir=allowed_dir, max_bytes=max_bytes,
                   timeout=fetch_timeout_s)


class Admission:
    """Counts the requests in flight and refuses new ones over `limit`."""

    def __init__(self, limit: int):
        self.limit = limit
        self.in_flight = 0

    def acquire(self, count: int) -> None:
        if self.in_flight + count > self.limit:
            raise Overloaded(f"the server is at its limit of {self.limit} requests in flight; retry shortly")
        self.in_flight += count

    def release(self, count: int) -> None:
        self.in_flight -= count
