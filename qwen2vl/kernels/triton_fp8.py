"""Block-scaled FP8 weights times fp16/bf16 activations in Triton (Qwen's `*-FP8` checkpoints).

Weight-only: each weight tile is read as e4m3 (one byte a weight, half of bfloat16's reads),
multiplied by its block's float32 scale and rounded to x's dtype — bitwise the weight that the
dequantized path (`FP8Linear.dequantize_`) holds — then multiplied on the tensor cores with
float32 sums. Activations are not quantized, so the result is the dequantized path's up to the
order of the sums. Reference: `tests/reference_ops.fp8_block_matmul_reference`.

Scales are gathered per output column through `scale_rows` (the scale row of each output row),
so fused projections whose parts are not multiples of the block height need no special case.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


def fp8_block_matmul(x: torch.Tensor, weight: torch.Tensor, scale_inv: torch.Tensor, scale_rows: torch.Tensor,
                     block_cols: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`x [..., K] @ W^T + bias` -> `[..., N]` in x's dtype, for `W[n, k] = weight[n, k] *
    scale_inv[scale_rows[n], k // block_cols]` (weight e4m3 `[N, K]`, scale_inv float32)."""
    n, k = weight.shape
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    out = torch.empty(m, n, device=x.device, dtype=x.dtype)
    block_m = 16 if m <= 16 else 64
    block_n = 32 if m <= 16 else 64  # decode: more programs over N
    block_k = 64
    _fp8_block_matmul_kernel[(triton.cdiv(m, block_m), triton.cdiv(n, block_n))](
        x2, weight, scale_inv, scale_rows, bias if bias is not None else out, out,
        m, n, k, x2.stride(0), scale_inv.stride(0), block_cols,
        HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4)
    return out.reshape(*lead, n)


@triton.jit
def _fp8_block_matmul_kernel(x_ptr, w_ptr, scale_ptr, scale_rows_ptr, bias_ptr, out_ptr, M, N, K, stride_xm,
                             stride_scale, block_cols, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr,
                             BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m, mask_n = offs_m < M, offs_n < N
    scale_row = tl.load(scale_rows_ptr + offs_n, mask=mask_n, other=0)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + offs_k
        mask_k = cols < K
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + cols[None, :], mask=mask_m[:, None] & mask_k[None, :],
                    other=0.0)
        w_mask = mask_k[:, None] & mask_n[None, :]
        w = tl.load(w_ptr + offs_n[None, :] * K + cols[:, None], mask=w_mask, other=0.0)  # [BLOCK_K, BLOCK_N]
        scale = tl.load(scale_ptr + scale_row[None, :] * stride_scale + (cols // block_cols)[:, None], mask=w_mask,
                        other=0.0)
        acc = tl.dot(x, (w.to(tl.float32) * scale).to(x.dtype), acc)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + offs_m[:, None] * N + offs_n[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=mask_m[:, None] & mask_n[None, :])
