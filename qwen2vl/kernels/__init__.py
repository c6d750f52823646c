"""Kernels, each beside its pure-torch reference, and the one place that says which one runs.

Layers call the functions here, never a kernel module directly. Where no kernel runs a layer
(no GPU kernel yet, a shape or format the kernel lacks), `int4_runs` says so and the layer keeps
the dequantized reference path.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from qwen2vl.kernels import int4_cpu


def int4_runs(device: torch.device, out_features: int, in_features: int, group_size: int) -> bool:
    """Whether a 4-bit weight-only linear of this shape on `device` has a packed kernel."""
    return device.type == "cpu" and int4_cpu.supported(out_features, in_features, group_size)


def pack_int4(rows: Callable[[int, int], torch.Tensor], scales: torch.Tensor, zeros: torch.Tensor,
              reuse: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """4-bit values `[N, K]` (read as `rows(start, end)`), `scales [G, N]`, integer zero points
    `[G, N]` -> the kernel's layout, written into `reuse`'s memory where it fits."""
    return int4_cpu.pack(rows, scales, zeros, reuse)


def int4_linear(x: torch.Tensor, packed: torch.Tensor, scales_and_zeros: torch.Tensor,
                group_size: int) -> torch.Tensor:
    """`x @ W^T` for a weight in the layout `pack_int4` made, in x's dtype."""
    return int4_cpu.int4_matmul(x, packed, scales_and_zeros, group_size)
