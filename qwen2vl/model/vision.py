"""The Qwen2-VL vision tower: patch embedding, ViT blocks with 2D rotary, patch merger."""
from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import nn

from qwen2vl.config import VisionConfig
from qwen2vl.layers.activation import ACTIVATIONS, gelu
from qwen2vl.layers.attention import Segments, packed_attention
from qwen2vl.layers.linear import Linear
from qwen2vl.layers.norm import LayerNorm
from qwen2vl.layers.rotary import VisionRotaryEmbedding, apply_rotary


def patch_rows_cols(grid_thw: list[tuple[int, int, int]], merge_size: int) -> torch.Tensor:
    """(row, col) of every patch, `[P, 2]`, in the processor's order: frame by frame, each frame
    in merge_size x merge_size windows (so the merger sees each window's patches adjacent)."""
    coords = []
    for t, h, w in grid_thw:
        rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        frame = torch.stack((rows, cols), dim=-1)
        frame = frame.reshape(h // merge_size, merge_size, w // merge_size, merge_size, 2).transpose(1, 2)
        coords.append(frame.reshape(-1, 2).repeat(t, 1))
    return torch.cat(coords)


def frame_lengths(grid_thw: list[tuple[int, int, int]]) -> list[int]:
    """Patches per frame, frame by frame: patches attend only within their own frame."""
    return [h * w for t, h, w in grid_thw for _ in range(t)]


class VisionAttention(nn.Module):
    def __init__(self, embed_dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = Linear(embed_dim, 3 * embed_dim, bias=True)
        self.proj = Linear(embed_dim, embed_dim, bias=True)

    def forward(self, x, cos, sin, frames: Segments):
        q, k, v = self.qkv(x).unflatten(-1, (3, self.num_heads, -1)).unbind(1)
        q = apply_rotary(q.float(), cos, sin).to(x.dtype)
        k = apply_rotary(k.float(), cos, sin).to(x.dtype)
        return self.proj(packed_attention(q, k, v, frames).flatten(1))


class VisionMLP(nn.Module):
    def __init__(self, embed_dim: int, hidden_size: int, act: str):
        super().__init__()
        self.fc1 = Linear(embed_dim, hidden_size, bias=True)
        self.fc2 = Linear(hidden_size, embed_dim, bias=True)
        self.act = ACTIVATIONS[act]

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class VisionBlock(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.norm1 = LayerNorm(config.embed_dim)
        self.attn = VisionAttention(config.embed_dim, config.num_heads)
        self.norm2 = LayerNorm(config.embed_dim)
        self.mlp = VisionMLP(config.embed_dim, config.mlp_hidden_size, config.hidden_act)

    def forward(self, x, cos, sin, frames: Segments):
        x = x + self.attn(self.norm1(x), cos, sin, frames)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    """Concatenates each merge_size x merge_size window of patches and projects it to the text width.
    The norm is of each patch, or with `postshuffle_norm` of each concatenated window (Qwen3-VL's
    DeepStack mergers)."""

    def __init__(self, config: VisionConfig, norm: Callable[[int], nn.Module] = LayerNorm,
                 postshuffle_norm: bool = False):
        super().__init__()
        self.window_dim = config.embed_dim * config.spatial_merge_size**2
        self.postshuffle_norm = postshuffle_norm
        self.ln_q = norm(self.window_dim if postshuffle_norm else config.embed_dim)
        self.fc1 = Linear(self.window_dim, self.window_dim, bias=True)
        self.fc2 = Linear(self.window_dim, config.hidden_size, bias=True)

    def forward(self, x):
        if self.postshuffle_norm:
            windows = self.ln_q(x.reshape(-1, self.window_dim))
        else:
            windows = self.ln_q(x).reshape(-1, self.window_dim)
        return self.fc2(gelu(self.fc1(windows)))


class VisionTransformer(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.merge_size = config.spatial_merge_size
        # The checkpoints' Conv3d with stride = kernel is a linear map of each flattened patch.
        self.patch_embed = Linear(config.patch_dim, config.embed_dim, bias=False)
        self.rotary = VisionRotaryEmbedding(config.head_dim, config.rope_theta)
        self.blocks = nn.ModuleList(VisionBlock(config) for _ in range(config.depth))
        self.merger = PatchMerger(config)

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """pixel_values `[P, patch_dim]`, grid_thw `[n, 3]` -> `[P / merge_size^2, hidden_size]`."""
        grids = [tuple(g) for g in grid_thw.tolist()]
        frames = Segments(frame_lengths(grids), pixel_values.device)
        cos, sin = self.rotary.cos_sin(patch_rows_cols(grids, self.merge_size).to(pixel_values.device))
        x = self.patch_embed(pixel_values.to(self.patch_embed.weight.dtype))
        for block in self.blocks:
            x = block(x, cos, sin, frames)
        return self.merger(x)


def block_tensors(prefix: str, width: int, mlp_width: int, mlp_names: tuple[str, str]
                  ) -> Iterator[tuple[str, tuple[int, ...], str]]:
    """(name, shape, role) of one LayerNorm vision block's tensors (Qwen2-VL's, Qwen3-VL's): the
    norms, the attention's qkv and proj, the MLP's two linears (`mlp_names`), each with a bias."""
    for norm in ("norm1", "norm2"):
        yield f"{prefix}.{norm}.weight", (width,), "norm"
        yield f"{prefix}.{norm}.bias", (width,), "bias"
    for name, out_features, in_features in (("attn.qkv", 3 * width, width), ("attn.proj", width, width),
                                            (mlp_names[0], mlp_width, width), (mlp_names[1], width, mlp_width)):
        yield f"{prefix}.{name}.weight", (out_features, in_features), "matrix"
        yield f"{prefix}.{name}.bias", (out_features,), "bias"


def vision_checkpoint_tensors(vision: VisionConfig) -> Iterator[tuple[str, tuple[int, ...], str]]:
    """(name, shape, role) of the vision tower's checkpoint tensors; role: "patch" (the patch embedding),
    "matrix", "bias" or "norm"."""
    e = vision.embed_dim
    yield ("visual.patch_embed.proj.weight",
           (e, vision.in_channels, vision.temporal_patch_size, vision.patch_size, vision.patch_size), "patch")
    for i in range(vision.depth):
        yield from block_tensors(f"visual.blocks.{i}", e, vision.mlp_hidden_size, ("mlp.fc1", "mlp.fc2"))
    window = e * vision.spatial_merge_size**2
    yield "visual.merger.ln_q.weight", (e,), "norm"
    yield "visual.merger.ln_q.bias", (e,), "bias"
    for name, out_features in (("mlp.0", window), ("mlp.2", vision.hidden_size)):
        yield f"visual.merger.{name}.weight", (out_features, window), "matrix"
        yield f"visual.merger.{name}.bias", (out_features,), "bias"
