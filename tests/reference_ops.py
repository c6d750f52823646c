"""Pure-torch references of the kernels (`qwen2vl/kernels/triton_*.py`, `int4_cpu.py`): the functions
they must compute, which tests/triton_cases.py, tests/test_kernels_int4.py and benchmarks/speed.py
check them against.

Where a layer already holds the reference math it is reused, not copied: rotary is
`layers.rotary.apply_rotary`, SwiGLU is `layers.activation.silu_and_mul`, AWQ dequantization is
`layers.quantization.dequantize_awq`, the KV write is `layers.attention.write_kv_cache`, the
mixture-of-experts grouped matmul is `layers.moe.grouped_matmul`.
"""
from __future__ import annotations

import torch

from qwen2vl.kernels.int4_cpu import KERNEL_DTYPE
from qwen2vl.layers import quantization as q
from qwen2vl.layers.attention import write_kv_cache
from qwen2vl.layers.rotary import apply_rotary


def awq_matmul_reference(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                         group_size: int, bias: torch.Tensor | None = None, exact_weight: bool = False) -> torch.Tensor:
    """`x @ W + bias` with W dequantized exactly, rounded once to x's dtype (as the reference
    path's `dequantize_` does; with `exact_weight`, not rounded: the one-row GEMV's function),
    products summed in float32 and rounded once at the end."""
    weight = q.dequantize_awq(qweight, qzeros, scales, group_size)  # [N, K] float32
    if not exact_weight:
        weight = weight.to(x.dtype).float()
    y = x.float() @ weight.t()
    if bias is not None:
        y += bias.float()
    return y.to(x.dtype)


def add_rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """`layers.norm.RMSNorm` of `x` (of `x + residual` when given, which is returned too, in x's
    dtype: the residual stream the decoder layer carries on)."""
    if residual is not None:
        x = x + residual
    x32 = x.float()
    normed = weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return normed if residual is None else (normed, x)


def paged_decode_attention_reference(query: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                                     context_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """One query token per sequence (its last) over all its cached tokens, float32 softmax.

    query `[B, heads, D]`; kv_cache `[2, blocks, block_size, kv_heads, D]`; block_tables
    `[B, max_blocks]`; context_lens `[B]` (the query's own key/value already in the cache).
    """
    block_size, num_kv_heads = kv_cache.shape[2], kv_cache.shape[3]
    group = query.shape[1] // num_kv_heads
    out = torch.empty_like(query)
    for b, context_len in enumerate(context_lens.tolist()):
        blocks = block_tables[b, : -(-context_len // block_size)].long()
        keys, values = (kv_cache[i, blocks].flatten(0, 1)[:context_len].float() for i in (0, 1))  # [T, kv, D]
        keys, values = keys.repeat_interleave(group, 1), values.repeat_interleave(group, 1)
        scores = torch.einsum("hd,thd->ht", query[b].float(), keys) * scale
        out[b] = torch.einsum("ht,thd->hd", scores.softmax(-1), values).to(query.dtype)
    return out


def qkv_rotary_cache_reference(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv_cache: torch.Tensor,
                               slot_mapping: torch.Tensor, num_heads: int, num_kv_heads: int) -> torch.Tensor:
    """What `DecoderAttention` does between the qkv projection and attention: split, rotate q and
    k, write k and v at their slots (negative slots: nowhere); returns q `[N, heads, D]`."""
    head_dim = qkv.shape[-1] // (num_heads + 2 * num_kv_heads)
    q, k, v = qkv.split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], -1)
    q = apply_rotary(q.unflatten(-1, (num_heads, head_dim)), cos, sin)
    k = apply_rotary(k.unflatten(-1, (num_kv_heads, head_dim)), cos, sin)
    keep = slot_mapping >= 0
    write_kv_cache(kv_cache, k[keep], v.unflatten(-1, (num_kv_heads, head_dim))[keep], slot_mapping[keep])
    return q


def int4_cpu_dequantize(values: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """The float32 weight `[N, K]` that `kernels.int4_cpu`'s layout (`values` unpacked) stands for."""
    scales, offsets = scales_and_zeros.float().unbind(-1)  # [G, N] each
    grouped = (values.float() - 8).unflatten(1, (-1, group_size))  # [N, G, g]
    return (grouped * scales.t()[:, :, None] + offsets.t()[:, :, None]).flatten(1)


def int4_matmul_reference(x: torch.Tensor, values: torch.Tensor, scales_and_zeros: torch.Tensor,
                          group_size: int) -> torch.Tensor:
    """What `kernels.int4_cpu.int4_matmul` computes, from the unpacked values, in float32 on the
    kernel-dtype inputs."""
    weight = int4_cpu_dequantize(values, scales_and_zeros, group_size)
    return (x.to(KERNEL_DTYPE).float() @ weight.t()).to(x.dtype)


def fp8_block_matmul_reference(x: torch.Tensor, weight: torch.Tensor, scale_inv: torch.Tensor, scale_rows: torch.Tensor,
                               block_cols: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`x @ W^T + bias` for block-scaled FP8 weights (`kernels.triton_fp8`): W dequantized exactly,
    rounded once to x's dtype (the weight `FP8Linear.dequantize_` holds), products summed in
    float32 and rounded once at the end."""
    w = q.dequantize_fp8_blocks(weight, scale_inv, scale_rows, block_cols).to(x.dtype).float()
    y = x.float() @ w.t()
    if bias is not None:
        y += bias.float()
    return y.to(x.dtype)
