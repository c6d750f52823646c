"""The experts of a mixture-of-experts MLP in Triton: one grouped GEMM over rows sorted by expert.

`grouped_matmul(a, weight, offsets, rows)` computes row `p` of the output as
`a[rows[p]] @ weight[e]^T` for the expert `e` with `offsets[e] <= p < offsets[e + 1]` (rows None:
`a[p]`); reference `layers.moe.grouped_matmul`. One launch covers every expert: each program takes
a tile of one expert's rows, so no host loop over experts and no host sync (a decode step stays
capturable in a CUDA graph). Which tile is whose is worked out on the device: each expert's rows
are cut into tiles of `BLOCK_M`; the grid has room for the most tiles any routing can need
(`cdiv(P, BLOCK_M) + E`), and programs past the last tile return at once.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


def grouped_matmul(a: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor,
                   rows: torch.Tensor | None = None) -> torch.Tensor:
    """`[P, N]` in a's dtype: for each expert `e`, output rows `offsets[e]:offsets[e + 1]` are
    `a[rows[p]]` (or `a[p]`) times `weight[e]^T`; `weight [E, N, K]`, `offsets [E + 1]` (int64,
    `offsets[E] = P`), `rows [P]`."""
    num_experts, n, k = weight.shape
    num_rows = rows.shape[0] if rows is not None else a.shape[0]
    if a.stride(-1) != 1:
        a = a.contiguous()
    out = torch.empty(num_rows, n, device=a.device, dtype=a.dtype)
    if num_rows == 0:
        return out
    block_m = 16 if num_rows <= 16 * num_experts else 64
    block_n, block_k = 64, 32
    tile_expert, tile_first_row = _tiles(offsets, num_rows, block_m)
    grid = (tile_expert.shape[0], triton.cdiv(n, block_n))
    _grouped_matmul_kernel[grid](
        a, weight, out, offsets, tile_expert, tile_first_row, a if rows is None else rows,
        n, k, a.stride(0), num_experts,
        GATHER=rows is not None, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4)
    return out


def _tiles(offsets: torch.Tensor, num_rows: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(expert of each tile, its first row) for tiles of `block_m` rows of one expert each;
    tiles past the last have expert E. Computed on the device without a sync."""
    num_experts = offsets.shape[0] - 1
    counts = offsets[1:] - offsets[:-1]
    tiles_per_expert = (counts + block_m - 1) // block_m
    tile_ends = tiles_per_expert.cumsum(0)
    tile = torch.arange(triton.cdiv(num_rows, block_m) + num_experts, device=offsets.device)
    expert = torch.searchsorted(tile_ends, tile, right=True)
    first_tile = (tile_ends - tiles_per_expert)[expert.clamp(max=num_experts - 1)]
    first_row = offsets[:-1][expert.clamp(max=num_experts - 1)] + (tile - first_tile) * block_m
    return expert.to(torch.int32), first_row


@triton.jit
def _grouped_matmul_kernel(a_ptr, w_ptr, out_ptr, offsets_ptr, tile_expert_ptr, tile_first_row_ptr, rows_ptr,
                           N, K, stride_am, num_experts,
                           GATHER: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                           BLOCK_K: tl.constexpr):
    tile, pid_n = tl.program_id(0), tl.program_id(1)
    expert = tl.load(tile_expert_ptr + tile)
    if expert >= num_experts:
        return
    end = tl.load(offsets_ptr + expert + 1)
    offs_m = tl.load(tile_first_row_ptr + tile) + tl.arange(0, BLOCK_M)
    mask_m = offs_m < end
    if GATHER:
        a_rows = tl.load(rows_ptr + offs_m, mask=mask_m, other=0)
    else:
        a_rows = offs_m
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    a_tile = a_ptr + a_rows.to(tl.int64)[:, None] * stride_am + offs_k[None, :]
    w_tile = w_ptr + expert.to(tl.int64) * N * K + offs_n[:, None] * K + offs_k[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        mask_k = (k0 + offs_k < K)[None, :]
        a = tl.load(a_tile + k0, mask=mask_m[:, None] & mask_k, other=0.0)
        w = tl.load(w_tile + k0, mask=mask_n[:, None] & mask_k, other=0.0)
        acc = tl.dot(a, tl.trans(w), acc)
    tl.store(out_ptr + offs_m.to(tl.int64)[:, None] * N + offs_n[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=mask_m[:, None] & mask_n[None, :])
