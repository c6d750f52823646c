"""Fused residual-add + RMSNorm in Triton (reference: `reference_ops.add_rms_norm_reference`).

One program per row; the input may be a matmul's unreduced split-K partial sums (one launch
fewer per matmul in a decode step). The math matches `layers.norm.RMSNorm` step by step: the residual sum is
rounded to the activation dtype (it is the residual stream the next layer adds to), statistics
are taken in float32, the normalized row is rounded before the weight multiplies it.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


def add_rms_norm(x, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """RMSNorm of `x` (of `x + residual` when given). Returns the normalized rows, and with a
    residual also `x + residual` (the new residual stream), both in x's dtype, shaped like x.

    `x` may be the unreduced `triton_awq.SplitSums` of the matmul before (o_proj, down_proj, no
    bias): the kernel adds the partial sums itself, rounds them as the reduction would, and goes on.
    """
    if isinstance(x, torch.Tensor):
        hidden, dtype, shape = x.shape[-1], x.dtype, x.shape
        parts = x.reshape(-1, hidden)[None]
        if parts.stride(-1) != 1:
            parts = parts.contiguous()
    else:
        if x.bias is not None:
            raise ValueError("add_rms_norm sums partials of matmuls without bias only")
        parts, dtype = x.partials, x.dtype
        hidden, shape = parts.shape[-1], parts.shape[1:]
    rows = parts.shape[1]
    out = torch.empty(rows, hidden, device=parts.device, dtype=dtype)
    summed = torch.empty_like(out) if residual is not None else out
    residual_rows = residual.reshape(-1, hidden) if residual is not None else out
    block = triton.next_power_of_2(hidden)
    _add_rms_norm_kernel[(rows,)](
        parts, residual_rows, weight, out, summed, parts.stride(0), parts.stride(1), parts.shape[0],
        residual_rows.stride(0), hidden, eps,
        HAS_RESIDUAL=residual is not None, BLOCK=block, num_warps=min(16, max(4, block // 256)),
    )
    out = out.view(shape)
    return out if residual is None else (out, summed.view(shape))


@triton.jit
def _add_rms_norm_kernel(x_ptr, residual_ptr, weight_ptr, out_ptr, summed_ptr, stride_part, stride_x, num_parts,
                         stride_r, hidden, eps, HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    dtype = out_ptr.dtype.element_ty
    total = tl.zeros((BLOCK,), tl.float32)
    for part in range(num_parts):  # one part: the activations themselves, exactly
        total += tl.load(x_ptr + part * stride_part + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    x = total.to(dtype)
    if HAS_RESIDUAL:
        x = (x.to(tl.float32) + tl.load(residual_ptr + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)).to(dtype)
        tl.store(summed_ptr + row * hidden + cols, x, mask=mask)
    x32 = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x32 * x32, 0) / hidden + eps)
    normed = (x32 * rstd).to(dtype)
    weight = tl.load(weight_ptr + cols, mask=mask, other=0.0)
    tl.store(out_ptr + row * hidden + cols, (weight.to(tl.float32) * normed.to(tl.float32)).to(dtype), mask=mask)
