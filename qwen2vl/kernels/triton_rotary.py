"""Rotary embedding of q and k in Triton (reference: `layers.rotary.apply_rotary`), alone or
fused with the end of the qkv projection and the KV-cache write.

cos/sin rows `[N, head_dim]` are precomputed once per forward (`MRotaryEmbedding.cos_sin` has
already folded M-RoPE's per-axis sections into them).

Rounding follows the reference: `x * cos` and `rotate_half(x) * sin` are each rounded to the
activation dtype, then their sum is rounded; products of two 16-bit floats are exact in float32,
so under the CPU interpreter the results are bitwise the reference's. A GPU compiler may fuse or
round differently, by at most a rounding step (tests/triton_cases.py).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


def apply_rotary_qk_(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """Rotate q `[N, heads, D]` and k `[N, kv_heads, D]` in place by cos/sin `[N, D]` (x's dtype).

    q and k may be strided views of the fused qkv projection's output (rows of any stride, heads
    packed, last dim contiguous): rotating them in place saves splitting copies."""
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    if q.stride(2) != 1 or k.stride(2) != 1 or q.stride(1) != head_dim or k.stride(1) != head_dim:
        raise ValueError("q and k need packed heads with a contiguous last dim")
    _check_head_dim(head_dim)
    cos, sin = cos.contiguous(), sin.contiguous()
    _rotary_qk_kernel[(num_tokens,)](
        q, k, cos, sin, q.stride(0), k.stride(0), num_heads, num_kv_heads,
        HALF=head_dim // 2, HEADS_PAD=triton.next_power_of_2(num_heads),
        KV_HEADS_PAD=triton.next_power_of_2(num_kv_heads),
    )


def qkv_rotary_cache(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv_cache: torch.Tensor,
                     slot_mapping: torch.Tensor, num_heads: int, num_kv_heads: int) -> torch.Tensor:
    """From the fused qkv projection's output `[N, (heads + 2 kv_heads) * D]`: rotate q and k,
    write k and v to their cache slots (negative slots write nowhere), return q `[N, heads, D]`.
    One launch instead of a rotary and a cache write."""
    if qkv.stride(-1) != 1:
        qkv = qkv.contiguous()
    num_tokens, width = qkv.shape
    head_dim = width // (num_heads + 2 * num_kv_heads)
    _check_head_dim(head_dim)
    if kv_cache.stride(4) != 1 or kv_cache.stride(3) != head_dim:
        raise ValueError(f"kv_cache needs packed heads with a contiguous last dim, found strides {kv_cache.stride()}")
    q = torch.empty(num_tokens, num_heads, head_dim, device=qkv.device, dtype=qkv.dtype)
    stride_kv, stride_block, stride_token, _, _ = kv_cache.stride()
    cos, sin = cos.contiguous(), sin.contiguous()
    _qkv_rotary_cache_kernel[(num_tokens,)](
        qkv, cos, sin, q, kv_cache, slot_mapping, qkv.stride(0), stride_kv, stride_block, stride_token,
        kv_cache.shape[2], num_heads, num_kv_heads, HALF=head_dim // 2,
        HEADS_PAD=triton.next_power_of_2(num_heads), KV_HEADS_PAD=triton.next_power_of_2(num_kv_heads),
    )
    return q


def _check_head_dim(head_dim: int) -> None:
    if head_dim % 2 or (head_dim // 2) & (head_dim // 2 - 1):
        raise ValueError(f"head_dim {head_dim} must be twice a power of 2")


@triton.jit
def _rotate(x1, x2, c1, s1, c2, s2, dtype: tl.constexpr):
    """Both halves of rotated heads, float32 in, each product and the sum rounded to `dtype`."""
    x1, x2 = x1.to(tl.float32), x2.to(tl.float32)
    out1 = (x1 * c1).to(dtype).to(tl.float32) - (x2 * s1).to(dtype).to(tl.float32)
    out2 = (x2 * c2).to(dtype).to(tl.float32) + (x1 * s2).to(dtype).to(tl.float32)
    return out1.to(dtype), out2.to(dtype)


@triton.jit
def _load_cos_sin(cos_ptr, sin_ptr, token, HALF: tl.constexpr):
    cols = tl.arange(0, HALF)
    row = token * 2 * HALF
    c1 = tl.load(cos_ptr + row + cols).to(tl.float32)[None, :]
    c2 = tl.load(cos_ptr + row + HALF + cols).to(tl.float32)[None, :]
    s1 = tl.load(sin_ptr + row + cols).to(tl.float32)[None, :]
    s2 = tl.load(sin_ptr + row + HALF + cols).to(tl.float32)[None, :]
    return c1, s1, c2, s2


@triton.jit
def _head_offsets(num_heads, HEADS_PAD: tl.constexpr, HALF: tl.constexpr):
    """Offsets `[HEADS_PAD, HALF]` of the first halves of `num_heads` packed heads, and their mask."""
    heads = tl.arange(0, HEADS_PAD)
    return heads[:, None] * (2 * HALF) + tl.arange(0, HALF)[None, :], (heads < num_heads)[:, None]


@triton.jit
def _rotate_heads_(ptr, num_heads, c1, s1, c2, s2, HEADS_PAD: tl.constexpr, HALF: tl.constexpr):
    offsets, mask = _head_offsets(num_heads, HEADS_PAD, HALF)
    x1 = tl.load(ptr + offsets, mask=mask, other=0.0)
    x2 = tl.load(ptr + offsets + HALF, mask=mask, other=0.0)
    out1, out2 = _rotate(x1, x2, c1, s1, c2, s2, x1.dtype)
    tl.store(ptr + offsets, out1, mask=mask)
    tl.store(ptr + offsets + HALF, out2, mask=mask)


@triton.jit
def _rotary_qk_kernel(q_ptr, k_ptr, cos_ptr, sin_ptr, stride_q, stride_k, num_heads, num_kv_heads,
                      HALF: tl.constexpr, HEADS_PAD: tl.constexpr, KV_HEADS_PAD: tl.constexpr):
    token = tl.program_id(0)
    c1, s1, c2, s2 = _load_cos_sin(cos_ptr, sin_ptr, token, HALF)
    _rotate_heads_(q_ptr + token.to(tl.int64) * stride_q, num_heads, c1, s1, c2, s2, HEADS_PAD, HALF)
    _rotate_heads_(k_ptr + token.to(tl.int64) * stride_k, num_kv_heads, c1, s1, c2, s2, KV_HEADS_PAD, HALF)


@triton.jit
def _qkv_rotary_cache_kernel(qkv_ptr, cos_ptr, sin_ptr, q_ptr, kv_ptr, slot_mapping_ptr, stride_row, stride_kv,
                             stride_block, stride_token, block_size, num_heads, num_kv_heads, HALF: tl.constexpr,
                             HEADS_PAD: tl.constexpr, KV_HEADS_PAD: tl.constexpr):
    token = tl.program_id(0)
    dtype = q_ptr.dtype.element_ty
    row_ptr = qkv_ptr + token.to(tl.int64) * stride_row
    c1, s1, c2, s2 = _load_cos_sin(cos_ptr, sin_ptr, token, HALF)

    offsets, mask = _head_offsets(num_heads, HEADS_PAD, HALF)
    out1, out2 = _rotate(tl.load(row_ptr + offsets, mask=mask, other=0.0),
                         tl.load(row_ptr + offsets + HALF, mask=mask, other=0.0), c1, s1, c2, s2, dtype)
    q_row = q_ptr + token.to(tl.int64) * num_heads * 2 * HALF + offsets
    tl.store(q_row, out1, mask=mask)
    tl.store(q_row + HALF, out2, mask=mask)

    slot = tl.load(slot_mapping_ptr + token)
    if slot >= 0:
        kv_offsets, kv_mask = _head_offsets(num_kv_heads, KV_HEADS_PAD, HALF)
        key_ptr = row_ptr + num_heads * 2 * HALF + kv_offsets
        value_ptr = key_ptr + num_kv_heads * 2 * HALF
        k1, k2 = _rotate(tl.load(key_ptr, mask=kv_mask, other=0.0), tl.load(key_ptr + HALF, mask=kv_mask, other=0.0),
                         c1, s1, c2, s2, dtype)
        cache_ptr = kv_ptr + (slot // block_size) * stride_block + (slot % block_size) * stride_token + kv_offsets
        cache_dtype = kv_ptr.dtype.element_ty
        tl.store(cache_ptr, k1.to(cache_dtype), mask=kv_mask)
        tl.store(cache_ptr + HALF, k2.to(cache_dtype), mask=kv_mask)
        tl.store(cache_ptr + stride_kv, tl.load(value_ptr, mask=kv_mask, other=0.0).to(cache_dtype), mask=kv_mask)
        tl.store(cache_ptr + stride_kv + HALF, tl.load(value_ptr + HALF, mask=kv_mask, other=0.0).to(cache_dtype),
                 mask=kv_mask)
