"""The Qwen2 text decoder: GQA attention with q/k/v bias and M-RoPE, SwiGLU MLP, RMSNorm."""
from __future__ import annotations

import torch
from torch import nn

from qwen2vl.config import TextConfig
from qwen2vl.layers.activation import silu_and_mul
from qwen2vl.layers.attention import PagedAttention
from qwen2vl.layers.attention_metadata import AttentionMetadata
from qwen2vl.layers.linear import Linear
from qwen2vl.layers.norm import RMSNorm
from qwen2vl.layers.rotary import MRotaryEmbedding
from qwen2vl.layers.vocab import VocabTable


class DecoderAttention(nn.Module):
    def __init__(self, config: TextConfig):
        super().__init__()
        q_size, kv_size = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
        self.qkv_proj = Linear(config.hidden_size, [q_size, kv_size, kv_size], bias=True)
        self.o_proj = Linear(q_size, config.hidden_size, bias=False)
        self.attn = PagedAttention(config.num_heads, config.num_kv_heads, config.head_dim)

    def forward(self, x, cos, sin, attn: AttentionMetadata, kv_cache):
        return self.o_proj(self.attn(self.qkv_proj(x), cos, sin, kv_cache, attn).flatten(1))


class MLP(nn.Module):
    """SwiGLU: the decoder's (no bias) and Qwen2.5-VL's vision blocks' (with bias)."""

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool = False):
        super().__init__()
        self.gate_up_proj = Linear(hidden_size, [intermediate_size] * 2, bias=bias)
        self.down_proj = Linear(intermediate_size, hidden_size, bias=bias)

    def forward(self, x):
        return self.down_proj(silu_and_mul(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, config: TextConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = DecoderAttention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config.hidden_size, config.intermediate_size)

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
        self.rotary = MRotaryEmbedding(config.head_dim, config.rope_theta, config.mrope_section)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens.embed(input_ids)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, attn: AttentionMetadata,
                kv_caches: list[torch.Tensor]) -> torch.Tensor:
        cos, sin = self.rotary.cos_sin(positions, x.dtype)
        residual = None
        for layer, kv_cache in zip(self.layers, kv_caches):
            x, residual = layer(x, residual, cos, sin, attn, kv_cache)
        return self.norm.add_and_norm(x, residual)[0]
