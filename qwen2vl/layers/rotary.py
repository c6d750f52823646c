"""Rotary position embeddings: M-RoPE for the text decoder, 2D (h, w) rotary for the vision tower.

Both rotate the two halves of each head (the "rotate half" convention of the checkpoints).
Angles are computed in float32; frequencies are derived on the fly (a few dozen values), so the
modules hold no buffers and need no re-initialisation after loading weights onto a device.
"""
from __future__ import annotations

import itertools

import torch

from qwen2vl import kernels


def inverse_frequencies(rotary_dim: int, theta: float, device) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32, device=device) / rotary_dim))


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x `[N, heads, head_dim]`; cos/sin `[N, head_dim]` in x's dtype."""
    return x * cos[:, None] + rotate_half(x) * sin[:, None]


def apply_rotary_qk(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`apply_rotary` on q `[N, heads, head_dim]` and k `[N, kv_heads, head_dim]`; on the GPU in
    place, one launch for both (they may be views of the fused qkv projection's output)."""
    if kernels.triton_runs(q):
        kernels.rotary_qk_(q, k, cos, sin)
        return q, k
    return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)


def mrope_band_axes(mrope_section: tuple[int, ...], interleaved: bool, device=None) -> torch.Tensor:
    """The M-RoPE axis (0 temporal, 1 height, 2 width) of each of a head's `sum(mrope_section)`
    frequency bands. Chunked (Qwen2-VL): the first `mrope_section[0]` bands follow T, the next
    `mrope_section[1]` H, the rest W. Interleaved (Qwen3-VL): band j follows H where j % 3 == 1 and
    j < 3 * mrope_section[1], W where j % 3 == 2 and j < 3 * mrope_section[2], else T, so that
    every axis gets low and high frequencies alike."""
    # Built on the device from plain numbers, without a host copy or a size only the device
    # knows, so a CUDA graph can capture it.
    band = torch.arange(sum(mrope_section), device=device)
    if not interleaved:
        return sum((band >= edge for edge in itertools.accumulate(mrope_section[:-1])), torch.zeros_like(band))
    axes = torch.zeros_like(band)
    for axis in (1, 2):
        axes = torch.where((band % 3 == axis) & (band < 3 * mrope_section[axis]), axis, axes)
    return axes


class MRotaryEmbedding:
    """Multimodal RoPE: each frequency band of a head turns with the position on one axis
    (temporal, height, width) of `positions[3, N]`; `mrope_section` counts the bands of each
    axis, `interleaved` says how they are laid out (`mrope_band_axes`)."""

    def __init__(self, head_dim: int, theta: float, mrope_section: tuple[int, ...], interleaved: bool = False):
        self.head_dim = head_dim
        self.theta = theta
        self.mrope_section = tuple(mrope_section)
        self.interleaved = interleaved

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions `[3, N]` -> cos, sin `[N, head_dim]`, computed once per forward."""
        device = positions.device
        axis_of_band = mrope_band_axes(self.mrope_section, self.interleaved, device)
        angles = positions[axis_of_band].T.float() * inverse_frequencies(self.head_dim, self.theta, device)
        angles = torch.cat((angles, angles), dim=-1)
        return angles.cos().to(dtype), angles.sin().to(dtype)


class VisionRotaryEmbedding:
    """Half of each head's bands follow the patch row, the other half the patch column."""

    def __init__(self, head_dim: int, theta: float):
        self.head_dim = head_dim
        self.theta = theta

    def cos_sin(self, rows_cols: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """rows_cols `[P, 2]` -> float32 cos, sin `[P, head_dim]`."""
        inv_freq = inverse_frequencies(self.head_dim // 2, self.theta, rows_cols.device)
        angles = (rows_cols[:, :, None].float() * inv_freq).flatten(1)
        angles = torch.cat((angles, angles), dim=-1)
        return angles.cos(), angles.sin()
