"""What the processor hands to the engine: one conversation, ready to run."""
from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass, field

import torch


@dataclass
class VisionItem:
    """One image or video of a prompt, patchified.

    `pixel_values` is `[t*h*w, 3*temporal_patch*patch*patch]` float32 in the reference's patch
    order; `grid_thw` is `(t, h, w)` in patches. The vision tower treats images and videos alike,
    so items of both kinds can be encoded in one packed call, in prompt order.
    """

    kind: str  # "image" | "video"
    pixel_values: torch.Tensor
    grid_thw: tuple[int, int, int]
    original_size: tuple[int, int]  # (width, height) of the source image or first frame
    resized_size: tuple[int, int]  # (width, height) after smart_resize
    fps: float | None = None  # sampled frames per second, videos only

    @functools.cached_property
    def digest(self) -> bytes:
        """Identifies the item by its processed pixels, grid, kind and frame rate (BLAKE2b)."""
        h = hashlib.blake2b(digest_size=32)
        h.update(f"{self.kind} {self.grid_thw} {self.fps} {self.pixel_values.dtype} ".encode())
        h.update(self.pixel_values.contiguous().numpy().data)
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
