"""One sequence through a loaded model in a single prefill over a fresh KV cache: how the
benchmarks check a model's logits without the engine."""
from __future__ import annotations

import torch

from qwen2vl.layers.attention_metadata import AttentionMetadata


@torch.no_grad()
def prefill_logits(model, input_ids: torch.Tensor, positions: torch.Tensor, vision_embeds: torch.Tensor | None = None,
                   vision_mask: torch.Tensor | None = None, logits_indices: torch.Tensor | None = None,
                   block_size: int = 16) -> torch.Tensor:
    """Float32 logits of `model` (a `Qwen2VLForConditionalGeneration`) at `logits_indices` (all
    rows when None) for `input_ids [L]` at M-RoPE `positions [3, L]`."""
    device, text, n = model.device, model.config.text, len(input_ids)
    num_blocks = -(-n // block_size)
    caches = [torch.zeros(2, num_blocks, block_size, text.num_kv_heads, text.head_dim, dtype=model.dtype,
                          device=device) for _ in range(text.num_layers)]
    attn = AttentionMetadata(
        query_start_loc=torch.tensor([0, n], dtype=torch.int32, device=device),
        context_lens=torch.tensor([n], dtype=torch.int32, device=device),
        slot_mapping=torch.arange(n, device=device),
        block_tables=torch.arange(num_blocks, dtype=torch.int32, device=device)[None],
        query_lens_cpu=[n], context_lens_cpu=[n], block_size=block_size)
    to_device = lambda t: None if t is None else t.to(device)  # noqa: E731
    return model(input_ids.to(device), positions.to(device), attn, caches, to_device(vision_embeds),
                 to_device(vision_mask), to_device(logits_indices))
