"""4-bit weight-only matmul on the CPU (torch's int4 kernel); its pure-torch reference, which the
tests check it against, is `int4_matmul_reference` in tests/reference_ops.py.

Layout: the 4-bit values `q [N, K]` of a linear weight, packed by
`aten._convert_weight_to_int4pack_for_cpu`, and `scales_and_zeros [K/g, N, 2]` with
`W[n, k] = (q[n, k] - 8) * s[k // g, n] + z'[k // g, n]`. A checkpoint's integer zero point z
(`W = (q - z) * s`) maps to `z' = (8 - z) * s`.

The kernel takes activations, scales and offsets in one dtype. It is fast in bfloat16 and about
50x slower in float32 (slower than a dense float32 matmul), so `KERNEL_DTYPE` is bfloat16 and
activations of other dtypes are cast around the call.
"""
from __future__ import annotations

import functools
from collections.abc import Callable

import torch

KERNEL_DTYPE = torch.bfloat16
# What the kernel accepts: N a multiple of 16, K a multiple of the group size, these group sizes.
GROUP_SIZES = (32, 64, 128, 256)
N_MULTIPLE = 16
PACK_BLOCK_ROWS = 256  # a multiple of the 64-row tiles the kernel packs independently
PACK_COLUMN_ROWS = 2048  # the same for uint8 values, an eighth of int32 rows' bytes
# The layout packs rows in tiles of 64: byte [k, j] of a tile holds rows j (low nibble) and j + 32.
TILE_ROWS = 64
# From this many rows on (prefill), the weight unpacked to bfloat16 and one dense product beat
# the kernel, whose rate stays ~300 GFLOP/s whatever the rows while a bfloat16 matmul reaches
# 650-740 from 64 rows on; the unpack costs ~60 ms per 27.5 M weights. 2-core EPYC, the 2B
# model's gate_up: 1296 rows 216 -> ~154 ms, break-even near 650 rows.
DEQUANTIZE_MIN_ROWS = 1024


def supported(out_features: int, in_features: int, group_size: int) -> bool:
    """Whether the kernel can run this shape (and exists in this torch build)."""
    return (available() and group_size in GROUP_SIZES and out_features % N_MULTIPLE == 0
            and in_features % group_size == 0)


@functools.cache
def available() -> bool:
    ops = torch.ops.aten
    return hasattr(ops, "_convert_weight_to_int4pack_for_cpu") and hasattr(ops, "_weight_int4pack_mm_for_cpu")


def pack(rows: Callable[[int, int], torch.Tensor], scales: torch.Tensor, zeros: torch.Tensor,
         reuse: torch.Tensor | None = None,
         columns: Callable[[int, int], torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """4-bit values in [0, 16), read as `rows(start, end) -> [end - start, K]`, float `scales
    [G, N]`, integer zero points `zeros [G, N]` (`W = (values - zeros) * scales`) -> (packed
    weight, `scales_and_zeros [G, N, 2]`).

    The values are read a block of rows at a time, so no int32 copy of a whole large projection
    exists (the kernel packs tiles of 64 rows independently, so blocks are multiples of 64).
    `reuse`: a contiguous tensor of the packed weight's byte count (the checkpoint's packed
    tensor), overwritten with the result once every row is read: converting a model then
    allocates no second copy of its weights, and leaves no freed holes in the heap.
    `columns(start, end) -> uint8 [K, end - start]`: the same values by input row, where the
    source has them so; the layout is then written from them directly (`pack_columns`, several
    times faster than int32 rows through torch's converter), where this CPU's layout is the one
    it writes. In blocks too: whole projections at once left ~3x the heap growth behind.
    """
    convert = torch.ops.aten._convert_weight_to_int4pack_for_cpu
    n = scales.shape[1]
    if columns is not None and n % TILE_ROWS == 0 and converter_writes_64_row_tiles():
        blocks = [pack_columns(columns(start, min(start + PACK_COLUMN_ROWS, n)))
                  for start in range(0, n, PACK_COLUMN_ROWS)]
    else:
        blocks = [convert(rows(start, min(start + PACK_BLOCK_ROWS, n)).to(torch.int32).contiguous(), 1)
                  for start in range(0, n, PACK_BLOCK_ROWS)]
    packed_shape = (n, blocks[0].shape[1])
    if reuse is None or reuse.numel() * reuse.element_size() != packed_shape[0] * packed_shape[1]:
        packed = torch.cat(blocks)
    else:
        packed = torch.cat(blocks, out=reuse.view(torch.uint8).view(packed_shape))
    scales = scales.float()
    offsets = (8 - zeros.float()) * scales
    return packed, torch.stack([scales, offsets], dim=-1).to(KERNEL_DTYPE).contiguous()


def pack_columns(values: torch.Tensor) -> torch.Tensor:
    """4-bit values `[K, N]` (uint8, N a multiple of `TILE_ROWS`) -> the packed weight `[N, K/2]`
    as torch's converter writes it on AVX-512 CPUs: per tile of 64 output rows, for each k, 32
    bytes, byte j holding row j (low nibble) and row j + 32 (high)."""
    k, n = values.shape
    tiles = values.view(k, n // TILE_ROWS, 2, TILE_ROWS // 2)
    packed = tiles[:, :, 0] | (tiles[:, :, 1] << 4)  # [K, tiles, 32]
    return packed.permute(1, 0, 2).reshape(n, k // 2)


@functools.cache
def converter_writes_64_row_tiles() -> bool:
    """Whether torch's converter writes `pack_columns`' layout on this CPU, the one
    `dequantize_packed` reads: it tiles by the CPU's vector width (tiles of 32 rows, another
    layout, on AVX2 builds), checked once on random values."""
    values = torch.randint(0, 16, (2 * TILE_ROWS, 128), generator=torch.Generator().manual_seed(0), dtype=torch.int32)
    expected = torch.ops.aten._convert_weight_to_int4pack_for_cpu(values, 1)
    return torch.equal(pack_columns(values.t().to(torch.uint8).contiguous()), expected)


def int4_matmul(x: torch.Tensor, packed: torch.Tensor, scales_and_zeros: torch.Tensor,
                group_size: int) -> torch.Tensor:
    """`x [..., K] @ W^T` through the kernel (from `DEQUANTIZE_MIN_ROWS` rows on, the unpacked
    bfloat16 weight and a dense product, where this CPU has the 64-row tiles it reads), returned in
    x's dtype."""
    flat = x.reshape(-1, x.shape[-1]).to(KERNEL_DTYPE)
    if flat.shape[0] >= DEQUANTIZE_MIN_ROWS and packed.shape[0] % TILE_ROWS == 0 and converter_writes_64_row_tiles():
        y = flat @ dequantize_packed(packed, scales_and_zeros, group_size)
    else:
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, packed, group_size, scales_and_zeros)
    return y.to(x.dtype).unflatten(0, x.shape[:-1])


def dequantize_packed(packed: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """`W^T [K, N]` in bfloat16 straight from the packed layout (N a multiple of `TILE_ROWS`, where
    `converter_writes_64_row_tiles`):
    `dequantize`'s float32 weight rounded once (`addcmul` computes in float32, where
    `(q - 8) * s + z'` is exact)."""
    n, k = packed.shape[0], packed.shape[1] * 2
    tiles = packed.view(torch.uint8).view(n // TILE_ROWS, k, TILE_ROWS // 2)
    values = torch.stack([tiles & 0xF, tiles >> 4], dim=2).permute(1, 0, 2, 3).reshape(k // group_size, group_size, n)
    scales, offsets = scales_and_zeros.unbind(-1)  # [G, N]
    return torch.addcmul(offsets[:, None, :], values.view(torch.int8).sub_(8), scales[:, None, :]).view(k, n)
