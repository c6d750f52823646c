"""Paged decode attention in Triton.

Reference: `paged_decode_attention_reference` in tests/reference_ops.py (and the decoder's own
`layers.attention.PagedAttention` on decode steps). The KV write of a decode step happens in
`triton_rotary.qkv_rotary_cache`, fused with the rotary.

One query token per sequence over its cached keys/values in the paged KV cache of
`layers.attention_metadata` (`[2, blocks, block_size, kv_heads, D]`, block tables, context
lengths). GQA-aware: a program owns one (sequence, kv head, context partition) and serves all the
query heads of that kv head's group, so each key/value is read from memory once per group.

Long contexts are split into partitions of `PARTITION_SIZE` tokens (flash-decoding), so a single
sequence still spreads over the SMs; the last of a (sequence, kv head)'s partitions to finish
merges their softmax statistics (an arrival counter, as `triton_awq`'s split-K reduction), and a
context of one partition writes its output directly: one launch per layer. The number of
partitions comes from the block table's width, not from the context lengths, so the launch has
the same grid at every step of a captured CUDA graph.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

PARTITION_SIZE = 512
BLOCK_TOKENS = 64  # keys per inner step (gathered across KV blocks, any block size)


def paged_decode_attention(query: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                           context_lens: torch.Tensor, scale: float,
                           partition_size: int = PARTITION_SIZE, block_tokens: int = BLOCK_TOKENS) -> torch.Tensor:
    """query `[B, heads, D]` -> `[B, heads, D]` in query's dtype. Rows with context length 0
    (padding of a CUDA graph's static batch) come out as zeros."""
    batch, num_heads, head_dim = query.shape
    _, _, block_size, num_kv_heads, _ = kv_cache.shape
    if query.stride(2) != 1 or kv_cache.stride(4) != 1:
        raise ValueError(f"query and kv_cache need a contiguous last dim, found strides {query.stride()}, "
                         f"{kv_cache.stride()}")
    if head_dim & (head_dim - 1) or partition_size % block_tokens:
        raise ValueError(f"head_dim {head_dim} must be a power of 2 and partition_size a multiple of {block_tokens}")
    group = num_heads // num_kv_heads
    max_partitions = triton.cdiv(block_tables.shape[1] * block_size, partition_size)
    if batch * num_kv_heads > COUNTERS:
        raise ValueError(f"{batch} sequences x {num_kv_heads} kv heads exceed the {COUNTERS} merge counters")
    partial = torch.empty(batch, num_heads, max_partitions, head_dim, device=query.device, dtype=torch.float32)
    stats = torch.empty(2, batch, num_heads, max_partitions, device=query.device, dtype=torch.float32)
    out = torch.empty_like(query)
    stride_kv, stride_block, stride_token, stride_head, _ = kv_cache.stride()
    _partition_kernel[(batch, num_kv_heads, max_partitions)](
        query, kv_cache, block_tables, context_lens, partial, stats, out, _merge_counters(query.device),
        scale, query.stride(0), query.stride(1), stride_kv, stride_block, stride_token, stride_head,
        block_tables.stride(0), stats.stride(0), out.stride(0), out.stride(1),
        block_size, num_heads, num_kv_heads, max_partitions,
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim,
        PARTITION=partition_size, BLOCK_N=block_tokens,
        # float32 dots in float32 (Triton's default for them is tf32, ~1e-3 off)
        DOT_PRECISION="ieee" if query.dtype == torch.float32 else "tf32",
    )
    return out


COUNTERS = 1 << 16


@functools.cache
def _merge_counters(device: torch.device) -> torch.Tensor:
    """One arrival counter per (sequence, kv head), zeroed once: the merging program resets its
    own, so every launch finds them zero (inside CUDA graphs too). Launches on one stream only."""
    return torch.zeros(COUNTERS, dtype=torch.int32, device=device)


@triton.jit
def _partition_kernel(
    query_ptr, kv_ptr, block_tables_ptr, context_lens_ptr, partial_ptr, stats_ptr, out_ptr, counters_ptr,
    scale, stride_qb, stride_qh, stride_kv, stride_block, stride_token, stride_head,
    stride_table, stride_stats, stride_ob, stride_oh, block_size, num_heads, num_kv_heads, max_partitions,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
    PARTITION: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    seq, kv_head, part = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    context_len = tl.load(context_lens_ptr + seq)
    used = tl.cdiv(context_len, PARTITION)
    start = part * PARTITION
    offs_g = tl.arange(0, GROUP_PAD)
    offs_d = tl.arange(0, HEAD_DIM)
    heads = kv_head * GROUP + offs_g
    mask_g = offs_g < GROUP
    out_rows = out_ptr + seq * stride_ob + heads[:, None] * stride_oh + offs_d[None, :]
    dtype = out_ptr.dtype.element_ty
    if context_len == 0:  # a padding row of a captured batch: zeros, from its first program
        if part == 0:
            tl.store(out_rows, tl.zeros((GROUP_PAD, HEAD_DIM), dtype), mask=mask_g[:, None])
    elif start < context_len:
        q = tl.load(query_ptr + seq * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                    mask=mask_g[:, None], other=0.0)
        m_i = tl.full((GROUP_PAD,), float("-inf"), tl.float32)
        l_i = tl.zeros((GROUP_PAD,), tl.float32)
        acc = tl.zeros((GROUP_PAD, HEAD_DIM), tl.float32)
        end = tl.minimum(start + PARTITION, context_len)
        for t0 in range(start, end, BLOCK_N):
            tokens = t0 + tl.arange(0, BLOCK_N)
            mask_t = tokens < end
            blocks = tl.load(block_tables_ptr + seq * stride_table + tokens // block_size, mask=mask_t, other=0)
            rows = blocks.to(tl.int64) * stride_block + (tokens % block_size) * stride_token + kv_head * stride_head
            keys = tl.load(kv_ptr + rows[:, None] + offs_d[None, :], mask=mask_t[:, None], other=0.0)
            values = tl.load(kv_ptr + stride_kv + rows[:, None] + offs_d[None, :], mask=mask_t[:, None], other=0.0)
            scores = tl.dot(q, tl.trans(keys), input_precision=DOT_PRECISION) * scale
            scores = tl.where(mask_t[None, :], scores, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(scores, 1))
            p = tl.exp(scores - m_new[:, None])
            alpha = tl.exp(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(values.dtype), values, input_precision=DOT_PRECISION)
            m_i = m_new
        if used == 1:
            # (the floor only keeps the padding heads of GROUP_PAD from dividing 0 by 0)
            tl.store(out_rows, (acc / tl.maximum(l_i, 1e-30)[:, None]).to(dtype), mask=mask_g[:, None])
        else:
            first_row = (seq * num_heads + heads) * max_partitions
            tl.store(partial_ptr + (first_row + part)[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=mask_g[:, None])
            tl.store(stats_ptr + first_row + part, m_i, mask=mask_g)
            tl.store(stats_ptr + stride_stats + first_row + part, l_i, mask=mask_g)
            tl.debug_barrier()  # every thread's stores come before the arrival
            counter = counters_ptr + seq * num_kv_heads + kv_head
            if tl.atomic_add(counter, 1, sem="acq_rel") == used - 1:  # the last partition merges them all
                _merge_partitions(partial_ptr, stats_ptr, stride_stats, first_row, used, out_rows, mask_g,
                                  GROUP_PAD, HEAD_DIM)
                tl.atomic_xchg(counter, 0)


@triton.jit
def _merge_partitions(partial_ptr, stats_ptr, stride_stats, first_row, used, out_rows, mask_g,
                      GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr):
    """The softmax-weighted sum of the `used` partitions' outputs of these heads (loaded .cg:
    from L2, where the other programs' stores are, not from a stale L1)."""
    offs_d = tl.arange(0, HEAD_DIM)
    m = tl.full((GROUP_PAD,), float("-inf"), tl.float32)
    l = tl.zeros((GROUP_PAD,), tl.float32)
    acc = tl.zeros((GROUP_PAD, HEAD_DIM), tl.float32)
    for part in range(used):
        m_p = tl.load(stats_ptr + first_row + part, mask=mask_g, other=0.0, cache_modifier=".cg")
        l_p = tl.load(stats_ptr + stride_stats + first_row + part, mask=mask_g, other=0.0, cache_modifier=".cg")
        acc_p = tl.load(partial_ptr + (first_row + part)[:, None] * HEAD_DIM + offs_d[None, :],
                        mask=mask_g[:, None], other=0.0, cache_modifier=".cg")
        m_new = tl.maximum(m, m_p)
        alpha, beta = tl.exp(m - m_new), tl.exp(m_p - m_new)
        l = l * alpha + l_p * beta
        acc = acc * alpha[:, None] + acc_p * beta[:, None]
        m = m_new
    tl.store(out_rows, (acc / tl.maximum(l, 1e-30)[:, None]).to(out_rows.dtype.element_ty), mask=mask_g[:, None])

