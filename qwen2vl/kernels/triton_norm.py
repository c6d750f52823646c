"""Fused residual-add + RMSNorm in Triton (reference: `add_rms_norm_reference` in tests/reference_ops.py).

One program per row. The math matches `layers.norm.RMSNorm` step by step: the residual sum is
rounded to the activation dtype (it is the residual stream the next layer adds to), statistics
are taken in float32, the normalized row is rounded before the weight multiplies it.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


def add_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """RMSNorm of `x` (of `x + residual` when given). Returns the normalized rows, and with a
    residual also `x + residual` (the new residual stream), both in x's dtype, shaped like x."""
    hidden = x.shape[-1]
    rows = x.reshape(-1, hidden)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    out = torch.empty(rows.shape, device=x.device, dtype=x.dtype)
    summed = torch.empty_like(out) if residual is not None else out
    residual_rows = residual.reshape(-1, hidden) if residual is not None else out
    block = triton.next_power_of_2(hidden)
    _add_rms_norm_kernel[(rows.shape[0],)](
        rows, residual_rows, weight, out, summed, rows.stride(0), residual_rows.stride(0), hidden, eps,
        HAS_RESIDUAL=residual is not None, BLOCK=block, num_warps=min(16, max(4, block // 256)),
    )
    out = out.view(x.shape)
    return out if residual is None else (out, summed.view(x.shape))


@triton.jit
def _add_rms_norm_kernel(x_ptr, residual_ptr, weight_ptr, out_ptr, summed_ptr, stride_x, stride_r, hidden, eps,
                         HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    dtype = out_ptr.dtype.element_ty
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        x = (x.to(tl.float32) + tl.load(residual_ptr + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)).to(dtype)
        tl.store(summed_ptr + row * hidden + cols, x, mask=mask)
    x32 = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x32 * x32, 0) / hidden + eps)
    normed = (x32 * rstd).to(dtype)
    weight = tl.load(weight_ptr + cols, mask=mask, other=0.0)
    tl.store(out_ptr + row * hidden + cols, (weight.to(tl.float32) * normed.to(tl.float32)).to(dtype), mask=mask)
