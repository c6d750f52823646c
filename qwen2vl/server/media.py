"""Where a server's images and videos may come from, and how large they may be.

Safe by default: inline `data:` URIs always work; remote URLs only with `allow_remote`, and
then never to a host that is or resolves to a loopback, private, link-local, multicast or
otherwise non-public address (checked again on every redirect by the processor's fetcher);
local files only under `allowed_dir`. The processor's media budget follows the server's limits
(`server_budget`): every image is opened (header only) and every video probed, and the sizes
their options ask for checked, before any pixel is decoded.
"""
from __future__ import annotations

import ipaddress
import socket

from qwen2vl.errors import InputError, MediaError
from qwen2vl.processor import MediaBudget, MediaPolicy, Processor
from qwen2vl.processor.chat import media_parts
from qwen2vl.server.limits import MediaAccess, ServerLimits


def public_hosts_only(host: str) -> None:
    """Refuse `host` unless every address it resolves to is public (a `MediaPolicy.check_host`)."""
    if not host:
        raise MediaError("the URL has no host")
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError) as e:
        raise MediaError(f"cannot resolve host {host!r}: {e}") from None
    for *_, sockaddr in infos:
        address = ipaddress.ip_address(sockaddr[0].split("%")[0])  # drop an IPv6 zone index
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        if not address.is_global or address.is_multicast:
            raise MediaError(f"host {host!r} is or resolves to {address}, which is not a public address; "
                             "remote media may only come from public hosts")


def media_policy(access: MediaAccess) -> MediaPolicy:
    return MediaPolicy(allow_remote=access.allow_remote, max_bytes=access.max_bytes, timeout=access.fetch_timeout_s,
                       allowed_dir=access.allowed_dir, check_host=public_hosts_only)


def server_budget(limits: ServerLimits) -> MediaBudget:
    """The processor's media budget under the server's limits: `max_image_pixels` bounds an image or
    video frame both as sent and as resized, never above the processor's own bounds."""
    default = MediaBudget()
    return MediaBudget(
        max_source_pixels=limits.max_image_pixels,
        max_resized_pixels=min(limits.max_image_pixels, default.max_resized_pixels),
        max_video_pixels=limits.max_video_pixels,
        max_item_tokens=min(limits.max_prompt_tokens or default.max_item_tokens, default.max_item_tokens),
    )


def server_processor(processor: Processor, access: MediaAccess, limits: ServerLimits) -> Processor:
    """`processor` (same tokenizer, template and resize settings) under the server's media policy and limits."""
    return processor.with_media(media_policy(access), server_budget(limits))


def check_media(messages: list[dict], policy: MediaPolicy, limits: ServerLimits) -> None:
    """The server's rules for the images and videos of `messages` (processor format) that the
    processor does not apply: how many, and that each is a URL string (local paths only with
    `--allowed-media-dir`). Sizes are the processor's `budget` (see `server_budget`), checked from
    headers before any decoding. Raises `InputError` / `MediaError` naming the message and content index.
    """
    parts = media_parts(messages)
    if len(parts) > limits.max_media_per_request:
        raise InputError(f"the request has {len(parts)} images and videos, over the limit of "
                         f"{limits.max_media_per_request}")
    for part in parts:
        try:
            _check_source(part.value, policy)
        except InputError as e:
            raise type(e)(e.cause, part.message_index, part.content_index, e.field) from None


def _check_source(source, policy: MediaPolicy) -> None:
    if not isinstance(source, str):
        raise MediaError(f"expected a URL string, got {type(source).__name__}")
    if source.startswith(("data:", "http://", "https://")):
        return  # the fetcher applies allow_remote and the host check
    if policy.allowed_dir is None:
        raise MediaError("expected a data: URI or an http(s) URL; local files are refused "
                         "(the server was started without --allowed-media-dir)")
