"""Where a server's images and videos may come from, and how large they may be.

Safe by default: inline `data:` URIs always work; remote URLs only with `allow_remote`, and
then never to a host that is or resolves to a loopback, private, link-local, multicast or
otherwise non-public address (checked again on every redirect by the processor's fetcher);
local files only under `allowed_dir`. Images are opened (header only) and videos probed, and
their pixel counts checked, before any pixel is decoded.
"""
from __future__ import annotations

import ipaddress
import socket

from qwen2vl.errors import InputError, MediaError
from qwen2vl.processor import MediaPolicy, Processor
from qwen2vl.processor.chat import MediaPart, media_parts
from qwen2vl.processor.fetch import resolve
from qwen2vl.processor.image import open_image
from qwen2vl.processor.video import probe_video, sample_frame_count
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


def server_processor(processor: Processor, access: MediaAccess) -> Processor:
    """`processor` (same tokenizer, template and resize settings) under the server's media policy."""
    return Processor(processor.tokenizer, processor.template, processor.patchifier,
                     processor.min_pixels, processor.max_pixels, media_policy(access))


def check_media(messages: list[dict], policy: MediaPolicy, limits: ServerLimits) -> None:
    """Apply the server's rules to the images and videos of `messages` (processor format).

    Each image is opened here (fetched once, header only) and replaced in `messages` by the
    opened image, which the processor then decodes. A video's container is probed for its frame
    size and the frames that would be sampled. Raises `InputError` / `MediaError` naming the
    message and content index.
    """
    parts = media_parts(messages)
    if len(parts) > limits.max_media_per_request:
        raise InputError(f"the request has {len(parts)} images and videos, over the limit of "
                         f"{limits.max_media_per_request}")
    for part in parts:
        try:
            _check_source(part.value, policy)
            if part.kind == "image":
                image = open_image(part.value, policy)
                _check_pixels("the image", *image.size, limits.max_image_pixels)
                messages[part.message_index]["content"][part.content_index]["image"] = image
            else:
                _check_video(part, policy, limits)
        except InputError as e:
            raise type(e)(e.cause, part.message_index, part.content_index, e.field) from None


def _check_video(part: MediaPart, policy: MediaPolicy, limits: ServerLimits) -> None:
    # The processor decodes the sampled frames at full size before resizing them: bound that.
    probe = probe_video(resolve(part.value, policy))
    _check_pixels("a frame of the video", probe.width, probe.height, limits.max_image_pixels)
    frames = sample_frame_count(part.options, probe.total_frames, probe.fps)
    if frames * probe.width * probe.height > limits.max_video_pixels:
        raise MediaError(f"the video would decode {frames} frames of {probe.width}x{probe.height}, over the limit of "
                         f"{limits.max_video_pixels} pixels per video; ask for fewer frames (fps, nframes)")


def _check_pixels(what: str, width: int, height: int, limit: int) -> None:
    if width * height > limit:
        raise MediaError(f"{what} is {width}x{height} = {width * height} pixels, over the limit of {limit} pixels")


def _check_source(source, policy: MediaPolicy) -> None:
    if not isinstance(source, str):
        raise MediaError(f"expected a URL string, got {type(source).__name__}")
    if source.startswith(("data:", "http://", "https://")):
        return  # the fetcher applies allow_remote and the host check
    if policy.allowed_dir is None:
        raise MediaError("expected a data: URI or an http(s) URL; local files are refused "
                         "(the server was started without --allowed-media-dir)")
