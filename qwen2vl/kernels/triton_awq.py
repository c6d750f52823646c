"""W4A16 matmul in Triton, reading the AWQ GEMM layout as the checkpoint stores it.

Layout (no repack for AWQ; GPTQ and any other 4-bit source are packed into it once by `pack`):
`qweight [K, N/8]` int32, word `[k, w]` holding columns `8w..8w+7` of row k in the nibble order
of `quantization.AWQ_PACK_ORDER`; `qzeros [K/g, N/8]` int32 packed the same way; `scales
[K/g, N]` float16. `W[k, n] = (q[k, n] - z[k // g, n]) * s[k // g, n]`.

Weights are dequantized in registers: the integer `q - z` times the float16 scale, in float32
(exact), rounded once to the activation dtype, then a tensor-core dot with float32 accumulation.
So the tiled kernel computes what the reference path computes (the float32 dequantized weight
rounded to the compute dtype, `x @ W`), up to the order of the float32 sums. The one-row GEMV
skips that rounding (`x * s * (q - z)` in float32: the exact weight), which is what makes it
fast: the rounding and the int-to-float conversions run on the SM's slow conversion units, and
bound the kernel there instead of the memory (H100, gate_up: 18 us, 2.4 conversions per weight).
`q - z` becomes a float without a conversion instruction: `2^23 + v` has the bits of v < 2^23 in
its mantissa, so `float(0x4B000000 | q) - float(0x4B000000 | z)` is exactly `q - z`.

Two kernels, three shapes of launch (`pick_config`; `MatmulConfig` lets a sweep try others):
- decode (M <= 16): a GEMV-style split-K launch, one 16-row tile of M (or, with `block_m` < 16,
  float32 products on the CUDA cores), narrow N tiles and K split so that every SM streams
  weights; the float32 partial sums go to a `[split, M, N]` buffer that a second small kernel
  sums in a fixed order, adding the bias (deterministic, unlike atomics: a row's result never
  depends on timing); or (`reduce_in_kernel`) the last program to finish a tile sums it, in the
  same order, and the matmul is one launch.
- one row (batch-1 decode), `gemv`: `_awq_gemv_kernel`, words unpacked in registers, no dot,
  the exact weight (see above; reference: `awq_matmul_reference(exact_weight=True)` in tests/reference_ops.py).
- prefill: a tiled GEMM over (M, N) tiles with the whole K per program and the bias fused; from
  `DEQUANTIZE_MIN_M` rows on (and no config asked for), the weight is dequantized once per call
  (`dequantize`) and cuBLAS multiplies.
"""
from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

import torch
import triton
import triton.language as tl

from qwen2vl.layers import quantization as q

# What the kernel accepts: N a multiple of 8 (one packed word), K a multiple of the group size,
# and a group size that a K tile of 16..128 rows divides or fills.
GROUP_SIZES = (32, 64, 128, 256)
SUM_BLOCK = 1024
# From this many rows on, dequantizing the weight once into a scratch buffer and handing the
# product to cuBLAS beats the tiled 4-bit kernel (H100: M=1296, the tiled kernel ran at 0.3-0.4x
# of cuBLAS on the dense weight; the dequantization writes K*N*2 bytes, ~10% of that product).
DEQUANTIZE_MIN_M = 256


def supported(out_features: int, in_features: int, group_size: int) -> bool:
    return group_size in GROUP_SIZES and out_features % 8 == 0 and in_features % group_size == 0


@dataclass(frozen=True)
class MatmulConfig:
    """Launch shape. `block_k` must divide the group size (a K tile sits inside one group);
    `block_m` under 16 multiplies on the CUDA cores instead of a tensor-core dot; `gather` picks
    how packed words reach their columns (see `_load_unpacked`)."""

    block_m: int
    block_n: int
    block_k: int
    split_k: int = 1
    gather: bool = False
    num_warps: int = 4
    num_stages: int = 3
    gemv: bool = False  # one row: `_awq_gemv_kernel` (block_m unused)
    # With split_k > 1: the last program to finish a tile sums its partials (split order, bias
    # last: the same sums as the separate reduction), so the matmul is one launch.
    reduce_in_kernel: bool = False
    # gemv: each K tile's packed words are loaded one iteration ahead (two loads in flight).
    prefetch: bool = False


# Measured winners (`benchmarks/speed.py --sections tune`), by (rows class, N, K, group size): a
# batch of M rows uses the entry of the smallest class >= M (1, 16, 64). These are the 2B model's
# four decoder linears, on an H100 (docs/perf-notes.md, "The W4A16 matmul": M=1 and 16 tuned with
# this GEMV, M=64 before it). Read only: a sweep passes its own table to `pick_config`.
TUNED: Mapping[tuple[int, int, int, int], MatmulConfig] = MappingProxyType({
    (1, 2048, 1536, 128): MatmulConfig(1, 64, 128, split_k=12, gemv=True, reduce_in_kernel=True),
    (1, 1536, 1536, 128): MatmulConfig(1, 64, 128, split_k=12, gemv=True, reduce_in_kernel=True),
    (1, 17920, 1536, 128): MatmulConfig(1, 256, 32, split_k=7, gemv=True, reduce_in_kernel=True),
    (1, 1536, 8960, 128): MatmulConfig(1, 64, 128, split_k=11, gemv=True, reduce_in_kernel=True, prefetch=True),
    (16, 2048, 1536, 128): MatmulConfig(16, 32, 128, split_k=4, reduce_in_kernel=True),
    (16, 1536, 1536, 128): MatmulConfig(16, 32, 128, split_k=5, reduce_in_kernel=True),
    (16, 17920, 1536, 128): MatmulConfig(16, 128, 128, split_k=3),
    (16, 1536, 8960, 128): MatmulConfig(16, 64, 128, split_k=11, reduce_in_kernel=True),
    (64, 2048, 1536, 128): MatmulConfig(64, 64, 128, split_k=4),
    (64, 1536, 1536, 128): MatmulConfig(64, 64, 128, split_k=5),
    (64, 17920, 1536, 128): MatmulConfig(64, 64, 128, split_k=1),
    (64, 1536, 8960, 128): MatmulConfig(64, 64, 128, split_k=11),
})
TUNED_ROWS = (1, 16, 64)


def pick_config(m: int, n: int, k: int, group_size: int, num_sms: int,
                tuned: Mapping[tuple[int, int, int, int], MatmulConfig] = TUNED) -> MatmulConfig:
    """The measured launch for this shape in `tuned` (keyed as `TUNED`) if there is one, else a
    reasonable default."""
    rows = next((r for r in TUNED_ROWS if m <= r), None)
    return tuned.get((rows, n, k, group_size)) or default_config(m, n, k, group_size, num_sms)


def default_config(m: int, n: int, k: int, group_size: int, num_sms: int) -> MatmulConfig:
    """The launch for a shape nobody measured."""
    block_k = min(128, group_size)
    if m <= 16:
        block_n = 64
        tiles = triton.cdiv(n, block_n)
        # Enough programs for about two waves over the SMs, at most one K tile per program.
        split_k = max(1, min(k // block_k, triton.cdiv(2 * num_sms, tiles)))
        return MatmulConfig(16, block_n, block_k, split_k, num_warps=4, num_stages=4)
    block_m = 32 if m <= 32 else 64 if m <= 64 else 128
    return MatmulConfig(block_m, 128, min(64, group_size), 1, num_warps=4 if block_m <= 64 else 8, num_stages=3)


@functools.cache
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":  # the CPU interpreter: small grids are plenty
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


COUNTERS = 1 << 16


@functools.cache
def _split_counter_buffer(device: torch.device) -> torch.Tensor:
    return torch.zeros(COUNTERS, dtype=torch.int32, device=device)


def _split_counters(device: torch.device, tiles: int) -> torch.Tensor:
    """Per-tile arrival counters for `reduce_in_kernel` launches: one zeroed buffer per device,
    which every launch leaves zeroed again (the last program of a tile resets its counter), so
    it needs no clearing and stays valid inside CUDA graphs. Launches on one stream only."""
    if tiles > COUNTERS:
        raise ValueError(f"{tiles} tiles exceed the {COUNTERS} split-K counters")
    return _split_counter_buffer(device)


def _sum_splits(partials: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """The float32 split-K partial sums `partials [split, M, N]` added in split order, plus
    `bias`, rounded once to `dtype`."""
    split, m, n = partials.shape
    out = torch.empty(m, n, device=partials.device, dtype=dtype)
    _sum_splits_kernel[(triton.cdiv(m * n, SUM_BLOCK),)](
        partials, bias if bias is not None else out, out, m * n, n, split,
        HAS_BIAS=bias is not None, BLOCK=SUM_BLOCK)
    return out


def _rows(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor):
    """x as `[M, K]` rows with unit stride, and the matmul's (M, N, K)."""
    k, n = qweight.shape[0], scales.shape[1]
    flat = x.reshape(-1, k)
    if flat.stride(-1) != 1:
        flat = flat.contiguous()
    return flat, flat.shape[0], n, k


def awq_matmul(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
               group_size: int, bias: torch.Tensor | None = None,
               config: MatmulConfig | None = None) -> torch.Tensor:
    """`x [..., K] @ W + bias` -> `[..., N]` in x's dtype (float16 or bfloat16)."""
    flat, m, n, k = _rows(x, qweight, scales)
    if config is None and m >= DEQUANTIZE_MIN_M:
        weight = dequantize(qweight, qzeros, scales, group_size, x.dtype)
        out = flat @ weight if bias is None else torch.addmm(bias, flat, weight)
        return out.unflatten(0, x.shape[:-1])
    config = config or pick_config(m, n, k, group_size, _num_sms(x.device))
    if group_size % config.block_k or k % config.block_k:
        raise ValueError(f"block_k {config.block_k} must divide group_size {group_size} and K {k}")
    split = config.split_k
    in_kernel = split > 1 and config.reduce_in_kernel
    out = torch.empty((split, m, n) if split > 1 else (m, n), device=x.device,
                      dtype=torch.float32 if split > 1 else x.dtype)
    final = torch.empty(m, n, device=x.device, dtype=x.dtype) if in_kernel else out
    tiles = triton.cdiv(m, config.block_m) * triton.cdiv(n, config.block_n)
    counters = _split_counters(x.device, tiles) if in_kernel else out
    bias_here = bias is not None and (split == 1 or in_kernel)
    if config.gemv:
        if m != 1 or config.block_n % 8:
            raise ValueError(f"{config}: the GEMV kernel takes one row and a block_n of whole words, found M={m}")
        _awq_gemv_kernel[(triton.cdiv(n, config.block_n), split)](
            flat, qweight, qzeros, scales, bias if bias_here else flat, out, final, counters, n, n // 8, k, n, split,
            GROUP_SIZE=group_size, BLOCK_W=config.block_n // 8, BLOCK_K=config.block_k,
            SPLIT=split > 1, HAS_BIAS=bias_here, REDUCE_IN_KERNEL=in_kernel, PREFETCH=config.prefetch,
            num_warps=config.num_warps, num_stages=config.num_stages,
        )
    else:
        _awq_matmul_kernel[(triton.cdiv(m, config.block_m), triton.cdiv(n, config.block_n), split)](
            flat, qweight, qzeros, scales, bias if bias_here else flat, out, final, counters,
            m, n, k, flat.stride(0), n, m * n, split,
            GROUP_SIZE=group_size, BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
            SPLIT=split > 1, HAS_BIAS=bias_here, GATHER=config.gather, REDUCE_IN_KERNEL=in_kernel,
            num_warps=config.num_warps, num_stages=config.num_stages,
        )
    if in_kernel:
        return final.unflatten(0, x.shape[:-1])
    if split > 1:
        out = _sum_splits(out, bias, x.dtype)
    return out.unflatten(0, x.shape[:-1])


def dequantize(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int,
               dtype: torch.dtype) -> torch.Tensor:
    """The weight `W [K, N]` in `dtype`: `(q - z) * s` in float32, rounded once (reference:
    `quantization.dequantize_awq`, transposed)."""
    k, n = qweight.shape[0], scales.shape[1]
    out = torch.empty(k, n, device=qweight.device, dtype=dtype)
    block_k, block_n = min(32, group_size), 128
    _dequantize_kernel[(k // block_k, triton.cdiv(n, block_n))](
        qweight, qzeros, scales, out, n, GROUP_SIZE=group_size, BLOCK_K=block_k, BLOCK_N=block_n)
    return out


@triton.jit
def _load_unpacked(ptr, rows, first_column, N, ROWS: tl.constexpr, BLOCK_N: tl.constexpr, GATHER: tl.constexpr):
    """The 4-bit values `[ROWS, BLOCK_N]` of columns `first_column + [0, BLOCK_N)` of the
    AWQ-packed rows `rows` (`first_column` a multiple of 8).

    GATHER loads each column's word directly (8 lanes share a word; no register shuffle);
    otherwise each word is loaded once and broadcast to its 8 columns by a reshape.
    """
    columns = first_column + tl.arange(0, BLOCK_N)
    # Column j of a word sits in nibble j/2 (even j) or 4 + j/2 (odd j): AWQ_PACK_ORDER inverted.
    shifts = ((columns % 8 // 2) + (columns % 2) * 4) * 4
    if GATHER:
        words = tl.load(ptr + rows[:, None] * (N // 8) + (columns // 8)[None, :], mask=(columns < N)[None, :], other=0)
    else:
        offs_w = first_column // 8 + tl.arange(0, BLOCK_N // 8)
        words = tl.load(ptr + rows[:, None] * (N // 8) + offs_w[None, :], mask=(offs_w < N // 8)[None, :], other=0)
        words = tl.reshape(tl.broadcast_to(words[:, :, None], (ROWS, BLOCK_N // 8, 8)), (ROWS, BLOCK_N))
    return (words >> shifts[None, :]) & 0xF


@triton.jit
def _offset_float(nibbles):
    """`2^23 + v` as float32 for integers 0 <= v < 16: differences of two are exactly the
    integer differences, with no int-to-float conversion instruction."""
    return (nibbles | 0x4B000000).to(tl.float32, bitcast=True)


@triton.jit
def _awq_matmul_kernel(
    x_ptr, qweight_ptr, qzeros_ptr, scales_ptr, bias_ptr, out_ptr, final_ptr, counters_ptr,
    M, N, K, stride_xm, stride_om, stride_split, split_k,
    GROUP_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr, GATHER: tl.constexpr, REDUCE_IN_KERNEL: tl.constexpr,
):
    pid_m, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m, mask_n = offs_m < M, offs_n < N

    num_tiles = K // BLOCK_K
    tiles_per_split = tl.cdiv(num_tiles, split_k)
    first = pid_k * tiles_per_split
    last = tl.minimum(first + tiles_per_split, num_tiles)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for tile in range(first, last):
        k0 = tile * BLOCK_K
        rows = k0 + offs_k
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + rows[None, :], mask=mask_m[:, None], other=0.0)
        group = k0 // GROUP_SIZE
        values = _load_unpacked(qweight_ptr, rows, pid_n * BLOCK_N, N, BLOCK_K, BLOCK_N, GATHER)
        zeros = _load_unpacked(qzeros_ptr, group + tl.zeros((1,), tl.int32), pid_n * BLOCK_N, N, 1, BLOCK_N, GATHER)
        scale = tl.load(scales_ptr + group * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        weight = ((_offset_float(values) - _offset_float(zeros)) * scale[None, :]).to(x.dtype)
        if BLOCK_M >= 16:
            acc = tl.dot(x, weight, acc)
        else:  # too few rows for a tensor-core tile: float32 products on the CUDA cores
            acc += tl.sum(x.to(tl.float32)[:, :, None] * weight.to(tl.float32)[None, :, :], axis=1)

    mask = mask_m[:, None] & mask_n[None, :]
    if not SPLIT:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(out_ptr + pid_k * stride_split + offs_m[:, None] * stride_om + offs_n[None, :], acc, mask=mask)
        if REDUCE_IN_KERNEL:
            _sum_if_last(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], stride_split, split_k,
                         final_ptr + offs_m[:, None] * stride_om + offs_n[None, :], bias_ptr + offs_n[None, :], mask,
                         counters_ptr + pid_m * tl.num_programs(1) + pid_n, HAS_BIAS)


@triton.jit
def _awq_gemv_kernel(
    x_ptr, qweight_ptr, qzeros_ptr, scales_ptr, bias_ptr, out_ptr, final_ptr, counters_ptr,
    N, N_WORDS, K, stride_split, split_k,
    GROUP_SIZE: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT: tl.constexpr,
    HAS_BIAS: tl.constexpr, REDUCE_IN_KERNEL: tl.constexpr, PREFETCH: tl.constexpr,
):
    """One row of x times W for `BLOCK_W` packed words (8 columns each) over a K range. Each
    word is unpacked in registers into its 8 nibbles `[BLOCK_K, BLOCK_W, 8]` (no reshuffle
    between threads), products `(x s) (q - z)` go to a float32 accumulator of that shape on the
    CUDA cores, and the sum over K happens once, after the loop; nibble p of a word is column
    `2 (p % 4) + p // 4` of its 8 (AWQ's order), which the scale loads and the stores follow.
    `x s` is exact in float32 (8 or 11 significant bits times 11), so each term is the exact
    product but for the fused multiply-add's one rounding: about four instructions per weight
    (shift, mask-or, subtract, multiply-add) plus the multiply by the scale.

    The compiler moves each tile of words through shared memory to broadcast them over the
    nibbles (two barriers per iteration). One accumulator per nibble position in the load's own
    layout avoids that, but measured slower on the H100 (docs/perf-notes.md: gate_up 19.1 against
    15.9 us, down 13.7 against 12.1), its scales loaded as 2-byte scalars per nibble."""
    pid_n, pid_k = tl.program_id(0), tl.program_id(1)
    # N_WORDS (= N / 8) as its own argument: Triton learns its divisibility, so rows of words are
    # known aligned and loaded in 16-byte vectors.
    words = tl.max_contiguous(tl.multiple_of(pid_n * BLOCK_W + tl.arange(0, BLOCK_W), BLOCK_W), BLOCK_W)
    mask_w = words < N_WORDS
    nibbles = tl.arange(0, 8)
    shifts = nibbles * 4
    columns = words[:, None] * 8 + (2 * (nibbles % 4) + nibbles // 4)[None, :]
    offs_k = tl.arange(0, BLOCK_K)

    num_tiles = K // BLOCK_K
    tiles_per_split = tl.cdiv(num_tiles, split_k)
    first = pid_k * tiles_per_split
    last = tl.minimum(first + tiles_per_split, num_tiles)
    acc = tl.zeros((BLOCK_K, BLOCK_W, 8), dtype=tl.float32)
    word_rows = qweight_ptr + offs_k[:, None] * N_WORDS + words[None, :]
    if PREFETCH:
        ahead = tl.load(word_rows + first * BLOCK_K * N_WORDS, mask=mask_w[None, :] & (first < last), other=0)
    else:
        ahead = tl.zeros((BLOCK_K, BLOCK_W), dtype=tl.int32)
    for tile in range(first, last):
        rows = tile * BLOCK_K + offs_k
        group = tile * BLOCK_K // GROUP_SIZE
        if PREFETCH:
            packed = ahead
            ahead = tl.load(word_rows + (tile + 1) * BLOCK_K * N_WORDS, mask=mask_w[None, :] & (tile + 1 < last),
                            other=0)
        else:
            packed = tl.load(word_rows + tile * BLOCK_K * N_WORDS, mask=mask_w[None, :], other=0)
        zero_words = tl.load(qzeros_ptr + group * N_WORDS + words, mask=mask_w, other=0)
        scale = tl.load(scales_ptr + group * N + columns, mask=mask_w[:, None], other=0.0).to(tl.float32)
        x = tl.load(x_ptr + rows).to(tl.float32)
        values = _offset_float((packed[:, :, None] >> shifts[None, None, :]) & 0xF)
        zeros = _offset_float((zero_words[:, None] >> shifts[None, :]) & 0xF)
        acc += (x[:, None, None] * scale[None, :, :]) * (values - zeros[None, :, :])
    out = tl.sum(acc, axis=0)
    if SPLIT:
        tl.store(out_ptr + pid_k * stride_split + columns, out, mask=mask_w[:, None])
        if REDUCE_IN_KERNEL:
            _sum_if_last(out_ptr + columns, stride_split, split_k, final_ptr + columns, bias_ptr + columns,
                         mask_w[:, None], counters_ptr + pid_n, HAS_BIAS)
    else:
        if HAS_BIAS:
            out += tl.load(bias_ptr + columns, mask=mask_w[:, None], other=0.0).to(tl.float32)
        tl.store(out_ptr + columns, out.to(out_ptr.dtype.element_ty), mask=mask_w[:, None])


@triton.jit
def _dequantize_kernel(qweight_ptr, qzeros_ptr, scales_ptr, out_ptr, N,
                       GROUP_SIZE: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_k, pid_n = tl.program_id(0), tl.program_id(1)
    rows = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    group = pid_k * BLOCK_K // GROUP_SIZE
    values = _load_unpacked(qweight_ptr, rows, pid_n * BLOCK_N, N, BLOCK_K, BLOCK_N, False)
    zeros = _load_unpacked(qzeros_ptr, group + tl.zeros((1,), tl.int32), pid_n * BLOCK_N, N, 1, BLOCK_N, False)
    scale = tl.load(scales_ptr + group * N + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)
    weight = (_offset_float(values) - _offset_float(zeros)) * scale[None, :]
    tl.store(out_ptr + rows[:, None] * N + offs_n[None, :], weight.to(out_ptr.dtype.element_ty),
             mask=(offs_n < N)[None, :])


@triton.jit
def _sum_if_last(partials, stride_split, split_k, finals, biases, mask, counter_ptr, HAS_BIAS: tl.constexpr):
    """After a split program stored its partial sums (`partials`: the pointers of split 0's):
    count its arrival on the tile's counter; the last to arrive adds all the splits in order
    (+ bias), rounds once into `finals`, and resets the counter for the next launch."""
    tl.debug_barrier()  # every thread's partial stores come before the arrival
    arrived = tl.atomic_add(counter_ptr, 1, sem="acq_rel")
    if arrived == split_k - 1:
        total = tl.load(partials, mask=mask, other=0.0, cache_modifier=".cg")  # .cg: from L2, not a stale L1
        for split in range(1, split_k):
            total += tl.load(partials + split * stride_split, mask=mask, other=0.0, cache_modifier=".cg")
        if HAS_BIAS:
            total += tl.load(biases, mask=mask, other=0.0).to(tl.float32)
        tl.store(finals, total.to(finals.dtype.element_ty), mask=mask)
        tl.atomic_xchg(counter_ptr, 0)


@triton.jit
def _sum_splits_kernel(partial_ptr, bias_ptr, out_ptr, size, N, split_k, HAS_BIAS: tl.constexpr,
                       BLOCK: tl.constexpr):
    """out `[M, N]` = sum of the `[split_k, M, N]` float32 partials (+ bias), rounded once."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < size
    acc = tl.zeros((BLOCK,), tl.float32)
    for split in range(split_k):
        acc += tl.load(partial_ptr + split * size + offs, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs % N, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def pack(values: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """4-bit `values [N, K]`, `scales [G, N]`, integer zero points `[G, N]` (what
    `QuantizedLinear.values`, `.scales` and `.zero_points` give) -> `(qweight [K, N/8], qzeros
    [G, N/8], scales [G, N] float16)`, the kernel's layout. An AWQ checkpoint is already in it;
    GPTQ is repacked here."""
    qweight = q.pack_awq(values.t().contiguous())
    qzeros = q.pack_awq(zeros.to(torch.int32))
    return qweight, qzeros, scales.to(torch.float16).contiguous()
