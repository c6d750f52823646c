"""The text decoder: GQA attention with M-RoPE, SwiGLU MLP, RMSNorm. Qwen2's has q/k/v bias;
Qwen3's (`TextConfig.qk_norm`) none, but an RMSNorm of each query and key head before rotary."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from qwen2vl.config import TextConfig
from qwen2vl.layers.activation import silu_and_mul
from qwen2vl.layers.attention import PagedAttention
from qwen2vl.layers.attention_metadata import AttentionMetadata
from qwen2vl.layers.linear import Linear
from qwen2vl.layers.moe import SparseMoeBlock
from qwen2vl.layers.norm import RMSNorm
from qwen2vl.layers.rotary import MRotaryEmbedding
from qwen2vl.layers.vocab import VocabTable


class DecoderAttention(nn.Module):
    def __init__(self, config: TextConfig):
        super().__init__()
        q_size, kv_size = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
        self.qkv_proj = Linear(config.hidden_size, [q_size, kv_size, kv_size], bias=config.attention_bias)
        self.o_proj = Linear(q_size, config.hidden_size, bias=False)
        self.attn = PagedAttention(config.num_heads, config.num_kv_heads, config.head_dim)
        self.head_dim = config.head_dim
        self.qk_norm = config.qk_norm
        if self.qk_norm:
            self.q_norm = RMSNorm(config.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(config.head_dim, config.rms_norm_eps)

    def forward(self, x, cos, sin, attn: AttentionMetadata, kv_cache):
        qkv = self.qkv_proj(x)
        if self.qk_norm:
            qkv = self._norm_heads(qkv)
        return self.o_proj(self.attn(qkv, cos, sin, kv_cache, attn).flatten(1))

    def _norm_heads(self, qkv: torch.Tensor) -> torch.Tensor:
        """The fused q|k|v with each query and key head RMS-normalized (v as it is)."""
        q_size, kv_size = self.attn.num_heads * self.head_dim, self.attn.num_kv_heads * self.head_dim
        q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
        q = self.q_norm(q.unflatten(-1, (-1, self.head_dim))).flatten(-2)
        k = self.k_norm(k.unflatten(-1, (-1, self.head_dim))).flatten(-2)
        return torch.cat((q, k, v), dim=-1)


class MLP(nn.Module):
    """SwiGLU: the decoder's (no bias) and Qwen2.5-VL's vision blocks' (with bias)."""

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool = False):
        super().__init__()
        self.gate_up_proj = Linear(hidden_size, [intermediate_size] * 2, bias=bias)
        self.down_proj = Linear(intermediate_size, hidden_size, bias=bias)

    def forward(self, x):
        return self.down_proj(silu_and_mul(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, config: TextConfig, index: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = DecoderAttention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        sparse = config.moe is not None and config.moe.is_sparse_layer(index)
        self.mlp = SparseMoeBlock(config.hidden_size, config.moe) if sparse else MLP(config.hidden_size, config.intermediate_size)

    def forward(self, x, residual, cos, sin, attn, kv_cache):
        """`x`: the previous sublayer's output, not yet added to the residual stream `residual`
        (None before the first layer), so each add fuses into the norm after it. Returns the
        MLP's output and the stream, likewise."""
        h, residual = self.input_layernorm.add_and_norm(x, residual)
        h, residual = self.post_attention_layernorm.add_and_norm(self.self_attn(h, cos, sin, attn, kv_cache), residual)
        return self.mlp(h), residual


class TextDecoder(nn.Module):
    def __init__(self, config: TextConfig):
        super().__init__()
        self.embed_tokens = VocabTable(config.vocab_size, config.hidden_size)
        self.rotary = MRotaryEmbedding(config.head_dim, config.rope_theta, config.mrope_section,
                                       config.mrope_interleaved)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens.embed(input_ids)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, attn: AttentionMetadata,
                kv_caches: list[torch.Tensor], vision_mask: torch.Tensor | None = None,
                deepstack: Sequence[torch.Tensor] = ()) -> torch.Tensor:
        """`deepstack[i]` (Qwen3-VL's DeepStack features, one row per `vision_mask` row) is added
        to the hidden states at the vision rows after layer i."""
        cos, sin = self.rotary.cos_sin(positions, x.dtype)
        residual = None
        for i, (layer, kv_cache) in enumerate(zip(self.layers, kv_caches)):
            x, residual = layer(x, residual, cos, sin, attn, kv_cache)
            if i < len(deepstack):
                x[vision_mask] += deepstack[i]
        return self.norm.add_and_norm(x, residual)[0]
