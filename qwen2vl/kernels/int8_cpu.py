"""Weight-only int8 matmul on the CPU (torch's int8 kernel), beside its pure-torch reference.

Layout: int8 values `q [N, K]` and one scale per output row, `W[n, k] = q[n, k] * s[n]`
(symmetric, the row's largest magnitude maps to 127). Used for the vocabulary table, whose
151936 x 1536 bfloat16 head is the largest single read of a CPU decode step: in int8 it reads
half the bytes, and torch's kernel computes it ~2.6x faster on this machine (7.8 vs 20.6 ms).
"""
from __future__ import annotations

import functools

import torch


@functools.cache
def available() -> bool:
    return hasattr(torch.ops.aten, "_weight_int8pack_mm")


def quantize_rows(weight: torch.Tensor, scale_dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """`weight [N, K]` -> (int8 values `[N, K]`, row scales `[N]` in `scale_dtype`), the values
    rounded against the scales as stored."""
    rows = weight.float()
    scales = (rows.abs().amax(1).clamp(min=1e-12) / 127).to(scale_dtype)
    values = (rows / scales.float()[:, None]).round().clamp(-127, 127).to(torch.int8)
    return values, scales


def int8_matmul(x: torch.Tensor, values: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """`x [M, K] @ W^T` in x's dtype (scales given in x's dtype)."""
    return torch.ops.aten._weight_int8pack_mm(x, values, scales)


def int8_matmul_reference(x: torch.Tensor, values: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return (x.float() @ (values.float() * scales.float()[:, None]).t()).to(x.dtype)
