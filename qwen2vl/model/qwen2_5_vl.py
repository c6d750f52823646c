"""Qwen2.5-VL: Qwen2-VL's text decoder and embedding scatter with its own vision tower.

What differs from Qwen2-VL is here and in its vision settings (`qwen2vl.config.Qwen2_5_VisionConfig`,
which also sets the time-aligned M-RoPE of videos: `tokens_per_second`, see
`qwen2vl.processor.mrope`): the tower (RMSNorm, a gated SiLU MLP with bias, a merger with
RMSNorm, attention within windows of `window_size` pixels except in the blocks
`fullatt_block_indexes`, which attend over whole frames).
"""
from __future__ import annotations

import functools
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from qwen2vl.config import Qwen2_5_VisionConfig
from qwen2vl.layers.attention import Segments
from qwen2vl.layers.linear import Linear
from qwen2vl.layers.norm import RMSNorm
from qwen2vl.layers.rotary import VisionRotaryEmbedding
from qwen2vl.model.qwen2_vl import Qwen2VLForConditionalGeneration
from qwen2vl.model.text import MLP
from qwen2vl.model.vision import PatchMerger, VisionAttention, frame_lengths, patch_rows_cols

VISION_NORM_EPS = 1e-6


def window_partition(grids: list[tuple[int, int, int]], merge_size: int, window: int) -> tuple[torch.Tensor, list[int]]:
    """(`order`, window lengths in patches): `order[i]` is the merged token (in the processor's
    order) placed i-th when each frame's merged tokens are regrouped window by window, windows of
    `window` x `window` merged tokens in row-major order (the last row / column of windows
    clipped); the lengths are those windows' sizes in patches, in that order."""
    order, lengths, first = [], [], 0
    for t, h, w in grids:
        rows, cols = h // merge_size, w // merge_size
        pad_rows, pad_cols = -rows % window, -cols % window
        index = torch.arange(t * rows * cols).view(t, rows, cols)
        index = F.pad(index, (0, pad_cols, 0, pad_rows), value=-1)
        index = index.view(t, (rows + pad_rows) // window, window, (cols + pad_cols) // window, window)
        index = index.permute(0, 1, 3, 2, 4).reshape(-1, window * window)
        real = index >= 0
        order.append(index[real] + first)
        lengths += [n * merge_size**2 for n in real.sum(1).tolist() if n]
        first += t * rows * cols
    return torch.cat(order), lengths


class Qwen2_5_VisionBlock(nn.Module):
    def __init__(self, config: Qwen2_5_VisionConfig):
        super().__init__()
        self.norm1 = RMSNorm(config.embed_dim, VISION_NORM_EPS)
        self.attn = VisionAttention(config.embed_dim, config.num_heads)
        self.norm2 = RMSNorm(config.embed_dim, VISION_NORM_EPS)
        self.mlp = MLP(config.embed_dim, config.mlp_hidden_size, bias=True)

    def forward(self, x, cos, sin, segments: Segments):
        x = x + self.attn(self.norm1(x), cos, sin, segments)
        return x + self.mlp(self.norm2(x))


class Qwen2_5_VisionTransformer(nn.Module):
    def __init__(self, config: Qwen2_5_VisionConfig):
        super().__init__()
        self.config = config
        self.merge_size = config.spatial_merge_size
        # The checkpoints' Conv3d with stride = kernel is a linear map of each flattened patch.
        self.patch_embed = Linear(config.patch_dim, config.embed_dim, bias=False)
        self.rotary = VisionRotaryEmbedding(config.head_dim, config.rope_theta)
        self.blocks = nn.ModuleList(Qwen2_5_VisionBlock(config) for _ in range(config.depth))
        self.merger = PatchMerger(config, norm=functools.partial(RMSNorm, eps=VISION_NORM_EPS))

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """pixel_values `[P, patch_dim]`, grid_thw `[n, 3]` -> `[P / merge_size^2, hidden_size]`.

        The blocks see the patches regrouped window by window (each merged token's patches stay
        adjacent, and each frame's windows stay within the frame's rows, so whole-frame attention
        needs no other order); the merger's rows are put back in the processor's order."""
        grids = [tuple(g) for g in grid_thw.tolist()]
        device = pixel_values.device
        order, window_lengths = window_partition(grids, self.merge_size, self.config.window_merged_tokens)
        order = order.to(device)
        frames, windows = Segments(frame_lengths(grids), device), Segments(window_lengths, device)
        regroup = functools.partial(self._regroup, order=order)
        cos, sin = map(regroup, self.rotary.cos_sin(patch_rows_cols(grids, self.merge_size).to(device)))
        x = regroup(self.patch_embed(pixel_values.to(self.patch_embed.weight.dtype)))
        full_attention = set(self.config.fullatt_block_indexes)
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, frames if i in full_attention else windows)
        return self.merger(x)[torch.argsort(order)]

    def _regroup(self, rows: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
        """Rows `[P, ...]` in merged-token `order` (each token's merge_size^2 patches together)."""
        unit = self.merge_size**2
        return rows.unflatten(0, (-1, unit))[order].flatten(0, 1)


class Qwen2_5_VLForConditionalGeneration(Qwen2VLForConditionalGeneration):
    vision_tower = Qwen2_5_VisionTransformer


def vision_checkpoint_tensors(vision: Qwen2_5_VisionConfig) -> Iterator[tuple[str, tuple[int, ...], str]]:
    """(name, shape, role) of the vision tower's checkpoint tensors; role: "patch" (the patch embedding),
    "matrix", "bias" or "norm"."""
    e, hidden = vision.embed_dim, vision.mlp_hidden_size
    yield ("visual.patch_embed.proj.weight",
           (e, vision.in_channels, vision.temporal_patch_size, vision.patch_size, vision.patch_size), "patch")
    for i in range(vision.depth):
        p = f"visual.blocks.{i}"
        yield f"{p}.norm1.weight", (e,), "norm"
        yield f"{p}.norm2.weight", (e,), "norm"
        for name, out_features, in_features in (("attn.qkv", 3 * e, e), ("attn.proj", e, e), ("mlp.gate_proj", hidden, e),
                                                ("mlp.up_proj", hidden, e), ("mlp.down_proj", e, hidden)):
            yield f"{p}.{name}.weight", (out_features, in_features), "matrix"
            yield f"{p}.{name}.bias", (out_features,), "bias"
    window = e * vision.spatial_merge_size**2
    yield "visual.merger.ln_q.weight", (e,), "norm"
    for name, out_features in (("mlp.0", window), ("mlp.2", vision.hidden_size)):
        yield f"visual.merger.{name}.weight", (out_features, window), "matrix"
        yield f"visual.merger.{name}.bias", (out_features,), "bias"
