"""Qwen2-VL: the vision tower's embeddings scattered into the text decoder's input."""
from __future__ import annotations

import torch
from torch import nn

from qwen2vl.config import Qwen2VLConfig
from qwen2vl.layers.attention_metadata import AttentionMetadata
from qwen2vl.layers.patchify import VisionPixels, patch_rows
from qwen2vl.layers.vocab import VocabTable
from qwen2vl.model.text import TextDecoder
from qwen2vl.model.vision import VisionTransformer

# Our tensor/module names -> checkpoint names (original layout), first match wins.
WEIGHT_RENAMES = (
    ("language_model.", "model."),
    ("visual.patch_embed", "visual.patch_embed.proj"),
    ("visual.merger.fc1", "visual.merger.mlp.0"),
    ("visual.merger.fc2", "visual.merger.mlp.2"),
)


class Qwen2VLForConditionalGeneration(nn.Module):
    """The family's model: an architecture's vision tower (`vision_tower`, built from
    `config.vision`) feeding the shared Qwen2 text decoder."""

    vision_tower: type[nn.Module] = VisionTransformer

    def __init__(self, config: Qwen2VLConfig):
        super().__init__()
        self.config = config
        self.visual = self.vision_tower(config.vision)
        self.language_model = TextDecoder(config.text)
        if not config.text.tie_word_embeddings:
            self.lm_head = VocabTable(config.text.vocab_size, config.text.hidden_size)

    @property
    def head(self) -> nn.Module:
        """The vocabulary table the logits come from (the embeddings' own when tied)."""
        return self.language_model.embed_tokens if self.config.text.tie_word_embeddings else self.lm_head

    @property
    def dtype(self) -> torch.dtype:
        """The text decoder's compute dtype, which is also the KV cache's."""
        return self.language_model.embed_tokens.dtype

    @property
    def device(self) -> torch.device:
        return self.language_model.norm.weight.device

    def encode_vision(self, pixel_values: torch.Tensor | VisionPixels, grid_thw: torch.Tensor) -> torch.Tensor:
        """Images and videos packed in one call -> `[P / merge^2, text hidden x (1 + DeepStack
        features)]` (see `forward`), rows in input order.
        `VisionPixels` (resized frames) are normalized and patchified here, in the tower's dtype."""
        pixel_values = patch_rows(pixel_values, self.visual.patch_embed.weight.dtype)
        return self.visual(pixel_values, grid_thw).to(self.dtype)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttentionMetadata,
                kv_caches: list[torch.Tensor], vision_embeds: torch.Tensor | None = None,
                vision_mask: torch.Tensor | None = None,
                logits_indices: torch.Tensor | None = None) -> torch.Tensor:
        """Float32 logits `[R, vocab]` of the rows `logits_indices` (all rows when None).

        A row of `vision_embeds` is the embedding of the pad token at the same `vision_mask` row,
        followed by that token's DeepStack features where the tower has any (Qwen3-VL): each as
        wide as the text model, the i-th added to the hidden states after decoder layer i."""
        x = self.language_model.embed(input_ids)
        deepstack = ()
        if vision_embeds is not None:
            vision_embeds, *deepstack = vision_embeds.to(x.dtype).split(self.config.text.hidden_size, dim=-1)
            x[vision_mask] = vision_embeds
        x = self.language_model(x, positions, attn, kv_caches, vision_mask, deepstack)
        if logits_indices is not None:
            x = x[logits_indices]
        return self.head.logits(x)
