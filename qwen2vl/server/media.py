"""Where a server's images and videos may come from, and how large they may be.

Safe by default: inline `data:` URIs always work; remote URLs only with `allow_remote`, and
then never to a host that is or resolves to a loopback, private, link-local, multicast or
otherwise non-public address, an IPv6 form of one included (the processor's fetcher checks every
address of every redirect, and connects only to the addresses it checked);
local files only under `allowed_dir`. The processor's media budget follows the server's limits
(`server_budget`): every image is opened (header only) and every video probed, and the sizes
their options ask for checked, before any pixel is decoded.
"""
from __future__ import annotations

import ipaddress
from dataclasses import replace

from qwen2vl.errors import InputError, MediaError
from qwen2vl.processor import MediaBudget, MediaPolicy, Processor
from qwen2vl.processor.chat import MediaPart, media_parts
from qwen2vl.processor.fetch import IPAddress
from qwen2vl.server.limits import ServerLimits


_IPV4_COMPATIBLE = ipaddress.ip_network("::/96")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_LOCAL_NAT64 = ipaddress.ip_network("64:ff9b:1::/48")  # RFC 8215: for one network's own translators


def public_addresses_only(host: str, address: IPAddress) -> None:
    """Refuse `address` (one that `host` resolves to) unless it is public, and so is the IPv4 address
    an IPv6 one stands for (a `MediaPolicy.check_address`)."""
    embedded = _embedded_ipv4(address) if isinstance(address, ipaddress.IPv6Address) else None
    if _is_public(address) and (embedded is None or _is_public(embedded)):
        return
    shown = f"{address} (IPv4 {embedded})" if embedded is not None else str(address)
    raise MediaError(f"host {host!r} is or resolves to {shown}, which is not a public address; "
                     "remote media may only come from public hosts")


def _embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address that an IPv6 address carries: IPv4-mapped or -compatible, NAT64 (64:ff9b::/96),
    6to4 (2002::/16) or Teredo's client; None for any other."""
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if (address in _IPV4_COMPATIBLE and int(address) > 1) or address in _NAT64:  # :: and ::1 are themselves
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    if address.sixtofour is not None:
        return address.sixtofour
    if address.teredo is not None:
        return address.teredo[1]
    return None


def _is_public(address: IPAddress) -> bool:
    return address.is_global and not address.is_multicast and address not in _LOCAL_NAT64


def media_policy(media: MediaPolicy) -> MediaPolicy:
    """`media` as the server applies it: remote URLs reach public hosts only."""
    return replace(media, check_address=public_addresses_only)


def server_budget(limits: ServerLimits) -> MediaBudget:
    """The processor's media budget under the server's limits: `max_image_pixels` bounds an image or
    video frame both as sent and as resized, never above the processor's own bounds."""
    default = MediaBudget()
    return MediaBudget(
        max_source_pixels=limits.max_image_pixels,
        max_resized_pixels=limits.max_image_pixels,  # and never above the processor's own (`for_factor`)
        max_video_pixels=limits.max_video_pixels,
        max_item_tokens=min(limits.max_prompt_tokens or default.max_item_tokens, default.max_item_tokens),
    )


def server_processor(processor: Processor, media: MediaPolicy, limits: ServerLimits) -> Processor:
    """`processor` (same tokenizer, template and resize settings) under the server's media policy and limits."""
    return processor.with_media(media_policy(media), server_budget(limits))


def check_media(messages: list[dict], policy: MediaPolicy, limits: ServerLimits) -> list[MediaPart]:
    """The server's rules for the images and videos of `messages` (processor format) that the
    processor does not apply: how many, and that each is a URL string (local paths only with
    `--allowed-media-dir`). Sizes are the processor's `budget` (see `server_budget`), checked from
    headers before any decoding. Raises `InputError` / `MediaError` naming the message and content
    index; returns the parts (no I/O: cheap enough for the event loop).
    """
    parts = media_parts(messages)
    if len(parts) > limits.max_media_per_request:
        raise InputError(f"the request has {len(parts)} images and videos, over the limit of "
                         f"{limits.max_media_per_request}")
    for part in parts:
        try:
            _check_source(part.value, policy)
        except InputError as e:
            raise e.at(part.message_index, part.content_index) from None
    return parts


def _check_source(source, policy: MediaPolicy) -> None:
    if not isinstance(source, str):
        raise MediaError(f"expected a URL string, got {type(source).__name__}")
    if source.startswith(("data:", "http://", "https://")):
        return  # the fetcher applies allow_remote and the host check
    if policy.allowed_dir is None:
        raise MediaError("expected a data: URI or an http(s) URL; local files are refused "
                         "(the server was started without --allowed-media-dir)")
