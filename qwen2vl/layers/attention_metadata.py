"""Batch metadata for one forward over a paged KV cache. Built by the model runner."""
from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass

import torch


class Segments:
    """Where the segments of a packed sequence lie (each attends only within itself), grouped by
    length: `groups` holds `(positions [count * length], count, length)` per distinct length, so
    that same-sized images, the frames of a video, and same-length prompts, are one batched
    attention call. Segments follow each other from row 0, or start at `starts`."""

    def __init__(self, lengths: list[int], device: torch.device | str = "cpu", starts: list[int] | None = None):
        starts_by_length: dict[int, list[int]] = {}
        for start, length in zip(itertools.accumulate(lengths, initial=0) if starts is None else starts, lengths):
            starts_by_length.setdefault(length, []).append(start)
        self.groups = [((torch.tensor(group)[:, None] + torch.arange(length)).flatten().to(device), len(group), length)
                       for length, group in starts_by_length.items()]


@dataclass
class AttentionMetadata:
    """B sequences flattened into N new tokens, sequence after sequence.

    Sequence b contributes tokens `query_start_loc[b]:query_start_loc[b+1]`; they are the last
    `query_lens[b]` of its `context_lens[b]` tokens (cached ones plus these). Each new token's
    key/value is written at `slot_mapping[i] = block * block_size + offset` of every layer's
    cache; `block_tables[b]` lists sequence b's blocks (padded with -1).

    The `*_cpu` lists duplicate what the CPU loop needs, so it never syncs with the device.
    `context_lens_cpu` is None in a replayed CUDA graph, whose lengths change on the device
    between replays: only the Triton decode path (which reads `context_lens`) runs there.

    KV cache layout (allocated by the engine's model runner, one tensor per decoder layer):
    `[2, num_blocks, block_size, num_kv_heads, head_dim]` in the model's dtype, index 0 keys,
    1 values. Slot s lives at `[:, s // block_size, s % block_size]`.
    """

    query_start_loc: torch.Tensor  # [B+1] int32
    context_lens: torch.Tensor  # [B] int32 (int64 in the decode CUDA graphs' buffers)
    slot_mapping: torch.Tensor  # [N] int64
    block_tables: torch.Tensor  # [B, max_blocks] int32 (likewise)
    query_lens_cpu: list[int]
    context_lens_cpu: list[int] | None
    block_size: int

    @functools.cached_property
    def query_starts_cpu(self) -> list[int]:
        """`query_start_loc` on the host: sequence b's rows are `[starts[b], starts[b + 1])`."""
        return list(itertools.accumulate(self.query_lens_cpu, initial=0))

    @functools.cached_property
    def whole_prompts(self) -> Segments:
        """The sequences whose tokens this step are all their tokens (a prompt from its start),
        as segments of the step's rows grouped by length; built once per forward, on first use."""
        starts = self.query_starts_cpu
        whole = [b for b, (query_len, context_len) in enumerate(zip(self.query_lens_cpu, self.context_lens_cpu))
                 if query_len == context_len]
        return Segments([self.query_lens_cpu[b] for b in whole], self.slot_mapping.device,
                        starts=[starts[b] for b in whole])

    @functools.cached_property
    def decode_rows(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The rows of the sequences with one new token after cached ones, and those sequences'
        indices, on the device; None if there are none. Built once per forward, on first use."""
        starts = self.query_starts_cpu
        seqs = [b for b, (query_len, context_len) in enumerate(zip(self.query_lens_cpu, self.context_lens_cpu))
                if query_len == 1 < context_len]
        if not seqs:
            return None
        device = self.slot_mapping.device
        return torch.tensor([starts[b] for b in seqs], device=device), torch.tensor(seqs, device=device)
