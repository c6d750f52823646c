"""Pixels to the vision tower's input rows: normalize and cut into patches, once, where the tower runs.

The processor hands over frames as it resized them (uint8, 0..255): a quarter of float32's bytes
to move to the device, and no float copy of every pixel on the host. `Patchifier` turns them into
`[t*h*w, 3*temporal*patch*patch]` rows in the tower's dtype: one multiply-add with the rescale,
mean and std folded together, in float32, then one strided copy into the rows (a still image's
temporal repeat is an `expand`, a view). On the CPU in float32 it gives the reference's
`pixel_values` (transformers' `Qwen2VLImageProcessor`) to within float32 rounding.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class Patchifier:
    """How frames become patch rows; the defaults are Qwen2-VL's preprocessor config."""

    patch_size: int = 14
    merge_size: int = 2
    temporal_patch_size: int = 2
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD
    rescale_factor: float = 1 / 255

    @property
    def factor(self) -> int:
        """Image sides are multiples of this: one merged token covers factor x factor pixels."""
        return self.patch_size * self.merge_size

    @property
    def patch_dim(self) -> int:
        return 3 * self.temporal_patch_size * self.patch_size * self.patch_size

    def grid(self, frames: torch.Tensor) -> tuple[int, int, int]:
        """(t, h, w) in patches of `[T, 3, H, W]` frames."""
        if frames.dim() != 4 or frames.shape[1] != 3:
            raise ValueError(f"frames must be [T, 3, H, W], got {list(frames.shape)}")
        num_frames, _, height, width = frames.shape
        if num_frames != 1 and num_frames % self.temporal_patch_size:
            raise ValueError(f"{num_frames} frames: a video needs a multiple of {self.temporal_patch_size}")
        if height % self.factor or width % self.factor:
            raise ValueError(f"a {width}x{height} frame is not in multiples of {self.factor} pixels")
        return -(-num_frames // self.temporal_patch_size), height // self.patch_size, width // self.patch_size

    def __call__(self, frames: Sequence[torch.Tensor], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Items' `[T, 3, H, W]` frames (0..255, any dtype, all on one device) -> their rows, packed in order.

        Rows are ordered so each `merge x merge` window of patches is contiguous: the vision tower
        merges rows 4 at a time. A still image (T = 1) is its frame `temporal_patch_size` times.
        """
        grids = [self.grid(f) for f in frames]
        device = frames[0].device
        rows = torch.empty(sum(t * h * w for t, h, w in grids), self.patch_dim, dtype=dtype, device=device)
        scale, shift = self._affine(device)
        start = 0
        for item, (t, h, w) in zip(frames, grids):
            end = start + t * h * w
            self._write(item.to(torch.float32, copy=True).mul_(scale).add_(shift), rows[start:end], (t, h, w))
            start = end
        return rows

    def _write(self, pixels: torch.Tensor, rows: torch.Tensor, grid: tuple[int, int, int]) -> None:
        p, m, tp = self.patch_size, self.merge_size, self.temporal_patch_size
        t, h, w = grid
        if pixels.shape[0] == 1:
            pixels = pixels.expand(tp, -1, -1, -1)
        cubes = pixels.view(t, tp, 3, h // m, m, p, w // m, m, p).permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
        rows.view(t, h // m, w // m, m, m, 3, tp, p, p).copy_(cubes)

    def _affine(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(x - 255 mean) / (255 std) as x * scale + shift, per channel, float32 `[3, 1, 1]`."""
        std = torch.tensor(self.image_std, dtype=torch.float64) / self.rescale_factor
        mean = torch.tensor(self.image_mean, dtype=torch.float64) / self.rescale_factor
        scale, shift = (1 / std).float(), (-mean / std).float()
        return scale.view(3, 1, 1).to(device), shift.view(3, 1, 1).to(device)


@dataclass(frozen=True)
class VisionPixels:
    """The frames of a batch's images and videos, in prompt order, as the processor made them, and how
    they become patch rows; what `encode_vision` takes when the patchify is left to it."""

    frames: list[torch.Tensor]
    patchifier: Patchifier

    def to(self, device: torch.device, non_blocking: bool = False) -> "VisionPixels":
        moved = [f.pin_memory().to(device, non_blocking=True) if non_blocking else f.to(device) for f in self.frames]
        return VisionPixels(moved, self.patchifier)


def patch_rows(pixel_values: torch.Tensor | VisionPixels, dtype: torch.dtype) -> torch.Tensor:
    """The vision tower's input rows in `dtype`: `VisionPixels` patchified here, or rows already
    patchified (transformers' `pixel_values`) as they are."""
    if isinstance(pixel_values, VisionPixels):
        return pixel_values.patchifier(pixel_values.frames, dtype)
    return pixel_values.to(dtype)
