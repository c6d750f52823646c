"""Videos: a file decoded with PyAV (optional extra, imported lazily) or a list of frames.

Sampling and pixel budgets follow qwen_vl_utils 0.0.14: `fps` (default 2) or `nframes`, an even
number of frames between 4 and 768, each frame within 128..768 tokens and an even share of a
total budget of 0.9 * 128000 tokens across the video.

Qwen3-VL's prompts say when each temporal patch was taken (`group_timestamps`), from the sampled
frames' indices and the video's frame rate, as qwen_vl_utils' video metadata gives them to its
processor: a file's stream rate, or for a list of frames `raw_fps`, else `sample_fps` (default 2).
"""
from __future__ import annotations

import bisect
import io
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from qwen2vl.errors import InputError, MediaError
from qwen2vl.processor.budget import number
from qwen2vl.processor.fetch import MediaPolicy, MediaSource
from qwen2vl.processor.image import (
    image_target_size,
    open_image,
    resize_frames,
    resize_image,
    smart_resize,
    to_rgb,
)
from qwen2vl.processor.types import MediaOptions

VIDEO_MIN_TOKENS = 128
VIDEO_MAX_TOKENS = 768
DEFAULT_FPS = 2.0
FRAME_FACTOR = 2
MIN_FRAMES = 4
MAX_FRAMES = 768
MODEL_SEQ_LEN = 128000  # qwen_vl_utils' MODEL_SEQ_LEN: the total pixel budget is 90% of this many tokens


@dataclass(frozen=True)
class VideoProbe:
    """What the container says, before decoding any pixels."""

    total_frames: int
    fps: float
    width: int
    height: int


def sample_frame_count(options: MediaOptions, total_frames: int, video_fps: float) -> int:
    """How many frames qwen_vl_utils samples: an even count from `nframes`, or from `fps` within
    min_frames..max_frames (default 4..768) and the video's length."""
    if total_frames < FRAME_FACTOR:
        raise MediaError(f"the video has only {total_frames} frame; a video needs at least {FRAME_FACTOR} "
                         "(send a single picture as an image)")
    if options.nframes is not None:
        count = round(options.nframes / FRAME_FACTOR) * FRAME_FACTOR
        if count < FRAME_FACTOR:
            raise InputError(f"nframes must be at least {FRAME_FACTOR} (frames are sampled in pairs), "
                             f"got {number(options.nframes)}", field="nframes")
        if count > total_frames:
            raise MediaError(f"nframes asks for {count} frames; the video has only {total_frames}", field="nframes")
        return count
    fps = DEFAULT_FPS if options.fps is None else options.fps
    min_frames = math.ceil((options.min_frames or MIN_FRAMES) / FRAME_FACTOR) * FRAME_FACTOR
    max_frames = math.floor((options.max_frames or min(MAX_FRAMES, total_frames)) / FRAME_FACTOR) * FRAME_FACTOR
    if max_frames < FRAME_FACTOR:
        raise InputError(f"max_frames must be at least {FRAME_FACTOR} (frames are sampled in pairs), "
                         f"got {number(options.max_frames)}", field="max_frames")
    count = total_frames / video_fps * fps
    count = min(max(count, min_frames), max_frames, total_frames)
    return math.floor(count / FRAME_FACTOR) * FRAME_FACTOR


def sample_indices(total_frames: int, count: int) -> list[int]:
    return torch.linspace(0, total_frames - 1, count).round().long().tolist()


def group_timestamps(indices: list[int], video_fps: float, temporal_patch_size: int) -> list[float]:
    """Seconds into the video of each temporal patch: the mean of its first and last frame's time
    (`index / video_fps`), the last patch filled up with the last frame, as Qwen3-VL's processor
    computes the `<t seconds>` of its video prompts."""
    indices = list(indices) + list(indices[-1:]) * (-len(indices) % temporal_patch_size)
    seconds = [index / video_fps for index in indices]  # each divided first, as the reference: the sums can differ in the last bit
    return [(seconds[i] + seconds[i + temporal_patch_size - 1]) / 2 for i in range(0, len(seconds), temporal_patch_size)]


def timestamp_text(seconds: float) -> str:
    return f"<{seconds:.1f} seconds>"


def video_target_size(height: int, width: int, num_frames: int, options: MediaOptions, factor: int) -> tuple[int, int]:
    """Per-frame size: 128..768 tokens, capped by an even share of the whole video's pixel budget."""
    if options.resized_height is not None:
        return smart_resize(options.resized_height, options.resized_width, factor)
    min_pixels = VIDEO_MIN_TOKENS * factor * factor if options.min_pixels is None else options.min_pixels
    total_pixels = MODEL_SEQ_LEN * factor * factor * 0.9 if options.total_pixels is None else options.total_pixels
    max_pixels = max(min(VIDEO_MAX_TOKENS * factor * factor, total_pixels / num_frames * FRAME_FACTOR), int(min_pixels * 1.05))
    if options.max_pixels is not None:
        max_pixels = min(options.max_pixels, max_pixels)
    return smart_resize(height, width, factor, min_pixels, max_pixels)


def _av():
    try:
        import av
    except ImportError:
        raise MediaError("decoding video files needs PyAV: pip install 'qwen2vl[video]'") from None
    return av


def _open_container(source: MediaSource):
    av = _av()
    try:
        container = av.open(io.BytesIO(source.data) if source.data is not None else str(source.path))
    except av.InvalidDataError:
        raise MediaError(source.not_a("video", "PyAV")) from None
    except (av.FFmpegError, OSError, ValueError) as e:
        raise MediaError(f"cannot read video: {e}") from None
    if container.format.name == "image2" or container.format.name.endswith("_pipe"):  # png_pipe, jpeg_pipe, ...
        container.close()
        raise MediaError(f"{source.origin} is a still image ({container.format.name}), not a video; "
                         "send it as an image")
    if not container.streams.video:
        container.close()
        raise MediaError(f"{source.origin} has no video stream")
    return container


def probe_video(source: MediaSource) -> VideoProbe:
    """Frame count, rate and size from the container; frames are counted by demuxing if not recorded."""
    av = _av()
    with _open_container(source) as container:
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate
        try:
            total = stream.frames or sum(1 for p in container.demux(stream) if p.size)
        except av.FFmpegError as e:
            raise MediaError(f"cannot read video: {e}") from None
        probe = VideoProbe(total, float(rate) if rate else 0.0, stream.codec_context.width, stream.codec_context.height)
    if probe.total_frames == 0:
        raise MediaError("the video has no frames")
    if probe.fps <= 0:
        raise MediaError("the video has no frame rate")
    return probe


def decode_frames(source: MediaSource, indices: list[int], size: tuple[int, int]) -> tuple[torch.Tensor, int]:
    """The frames at `indices` (in presentation order), each resized to `size` as it is decoded, as
    uint8 `[T, 3, height, width]`, and how many frames the stream has (or, if it ends before the
    last wanted frame, how many it had): then nothing comes back and the caller re-samples.

    Only what is sampled is decoded: from the stream's packet index (demuxed, not decoded) each
    wanted frame's timestamp and the keyframe before it; the decoder seeks to that keyframe when it
    lies ahead of where decoding is, else decodes forward, on all cores (PyAV frame threads).
    """
    av = _av()
    with _open_container(source) as container:
        stream = container.streams.video[0]
        try:
            index = _packet_index(container, stream)
            if index is not None and len(index[0]) <= max(indices):
                return torch.empty(0), len(index[0])
            stream.thread_type = "AUTO"
            frames = None if index is None else _decode_at(container, stream, [index[0][i] for i in indices], index[1], size)
            if frames is not None:
                return frames, len(index[0])
            container.seek(0, stream=stream)
            return _decode_in_order(container.decode(stream), indices, size)
        except av.FFmpegError as e:
            raise MediaError(f"cannot decode video: {e}") from None


def _packet_index(container, stream) -> tuple[list[int], list[int]] | None:
    """Presentation timestamps of every frame, sorted, and those of the keyframes; None for a stream
    whose packets lack timestamps. Leaves the demuxer at the start."""
    timestamps, keyframes = [], []
    for packet in container.demux(stream):
        if packet.size:
            if packet.pts is None:
                return None
            timestamps.append(packet.pts)
            if packet.is_keyframe:
                keyframes.append(packet.pts)
    container.seek(0, stream=stream)
    if not keyframes:
        return None
    return sorted(timestamps), sorted(keyframes)


def _decode_at(container, stream, targets: list[int], keyframes: list[int], size) -> torch.Tensor | None:
    """The frames of timestamps `targets`, resized: seek to the keyframe before each one that is
    ahead of the decoder, decode forward. None when a frame's timestamp is not what the index says."""
    frames = _Resized(size)
    decoded, position = None, None  # the decoding iterator; the timestamp of its last frame
    for target in sorted(set(targets)):
        key = keyframes[max(0, bisect.bisect_right(keyframes, target) - 1)]
        if decoded is None or key > position:
            container.seek(key, stream=stream, backward=True)
            decoded = container.decode(stream)
        frame = next((f for f in decoded if f.pts is not None and f.pts >= target), None)
        if frame is None or frame.pts != target:
            return None
        position = frame.pts
        frames.add(target, frame)
    return frames.stack(targets)


def _decode_in_order(decoded, indices: list[int], size) -> tuple[torch.Tensor, int]:
    """The frames at `indices` counted in decoding order, resized, and how many were decoded; stops
    after the last wanted one (nothing comes back if the stream ends first)."""
    wanted, last, frames, count = set(indices), max(indices), _Resized(size), 0
    for frame in decoded:
        if count in wanted:
            frames.add(count, frame)
        count += 1
        if count > last:
            return frames.stack(indices), count
    return torch.empty(0), count


class _Resized:
    """Decoded frames resized to `size` a few at a time: never more than `CHUNK` of them held at full
    resolution, and one resize call per chunk (one call per frame costs several times more in
    torch's thread pool when the machine is busy)."""

    CHUNK = 16

    def __init__(self, size: tuple[int, int]):
        self.size = size
        self.done: dict[int, torch.Tensor] = {}
        self.pending: list[tuple[int, torch.Tensor]] = []

    def add(self, key: int, frame) -> None:
        self.pending.append((key, torch.from_numpy(frame.to_ndarray(format="rgb24")).permute(2, 0, 1)))
        if len(self.pending) == self.CHUNK:
            self._flush()

    def stack(self, keys: list[int]) -> torch.Tensor:
        self._flush()
        return torch.stack([self.done[key] for key in keys])

    def _flush(self) -> None:
        if self.pending:
            resized = resize_frames(torch.stack([rgb for _, rgb in self.pending]), *self.size)
            self.done.update(zip((key for key, _ in self.pending), resized))
            self.pending = []


def load_video_file(source: MediaSource, probe: VideoProbe, options: MediaOptions,
                    frame_size: Callable[[int], tuple[int, int]]) -> tuple[torch.Tensor, float, list[int]]:
    """Sampled frames, each resized to `frame_size(number of frames)` (uint8 `[T, 3, H, W]`), the
    sampled fps, and the sampled frames' indices in the stream."""
    total = probe.total_frames
    for _ in range(2):
        count = sample_frame_count(options, total, probe.fps)
        indices = sample_indices(total, count)
        frames, found = decode_frames(source, indices, frame_size(count))
        if frames.numel():
            return frames, count / max(total, 1e-6) * probe.fps, indices
        if found == 0:
            raise MediaError("the video has no frames")
        total = found  # the container over-reported its frame count
    raise MediaError("the video's frame count changed between reads")


def frame_list_sizes(frames: list, options: MediaOptions, policy: MediaPolicy, max_source_pixels: int,
                     frame_factor: int):
    """Each frame opened lazily (header only, see `open_image`) and its qwen_vl_utils size; all must agree.

    qwen_vl_utils resizes listed frames as images with a factor of patch * merge * merge (it hands
    its image fetcher patch * merge as the patch size), so for Qwen2-VL they come out in multiples
    of 56 before the video resize; callers pass that `frame_factor` to stay identical.
    """
    if not frames:
        raise MediaError("the video has no frames")
    opened, size = [], None
    for index, frame in enumerate(frames):
        try:
            image = open_image(frame, policy, max_source_pixels)
            target = image_target_size(image.height, image.width, options, frame_factor)
        except MediaError as e:
            raise MediaError(f"frame {index}: {e.cause}", field=e.field) from None
        if size is not None and target != size:
            raise MediaError(f"frame {index} resizes to {target[1]}x{target[0]}, frame 0 to {size[1]}x{size[0]}")
        opened.append(image)
        size = target
    return opened, size


def load_frame_list(opened: list, height: int, width: int) -> torch.Tensor:
    """Opened frames resized as images (PIL bicubic) to `height` x `width`, padded to an even count
    by repeating the last."""
    tensors = []
    for index, image in enumerate(opened):
        try:
            tensors.append(resize_image(to_rgb(image), height, width))
        except MediaError as e:
            raise MediaError(f"frame {index}: {e.cause}") from None
    tensors += tensors[-1:] * (-len(tensors) % FRAME_FACTOR)
    return torch.stack(tensors)
