"""Attention: paged causal attention for the decoder, packed bidirectional attention for vision.

These are the torch reference paths (SDPA per sequence; for vision, per length of segment); they
run on any device. On CUDA a pure-decode batch goes to Triton instead (`qwen2vl.kernels`): rotary
and the KV write in one launch, then paged decode attention.
"""
from __future__ import annotations


import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from qwen2vl import kernels
from qwen2vl.layers.attention_metadata import AttentionMetadata, Segments
from qwen2vl.layers.rotary import apply_rotary_qk


# SDPA without cuDNN's backend, which torch 2.11 picks first on Hopper and newer but which builds
# an execution plan for every shape it has not seen (0.44 s each, FunASR issue #3704 on a B200):
# every new prompt length, chunk and image count would pay it. benchmarks/speed.py times a first
# call at new shapes with and without it.
SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def write_kv_cache(kv_cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   slot_mapping: torch.Tensor) -> None:
    """Store the new tokens' keys and values at their slots (`block * block_size + offset`)."""
    kv_cache[0].flatten(0, 1).index_copy_(0, slot_mapping, key.to(kv_cache.dtype))
    kv_cache[1].flatten(0, 1).index_copy_(0, slot_mapping, value.to(kv_cache.dtype))


class PagedAttention:
    """Causal attention of each sequence's new tokens over all its cached tokens, from the fused
    q|k|v projection: rotary on q and k, k and v into the cache at their slots, attention.

    Handles prefill from scratch, chunked prefill and decode in one batch: the queries of
    sequence b are the last `query_lens[b]` of its `context_lens[b]` tokens.
    """

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int):
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = head_dim ** -0.5

    def __call__(self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv_cache: torch.Tensor,
                 attn: AttentionMetadata) -> torch.Tensor:
        """qkv `[N, (heads + 2 kv_heads) * D]`, cos/sin `[N, D]` -> `[N, heads, D]`."""
        if kernels.decode_attention_runs(qkv, attn.query_lens_cpu, self.head_dim):
            return kernels.qkv_decode_attention(qkv, cos, sin, kv_cache, attn.slot_mapping, attn.block_tables,
                                                attn.context_lens, self.num_heads, self.num_kv_heads, self.scale)
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        query, key, value = qkv.split([q_size, kv_size, kv_size], dim=-1)
        query, key = apply_rotary_qk(query.unflatten(-1, (self.num_heads, self.head_dim)),
                                     key.unflatten(-1, (self.num_kv_heads, self.head_dim)), cos, sin)
        value = value.unflatten(-1, (self.num_kv_heads, self.head_dim))
        write_kv_cache(kv_cache, key, value, attn.slot_mapping)
        # Prompts computed from their first token have all their keys in this step: one causal
        # call per prompt length, however many prompts (keys and values as the cache holds them).
        as_cached = lambda t: t.to(kv_cache.dtype).to(query.dtype)  # noqa: E731
        out = packed_attention(query, as_cached(key), as_cached(value), attn.whole_prompts, causal=True)
        # A mixed step's decode rows (one new token after cached ones): one Triton launch for all.
        batched_decode = kernels.decode_attention_runs(query, [1], self.head_dim) and attn.decode_rows is not None
        if batched_decode:
            rows, seqs = attn.decode_rows
            out[rows] = kernels.paged_decode_attention(query[rows], kv_cache, attn.block_tables[seqs],
                                                       attn.context_lens[seqs], self.scale)
        starts = attn.query_starts_cpu
        with sdpa_kernel(SDPA_BACKENDS):
            for b, (query_len, context_len) in enumerate(zip(attn.query_lens_cpu, attn.context_lens_cpu)):
                if query_len == context_len or (query_len == 1 and batched_decode):
                    continue
                blocks = attn.block_tables[b, : -(-context_len // attn.block_size)].long()
                keys = kv_cache[0, blocks].flatten(0, 1)[:context_len]
                values = kv_cache[1, blocks].flatten(0, 1)[:context_len]
                rows = slice(starts[b], starts[b] + query_len)
                out[rows] = self._attend(query[rows], keys.to(query.dtype), values.to(query.dtype))
        return out

    def _attend(self, query, keys, values):
        query_len, context_len = query.shape[0], keys.shape[0]
        # [1, heads, tokens, D]: the fused SDPA kernels take 4-D inputs only (3-D falls back to math)
        query, keys, values = (t.transpose(0, 1)[None] for t in (query, keys, values))
        if query_len == 1:
            # No mask: flash attention takes it, grouped heads included.
            out = F.scaled_dot_product_attention(query, keys, values, scale=self.scale,
                                                 enable_gqa=self.num_heads != self.num_kv_heads)
        else:
            # A prompt chunk after cached tokens: its causal mask is offset, which only the
            # memory-efficient kernel takes, and not with grouped heads (SDPA would fall back to
            # materializing the scores).
            query_pos = torch.arange(context_len - query_len, context_len, device=query.device)
            causal = torch.arange(context_len, device=query.device)[None, :] <= query_pos[:, None]
            group = self.num_heads // self.num_kv_heads
            out = F.scaled_dot_product_attention(query, keys.repeat_interleave(group, 1),
                                                 values.repeat_interleave(group, 1), attn_mask=causal, scale=self.scale)
        return out[0].transpose(0, 1)


def packed_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, segments: Segments,
                     causal: bool = False) -> torch.Tensor:
    """Attention within each of `segments` (bidirectional, or `causal`): query `[P, heads, D]`,
    key/value `[P, kv_heads, D]` -> `[P, heads, D]`; rows outside the segments are left unset."""
    out = torch.empty_like(query)
    if not segments.groups:
        return out
    with sdpa_kernel(SDPA_BACKENDS):
        for positions, count, length in segments.groups:
            q, k, v = (t[positions].unflatten(0, (count, length)).transpose(1, 2) for t in (query, key, value))
            out[positions] = F.scaled_dot_product_attention(
                q, k, v, is_causal=causal, enable_gqa=q.shape[1] != k.shape[1]).transpose(1, 2).flatten(0, 1)
    return out
