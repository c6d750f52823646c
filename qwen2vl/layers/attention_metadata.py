"""Batch metadata for one forward over a paged KV cache. Built by the model runner."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AttentionMetadata:
    """B sequences flattened into N new tokens, sequence after sequence.

    Sequence b contributes tokens `query_start_loc[b]:query_start_loc[b+1]`; they are the last
    `query_lens[b]` of its `context_lens[b]` tokens (cached ones plus these). Each new token's
    key/value is written at `slot_mapping[i] = block * block_size + offset` of every layer's
    cache; `block_tables[b]` lists sequence b's blocks (padded with -1).

    The `*_cpu` lists duplicate what the CPU loop needs, so it never syncs with the device.

    KV cache layout (allocated by the engine's model runner, one tensor per decoder layer):
    `[2, num_blocks, block_size, num_kv_heads, head_dim]` in the model's dtype, index 0 keys,
    1 values. Slot s lives at `[:, s // block_size, s % block_size]`.
    """

    query_start_loc: torch.Tensor  # [B+1] int32
    context_lens: torch.Tensor  # [B] int32 (int64 in the decode CUDA graphs' buffers)
    slot_mapping: torch.Tensor  # [N] int64
    block_tables: torch.Tensor  # [B, max_blocks] int32 (likewise)
    query_lens_cpu: list[int]
    context_lens_cpu: list[int]
    block_size: int

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens_cpu)
