"""Qwen3-VL: Qwen2-VL's glue and the shared decoder (with Qwen3's flags: q/k RMSNorm, no q/k/v
bias, interleaved M-RoPE, see `qwen2vl.config.TextConfig`), and its own vision tower.

What differs from Qwen2-VL is here and in its vision settings (`qwen2vl.config.Qwen3VisionConfig`):
the tower's patch embedding has a bias; learned position embeddings on a square grid are
resampled bilinearly to each image's patch grid and added to the patches; the blocks are
Qwen2-VL's (LayerNorm, GELU-tanh MLP, whole-frame attention with 2D rotary); and DeepStack: after
each block of `deepstack_visual_indexes` a merger of its own (normalizing whole merged windows)
turns the hidden states into features that the decoder adds at the vision rows after its first
layers. The tower returns them beside the main embeddings, on the same rows (see
`Qwen2VLForConditionalGeneration.forward`), so they go wherever the embeddings go: the engine's
vision cache, chunked prefills and prefix-cached prompts take a span of rows as they are.
"""
from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from qwen2vl.config import Qwen3VisionConfig
from qwen2vl.layers.attention import Segments
from qwen2vl.layers.linear import Linear
from qwen2vl.layers.rotary import VisionRotaryEmbedding
from qwen2vl.model.qwen2_vl import Qwen2VLForConditionalGeneration
from qwen2vl.model.vision import PatchMerger, VisionBlock, block_tensors, frame_lengths, patch_rows_cols

# Our names -> the checkpoint's (original layout), first match wins; `*` is a block or merger index.
WEIGHT_RENAMES = (
    ("language_model.", "model."),
    ("visual.patch_embed", "visual.patch_embed.proj"),
    ("visual.blocks.*.mlp.fc", "visual.blocks.*.mlp.linear_fc"),
    ("visual.merger.ln_q", "visual.merger.norm"),
    ("visual.merger.fc", "visual.merger.linear_fc"),
    ("visual.deepstack_merger_list.*.ln_q", "visual.deepstack_merger_list.*.norm"),
    ("visual.deepstack_merger_list.*.fc", "visual.deepstack_merger_list.*.linear_fc"),
)


def position_interpolation(height: int, width: int, side: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices, weights), each `[4, height, width]`: the four learned positions of a `side` x
    `side` grid around each patch of a `height` x `width` grid, with their bilinear weights, the
    corners of both grids aligned (the patch at row r samples the learned grid at row
    r (side - 1) / (height - 1))."""
    rows = torch.linspace(0, side - 1, height, device=device)
    cols = torch.linspace(0, side - 1, width, device=device)
    row0, col0 = rows.long(), cols.long()
    row1, col1 = (row0 + 1).clamp(max=side - 1), (col0 + 1).clamp(max=side - 1)
    dr, dc = (rows - row0)[:, None], (cols - col0)[None, :]
    indices = torch.stack([r[:, None] * side + c[None, :] for r in (row0, row1) for c in (col0, col1)])
    weights = torch.stack([(1 - dr) * (1 - dc), (1 - dr) * dc, dr * (1 - dc), dr * dc])
    return indices, weights


class Qwen3VisionTransformer(nn.Module):
    def __init__(self, config: Qwen3VisionConfig):
        super().__init__()
        self.config = config
        self.merge_size = config.spatial_merge_size
        # The checkpoints' Conv3d with stride = kernel is a linear map of each flattened patch.
        self.patch_embed = Linear(config.patch_dim, config.embed_dim, bias=True)
        self.pos_embed = nn.Embedding(config.num_position_embeddings, config.embed_dim)
        self.rotary = VisionRotaryEmbedding(config.head_dim, config.rope_theta)
        self.blocks = nn.ModuleList(VisionBlock(config) for _ in range(config.depth))
        self.merger = PatchMerger(config)
        self.deepstack_merger_list = nn.ModuleList(PatchMerger(config, postshuffle_norm=True)
                                                   for _ in config.deepstack_visual_indexes)

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """pixel_values `[P, patch_dim]`, grid_thw `[n, 3]` -> `[P / merge_size^2, hidden_size x
        (1 + len(deepstack_visual_indexes))]`: each merged token's embedding, then its DeepStack
        features in the order of the blocks they come from."""
        grids = [tuple(g) for g in grid_thw.tolist()]
        device = pixel_values.device
        frames = Segments(frame_lengths(grids), device)
        cos, sin = self.rotary.cos_sin(patch_rows_cols(grids, self.merge_size).to(device))
        x = self.patch_embed(pixel_values.to(self.patch_embed.weight.dtype)) + self.positions(grids, device)
        deepstack = []
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, frames)
            if i in self.config.deepstack_visual_indexes:
                deepstack.append(self.deepstack_merger_list[self.config.deepstack_visual_indexes.index(i)](x))
        return torch.cat([self.merger(x), *deepstack], dim=-1)

    def positions(self, grids: list[tuple[int, int, int]], device) -> torch.Tensor:
        """The learned position embedding of every patch, `[P, embed_dim]`, in the processor's
        order: the grid resampled to each item's (height, width), the same for all its frames."""
        table = self.pos_embed.weight
        pieces = []
        for t, h, w in grids:
            indices, weights = position_interpolation(h, w, self.config.position_grid_side, device)
            grid = (table[indices] * weights[..., None].to(table.dtype)).sum(0)
            rows, cols = patch_rows_cols([(t, h, w)], self.merge_size).to(device).unbind(-1)
            pieces.append(grid[rows, cols])
        return torch.cat(pieces)


class Qwen3VLForConditionalGeneration(Qwen2VLForConditionalGeneration):
    vision_tower = Qwen3VisionTransformer


def vision_checkpoint_tensors(vision: Qwen3VisionConfig) -> Iterator[tuple[str, tuple[int, ...], str]]:
    """(name, shape, role) of the vision tower's checkpoint tensors; role: "patch" (the patch embedding),
    "matrix", "bias" or "norm"."""
    e, hidden = vision.embed_dim, vision.mlp_hidden_size
    yield ("visual.patch_embed.proj.weight",
           (e, vision.in_channels, vision.temporal_patch_size, vision.patch_size, vision.patch_size), "patch")
    yield "visual.patch_embed.proj.bias", (e,), "bias"
    yield "visual.pos_embed.weight", (vision.num_position_embeddings, e), "matrix"
    for i in range(vision.depth):
        yield from block_tensors(f"visual.blocks.{i}", e, hidden, ("mlp.linear_fc1", "mlp.linear_fc2"))
    window = e * vision.spatial_merge_size**2
    mergers = [("visual.merger", e)] + [(f"visual.deepstack_merger_list.{i}", window)
                                        for i in range(len(vision.deepstack_visual_indexes))]
    for prefix, norm_size in mergers:
        yield f"{prefix}.norm.weight", (norm_size,), "norm"
        yield f"{prefix}.norm.bias", (norm_size,), "bias"
        for name, out_features in (("linear_fc1", window), ("linear_fc2", vision.hidden_size)):
            yield f"{prefix}.{name}.weight", (out_features, window), "matrix"
            yield f"{prefix}.{name}.bias", (out_features,), "bias"
