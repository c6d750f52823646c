"""How large one image or video may become, checked from its header and its per-item options
before any pixel is decoded or resized, so that a small request cannot make the processor
allocate gigabytes.

Every pixel bound on an image or video frame, and its one owner. Three settings size the media
(the first two resizes are the reference's, see `qwen2vl.processor.image`); the budget refuses
what is over its bounds, never shrinks it; the server sets the budget, it has no bound of its own:

| bound | owner (where it is set) | what it does | default |
|---|---|---|---|
| `min_pixels`, `max_pixels`, `resized_height`/`resized_width`, `total_pixels` of a part | the content part: `MediaOptions`, read once by `chat.media_parts` (a server request's `image_url`/`video_url` part) | sizes the item's first resize (qwen_vl_utils') | 4..16384 visual tokens an image, 128..768 a video frame |
| `Processor.min_pixels` / `max_pixels` | the processor: preprocessor_config.json, or `from_pretrained(min_pixels=, max_pixels=)` (`EngineArgs`, `--min-pixels`/`--max-pixels`) | sizes the second resize (transformers') of every image and frame | the checkpoint's; 3136..12,845,056 for Qwen2-VL; none for Qwen3-VL, whose card resizes once (`do_resize=False`) |
| `MediaBudget.max_source_pixels` | this budget | refuses an image or frame as sent | `MAX_SOURCE_PIXELS` |
| `MediaBudget.max_resized_pixels` | this budget | refuses a first resize over it (a `min_pixels` over it before fetching) | `MAX_RESIZED_PIXELS` |
| `MediaBudget.max_video_pixels` | this budget | refuses a video's sampled frames over it, as held | `MAX_VIDEO_PIXELS` |
| `ServerLimits.max_image_pixels` (`serve --max-image-pixels`) | the server's limits, which set its budget (`qwen2vl.server.media.server_budget`) | becomes the server budget's `max_source_pixels`, and its `max_resized_pixels` where lower | 7680x4320 |
| `ServerLimits.max_video_pixels` (`serve --max-video-pixels`) | the same | becomes the server budget's `max_video_pixels` | `MAX_VIDEO_PIXELS` |

The defaults are the bounds a user of Qwen2-VL can expect:

- an image or video frame as sent, as decoded: `MAX_SOURCE_PIXELS`, PIL's own decompression-bomb
  threshold (about 9459x9459);
- an image or video frame after its per-item resize (`min_pixels`, `max_pixels`,
  `resized_height`/`resized_width`): `MAX_RESIZED_PIXELS`, 16384 visual tokens, which is the
  model card's (and qwen_vl_utils') default `max_pixels` for an image;
- all frames sampled from one video, as decoded (or, for a list of frames, as resized first):
  `MAX_VIDEO_PIXELS`, 256 frames of 1920x1080;
- the visual tokens of one image or video: `MAX_ITEM_TOKENS`, Qwen2-VL's context length.

A processor makes a plan per item (`qwen2vl.processor.types.MediaPlan`), fits the plans to the
context, and `MediaBudget.check` checks each, once, before anything is decoded; only the options
alone (`check_options`) are checked earlier, before the media is fetched.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from qwen2vl.config import DEFAULT_CONTEXT_LEN
from qwen2vl.errors import InputError, MediaError
from qwen2vl.processor.image import IMAGE_MAX_TOKENS
from qwen2vl.processor.types import FrameListPlan, ImagePlan, MediaOptions, MediaPlan, VideoFilePlan

MAX_SOURCE_PIXELS = 89_478_485  # PIL.Image.MAX_IMAGE_PIXELS as PIL ships it
MAX_RESIZED_PIXELS = IMAGE_MAX_TOKENS * 28 * 28  # 12,845,056: at Qwen2-VL's and Qwen2.5-VL's 28-pixel factor
MAX_VIDEO_PIXELS = 256 * 1920 * 1080
MAX_ITEM_TOKENS = DEFAULT_CONTEXT_LEN


def resized_pixels_bound(factor: int) -> int:
    """The most pixels an image or frame may be resized to: 16384 visual tokens of `factor` pixels a side."""
    return IMAGE_MAX_TOKENS * factor * factor


def number(value: float) -> int | float:
    """An option as the user wrote it: 2e8 reads 200000000, 1.5 stays 1.5."""
    return int(value) if float(value).is_integer() else value


@dataclass(frozen=True)
class MediaBudget:
    """The largest image or video a `Processor` takes; see the module docstring for the defaults."""

    max_source_pixels: int = MAX_SOURCE_PIXELS
    # None: 16384 visual tokens at the processor's factor (`for_factor`), so 12,845,056 pixels at
    # Qwen2-VL's 28 and 16,777,216 at Qwen3-VL's 32: each family's own default max_pixels
    max_resized_pixels: int | None = None
    max_video_pixels: int = MAX_VIDEO_PIXELS
    max_item_tokens: int = MAX_ITEM_TOKENS

    def for_factor(self, factor: int) -> "MediaBudget":
        """This budget for a processor whose sizes are multiples of `factor` pixels: the resize bound
        never above 16384 visual tokens of that size."""
        bound = resized_pixels_bound(factor)
        return dataclasses.replace(self, max_resized_pixels=min(self.max_resized_pixels or bound, bound))

    def check_options(self, options: MediaOptions, per: str) -> None:
        """What the options alone ask for, before the media is fetched (the one check that comes
        before `check`); `per` is "image" or "video frame"."""
        if options.min_pixels is not None and options.min_pixels > self.max_resized_pixels:
            raise InputError(f"min_pixels ({number(options.min_pixels)}) is over the limit of {self.max_resized_pixels} "
                             f"pixels per {per}", field="min_pixels")

    def check_source(self, what: str, width: int, height: int) -> None:
        """An image or video frame as sent (from its header)."""
        if width * height > self.max_source_pixels:
            raise MediaError(f"{what} is {width}x{height} = {width * height} pixels, over the limit of "
                             f"{self.max_source_pixels} pixels")

    def check(self, plan: MediaPlan) -> None:
        """Everything `plan` (sized, fitted to the context, not decoded) will decode and make: the
        media as sent, each resize, the frames held at once, the visual tokens."""
        per = "image" if isinstance(plan, ImagePlan) else "video frame"
        if isinstance(plan, FrameListPlan):
            for index, frame in enumerate(plan.frames):
                try:
                    self.check_source("the image", frame.width, frame.height)
                except MediaError as e:
                    raise MediaError(f"frame {index}: {e.cause}", field=e.field) from None
            self._check_resized(plan.frame_size, plan.source_size, plan.options, per)
            self._check_frames(plan.num_frames, plan.frame_size, plan.options, resized=True)
        else:
            height, width = plan.source_size
            self.check_source("the image" if per == "image" else "a frame of the video", width, height)
        self._check_resized(plan.size, plan.resize_from, plan.options, per)
        if isinstance(plan, VideoFilePlan):
            self._check_frames(plan.num_frames, plan.source_size, plan.options, resized=False)
        self._check_tokens(plan.part.kind, plan.num_tokens, plan.options)

    def _check_resized(self, size: tuple[int, int], source_size: tuple[int, int], options: MediaOptions,
                       per: str) -> None:
        """The (height, width) the options resize an image or each video frame to."""
        height, width = size
        if height * width <= self.max_resized_pixels:
            return
        field = _resize_field(options, height * width > source_size[0] * source_size[1])
        source = f"a {source_size[1]}x{source_size[0]} {per}"
        resize = f"{field} asks to resize {source} to" if field else f"{source} resizes to"
        raise InputError(f"{resize} {width}x{height} = {height * width} pixels, over the limit of "
                         f"{self.max_resized_pixels} pixels per {per}", field=field)

    def _check_frames(self, num_frames: int, size: tuple[int, int], options: MediaOptions, resized: bool) -> None:
        """All sampled frames of one video as held in memory: decoded from a file, or a list's frames resized."""
        height, width = size
        if num_frames * width * height > self.max_video_pixels:
            held = f"hold {num_frames} frames resized to" if resized else f"decode {num_frames} frames of"
            raise MediaError(f"the video would {held} {width}x{height}, over the limit of {self.max_video_pixels} "
                             "pixels per video; ask for fewer frames (fps, nframes)", field=_frames_field(options))

    def _check_tokens(self, kind: str, num_tokens: int, options: MediaOptions) -> None:
        if num_tokens > self.max_item_tokens:
            hint = "fewer frames (fps, nframes) or smaller frames (max_pixels)" if kind == "video" else "a smaller size (max_pixels)"
            raise MediaError(f"the {kind} would make {num_tokens} visual tokens, over the limit of {self.max_item_tokens} "
                             f"per {kind}; ask for {hint}",
                             field=_frames_field(options) if kind == "video" else _resize_field(options, False))


def _resize_field(options: MediaOptions, upscaled: bool) -> str | None:
    """The option that decides a resize's size: resized_*, else min_pixels when it enlarged, else max_pixels."""
    if options.resized_height is not None:
        return "resized_height"
    if upscaled and options.min_pixels is not None:
        return "min_pixels"
    return "max_pixels" if options.max_pixels is not None else None


def _frames_field(options: MediaOptions) -> str | None:
    for name in ("nframes", "fps", "max_frames", "min_frames"):
        if getattr(options, name) is not None:
            return name
    return None
