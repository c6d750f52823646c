"""Weight-only int8 matmul in Triton: the vocabulary table's logits on the GPU.

Layout as on the CPU (`int8_cpu`): int8 values `q [N, K]`, one scale per output row,
`W[n, k] = q[n, k] * s[n]`; reference `int8_cpu.int8_matmul_reference`. The head of the 2B model
is 151936 x 1536: 467 MB in bfloat16, 233 MB in int8, read once per decode step.

One row (batch-1 decode) multiplies on the CUDA cores: `q` becomes a float without a conversion
instruction (`2^23 + (q + 128)` has `q + 128` in its mantissa bits; the SM's conversion units are
slow enough to bound a kernel that converts every weight), `x q` is exact in float32, and the
row's sum is scaled once. More rows go through a tensor-core dot (int8 values are exact in
float16 and bfloat16).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


def int8_matmul(x: torch.Tensor, values: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """`x [M, K] @ W^T` -> `[M, N]` in x's dtype (float16 or bfloat16)."""
    m, k = x.shape
    n = values.shape[0]
    if x.stride(-1) != 1:
        x = x.contiguous()
    out = torch.empty(m, n, device=x.device, dtype=x.dtype)
    block_m, block_n, block_k = (1, 32, 256) if m == 1 else (16 if m <= 16 else 64, 128, 64)
    _int8_matmul_kernel[(triton.cdiv(m, block_m), triton.cdiv(n, block_n))](
        x, values, scales, out, m, n, k, x.stride(0),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4)
    return out


@triton.jit
def _int8_matmul_kernel(x_ptr, values_ptr, scales_ptr, out_ptr, M, N, K, stride_xm,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m, mask_n = offs_m < M, offs_n < N
    rows = values_ptr + offs_n[:, None] * K + offs_k[None, :]
    if BLOCK_M == 1:
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        mask_k = (k0 + offs_k < K)[None, :]
        q = tl.load(rows + k0, mask=mask_n[:, None] & mask_k, other=0)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + (k0 + offs_k)[None, :], mask=mask_m[:, None] & mask_k,
                    other=0.0)
        if BLOCK_M == 1:
            offset = (q.to(tl.uint8, bitcast=True).to(tl.int32) ^ 0x4B000080).to(tl.float32, bitcast=True)
            acc += (offset - 8388736.0) * x.to(tl.float32)  # 8388736 = 2^23 + 128
        else:
            acc = tl.dot(x, tl.trans(q.to(x.dtype)), acc)
    scale = tl.load(scales_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    if BLOCK_M == 1:
        out = (tl.sum(acc, axis=1) * scale)[None, :]
    else:
        out = acc * scale[None, :]
    tl.store(out_ptr + offs_m[:, None] * N + offs_n[None, :], out.to(out_ptr.dtype.element_ty),
             mask=mask_m[:, None] & mask_n[None, :])
