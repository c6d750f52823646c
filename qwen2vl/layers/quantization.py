"""Bit packing of the AWQ GEMM and GPTQ formats: the reference dequantization (and the packing
the random checkpoint writer uses to produce such checkpoints).

All packed tensors are int32 words of `32 // bits` values. Dequantized weights are returned in
the linear weight layout, float32 `[out_features, in_features]`; `(q - z) * s` is exact in float32.
"""
from __future__ import annotations

import torch

# AWQ GEMM fills the nibbles of a word (lowest first) with columns 0, 2, 4, 6, 1, 3, 5, 7 of
# its group of 8 output columns; so column j sits in nibble AWQ_NIBBLE_OF_COLUMN[j].
AWQ_PACK_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
AWQ_NIBBLE_OF_COLUMN = tuple(AWQ_PACK_ORDER.index(j) for j in range(8))


def unpack_words(packed: torch.Tensor, bits: int, fields: tuple[int, ...] | None = None) -> torch.Tensor:
    """int32 `[..., W]` -> int32 `[..., W, 32/bits]`: value j is read from field `fields[j]`
    (bits `[f*bits, (f+1)*bits)`), by default field j."""
    shifts = _shifts(bits, fields, packed.device)
    return (packed[..., None] >> shifts).bitwise_and_((1 << bits) - 1)


def pack_words(values: torch.Tensor, bits: int, fields: tuple[int, ...] | None = None) -> torch.Tensor:
    """Inverse of `unpack_words`: `[..., W, 32/bits]` values in `[0, 2^bits)` -> int32 `[..., W]`."""
    shifts = _shifts(bits, fields, values.device)
    # The fields do not overlap, so summing is OR-ing; int32 wrap-around gives two's complement.
    return (values.to(torch.int32) << shifts).sum(-1, dtype=torch.int32)


def _shifts(bits: int, fields: tuple[int, ...] | None, device) -> torch.Tensor:
    fields = fields if fields is not None else range(32 // bits)
    return torch.tensor([f * bits for f in fields], dtype=torch.int32, device=device)


def unpack_awq(packed: torch.Tensor) -> torch.Tensor:
    """AWQ `[R, N/8]` int32 -> `[R, N]` 4-bit values in column order."""
    return unpack_words(packed, 4, AWQ_NIBBLE_OF_COLUMN).flatten(-2)


def unpack_awq_bytes(packed: torch.Tensor) -> torch.Tensor:
    """`unpack_awq` as uint8 (a quarter of its bytes, unpacked byte by byte): each int32 word's
    byte b holds nibbles 2b (low 4 bits) and 2b + 1 (a little-endian view, as CPUs and GPUs are)."""
    nibbles = packed.contiguous().view(torch.uint8)
    nibbles = torch.stack([nibbles & 15, nibbles >> 4], dim=-1).view(*packed.shape, 8)
    return nibbles[..., list(AWQ_NIBBLE_OF_COLUMN)].flatten(-2)


def pack_awq(values: torch.Tensor) -> torch.Tensor:
    """`[R, N]` 4-bit values -> AWQ `[R, N/8]` int32."""
    return pack_words(values.unflatten(-1, (-1, 8)), 4, AWQ_NIBBLE_OF_COLUMN)


def dequantize_awq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                   group_size: int) -> torch.Tensor:
    """`W[k, n] = (q[k, n] - z[k // g, n]) * s[k // g, n]`, returned as the float32 linear
    weight `W^T [N, K]` (unpacked straight into that layout: no transposing copy)."""
    shifts = _shifts(4, AWQ_NIBBLE_OF_COLUMN, qweight.device)[:, None]
    values = (qweight.t()[:, None, :] >> shifts).bitwise_and_(15).flatten(0, 1)  # [N, K]
    values = values.unflatten(1, (-1, group_size))  # [N, G, g]
    values -= unpack_awq(qzeros).t()[:, :, None]
    return values.float().mul_(scales.float().t()[:, :, None]).flatten(1)


def pack_gptq_rows(values: torch.Tensor, bits: int) -> torch.Tensor:
    """`[K, N]` values -> GPTQ qweight `[K*bits/32, N]`: word r holds rows `r*(32/bits) + i`."""
    return pack_words(values.t().unflatten(-1, (-1, 32 // bits)), bits).t().contiguous()


def unpack_gptq_zeros(qzeros: torch.Tensor, bits: int) -> torch.Tensor:
    """GPTQ qzeros `[G, N*bits/32]` -> `[G, N]` (packed along N in order)."""
    return unpack_words(qzeros, bits).flatten(-2)


def pack_gptq_zeros(values: torch.Tensor, bits: int) -> torch.Tensor:
    return pack_words(values.unflatten(-1, (-1, 32 // bits)), bits)


def dequantize_gptq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor,
                    bits: int, zero_offset: int) -> torch.Tensor:
    """`W[k, n] = (q[k, n] - (z[g_idx[k], n] + zero_offset)) * s[g_idx[k], n]`, returned as the
    float32 linear weight `W^T [N, K]`.

    `zero_offset` is 1 for the original GPTQ format (which stores zero - 1), 0 for gptq_v2.
    """
    groups = g_idx.long()
    values = unpack_words(qweight.t(), bits).flatten(1)  # [N, K]
    values -= (unpack_gptq_zeros(qzeros, bits) + zero_offset).t()[:, groups]
    return values.float().mul_(scales.float().t()[:, groups])


def quantize_rtn(weight: torch.Tensor, bits: int, group_size: int, sym: bool):
    """Round-to-nearest quantization of a float `[K, N]` weight, groups of `group_size` rows.

    Returns integer values `[K, N]`, zero points `[K/g, N]` and float16 scales `[K/g, N]` (as
    both formats store them) with `W ~= (values - zeros) * scales`. Symmetric mode uses the fixed zero `2^(bits-1)` (GPTQ sym).
    """
    max_q = 2**bits - 1
    grouped = weight.float().unflatten(0, (-1, group_size))
    if sym:
        bound = grouped.abs().amax(1)
        scales = _as_stored(2 * bound / max_q)
        zeros = torch.full_like(scales, 2 ** (bits - 1))
    else:
        low, high = grouped.amin(1).clamp(max=0), grouped.amax(1).clamp(min=0)
        scales = _as_stored((high - low) / max_q)
        zeros = (-low / scales).round().clamp(0, max_q)
    values = (grouped / scales[:, None]).round().add_(zeros[:, None]).clamp_(0, max_q)
    return values.flatten(0, 1).to(torch.int32), zeros.to(torch.int32), scales.half()


def _as_stored(scales: torch.Tensor) -> torch.Tensor:
    """Round scales to float16 first, so values are rounded against the scale that is stored."""
    return scales.clamp(min=1e-5).half().float()


# --- block-scaled FP8 (e4m3) ------------------------------------------------------------------

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_DTYPE).max  # 448


def fp8_scale_rows(output_sizes: tuple[int, ...], block_rows: int, device=None) -> torch.Tensor:
    """int32 `[sum(output_sizes)]`: the row of a fused linear's block scales that scales each output row.

    Each part's scales are stacked after the previous part's, and a part whose size is not a
    multiple of `block_rows` ends with a partial block: so row `n` of the fused weight is not
    scaled by scale row `n // block_rows` unless every part is a multiple of `block_rows`."""
    rows, first = [], 0
    for size in output_sizes:
        rows.append(first + torch.arange(size, device=device) // block_rows)
        first += -(-size // block_rows)
    return torch.cat(rows).to(torch.int32)


def dequantize_fp8_blocks(weight: torch.Tensor, scale_inv: torch.Tensor, scale_rows: torch.Tensor,
                          block_cols: int) -> torch.Tensor:
    """`W[n, k] = weight[n, k] * scale_inv[scale_rows[n], k // block_cols]`, float32 `[N, K]`: exact
    (an e4m3 value is exact in float32; one rounding, of the product). The checkpoints' name
    `weight_scale_inv` notwithstanding, the stored tensor is the scale that multiplies."""
    k = weight.shape[1]
    scales = scale_inv.float()[scale_rows.long()].repeat_interleave(block_cols, dim=1)[:, :k]
    return weight.float().mul_(scales)


def quantize_fp8_blocks(weight: torch.Tensor, block_size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """A float `[N, K]` weight -> (e4m3 `[N, K]`, float32 scales `[ceil(N/bn), ceil(K/bk)]`): each
    block's scale maps its largest magnitude to e4m3's largest (448), values round to nearest
    e4m3 (the layout of Qwen's `*-FP8` checkpoints; partial blocks at the ends)."""
    bn, bk = block_size
    n, k = weight.shape
    padded = torch.zeros(-(-n // bn) * bn, -(-k // bk) * bk)
    padded[:n, :k] = weight.float()
    blocks = padded.unflatten(0, (-1, bn)).unflatten(2, (-1, bk))  # [N/bn, bn, K/bk, bk]
    scales = (blocks.abs().amax(dim=(1, 3)) / FP8_MAX).clamp(min=torch.finfo(torch.float32).tiny)
    expanded = scales.repeat_interleave(bn, 0).repeat_interleave(bk, 1)[:n, :k]
    values = (weight.float() / expanded).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return values, scales
