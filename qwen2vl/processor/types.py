"""The processor's data: the per-item options a content part carries, and what the processor hands
to the engine (one conversation, ready to run)."""
from __future__ import annotations

import functools
import hashlib
import math
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING

import torch

from qwen2vl.errors import InputError
from qwen2vl.layers.patchify import Patchifier

if TYPE_CHECKING:
    from PIL import Image

    from qwen2vl.processor.chat import MediaPart
    from qwen2vl.processor.fetch import MediaSource
    from qwen2vl.processor.video import VideoProbe


@dataclass(frozen=True)
class MediaOptions:
    """The per-item settings a content part may carry (model card format), parsed once."""

    min_pixels: float | None = None
    max_pixels: float | None = None
    resized_height: float | None = None
    resized_width: float | None = None
    total_pixels: float | None = None
    fps: float | None = None
    nframes: float | None = None
    min_frames: float | None = None
    max_frames: float | None = None
    sample_fps: float | None = None
    raw_fps: float | None = None  # a frame list's frame rate in its timestamps (qwen_vl_utils': default sample_fps)

    @classmethod
    def from_part(cls, part: dict) -> "MediaOptions":
        values = {}
        for f in fields(cls):
            value = part.get(f.name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or math.isinf(value):
                raise InputError(f"{f.name} must be a positive number, got {value!r}", field=f.name)
            values[f.name] = value
        options = cls(**values)
        if (options.resized_height is None) != (options.resized_width is None):
            missing = "resized_width" if options.resized_width is None else "resized_height"
            raise InputError("resized_height and resized_width must be given together", field=missing)
        if options.fps is not None and options.nframes is not None:
            raise InputError("give either fps or nframes for a video, not both", field="nframes")
        if options.min_pixels is not None and options.max_pixels is not None and options.min_pixels > options.max_pixels:
            raise InputError(f"min_pixels ({options.min_pixels}) is greater than max_pixels ({options.max_pixels})",
                             field="min_pixels")
        return options


@dataclass(frozen=True)
class MediaPlan:
    """One image or video sized from its header and options; nothing decoded yet.

    The processor makes one per content part (`ImagePlan`, `FrameListPlan` or `VideoFilePlan`),
    `fit_context` may size it again under other options, `MediaBudget.check` checks it, and only
    then is it decoded. Sizes are (height, width).
    """

    part: MediaPart
    options: MediaOptions  # the part's own, or what `fit_context` chose for it
    num_frames: int = 0  # frames sampled (1 for an image)
    size: tuple[int, int] = (0, 0)  # the per-item resize (of each frame, for a video)
    num_tokens: int = 0

    @property
    def source_size(self) -> tuple[int, int]:
        """The image, or a video's (first) frame, as sent."""
        raise NotImplementedError

    @property
    def resize_from(self) -> tuple[int, int]:
        """What the per-item resize starts from: the media as sent, or a frame list's first resize."""
        return self.source_size


@dataclass(frozen=True)
class ImagePlan(MediaPlan):
    image: Image.Image = field(kw_only=True)  # opened lazily: its header read, no pixel decoded

    @property
    def source_size(self) -> tuple[int, int]:
        return self.image.height, self.image.width


@dataclass(frozen=True)
class FrameListPlan(MediaPlan):
    """A video sent as a list of frames: each resized as an image first (to `frame_size`), then as
    a video frame (to `size`)."""

    frames: list[Image.Image] = field(kw_only=True)  # each opened lazily
    frame_size: tuple[int, int] = field(kw_only=True)  # their first resize, as images

    @property
    def source_size(self) -> tuple[int, int]:
        return self.frames[0].height, self.frames[0].width

    @property
    def resize_from(self) -> tuple[int, int]:
        return self.frame_size


@dataclass(frozen=True)
class VideoFilePlan(MediaPlan):
    source: MediaSource = field(kw_only=True)
    probe: VideoProbe = field(kw_only=True)  # what the container says

    @property
    def source_size(self) -> tuple[int, int]:
        return self.probe.height, self.probe.width


@dataclass
class VisionItem:
    """One image or video of a prompt, resized, not yet normalized.

    `pixels` is `[T, 3, H, W]` as resized, 0..255: uint8, except a video whose frames the
    processor's own limits resized a second time (float32, as the reference keeps them). One
    still image has T = 1. `patchifier` turns them into the vision tower's rows where the tower
    runs (`qwen2vl.layers.patchify`); `grid_thw` is `(t, h, w)` in patches. The vision tower
    treats images and videos alike, so items of both kinds can be encoded in one packed call, in
    prompt order.
    """

    kind: str  # "image" | "video"
    pixels: torch.Tensor
    grid_thw: tuple[int, int, int]
    original_size: tuple[int, int]  # (width, height) of the source image or first frame
    resized_size: tuple[int, int]  # (width, height) after smart_resize
    fps: float | None = None  # sampled frames per second, videos only
    patchifier: Patchifier = field(default_factory=Patchifier)
    timestamps: tuple[float, ...] = ()  # videos: seconds into the video of each temporal patch

    @property
    def pixel_values(self) -> torch.Tensor:
        """The reference's `pixel_values` rows of this item: `[t*h*w, 3*temporal*patch*patch]` float32."""
        return self.patchifier([self.pixels], torch.float32)

    @functools.cached_property
    def digest(self) -> bytes:
        """Identifies the item by its resized pixels, their normalization, grid, kind and frame rate (BLAKE2b)."""
        h = hashlib.blake2b(digest_size=32)
        h.update(f"{self.kind} {self.grid_thw} {self.fps} {self.pixels.dtype} {tuple(self.pixels.shape)} "
                 f"{self.patchifier} ".encode())
        h.update(self.pixels.contiguous().numpy().data)
        return h.digest()

    def num_tokens(self, merge_size: int) -> int:
        t, h, w = self.grid_thw
        return t * h * w // (merge_size * merge_size)


@dataclass
class PreparedPrompt:
    """A tokenized conversation with its vision inputs and M-RoPE positions.

    `vision_items` are in the order their pad spans appear in `input_ids`; the rows of their
    encoded embeddings, concatenated, fill the pad tokens of `input_ids` in order.
    """

    input_ids: list[int]
    positions: torch.Tensor  # [3, len(input_ids)] int64
    rope_delta: int  # decode position of token i after the prompt is len(prompt) + i + rope_delta
    vision_items: list[VisionItem] = field(default_factory=list)
    text: str = ""  # the rendered template, before pad expansion

    def __len__(self) -> int:
        return len(self.input_ids)
