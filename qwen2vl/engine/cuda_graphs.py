"""Decode steps replayed from CUDA graphs.

A decode step of the 2B model launches about 15 kernels per decoder layer, each a few
microseconds of work at small batches; launched one by one from Python, the launches cost more
than the work. `DecodeGraphs` captures the whole forward (embedding to logits) once per
batch-size bucket over static input buffers, and a step replays the smallest bucket that holds
its batch: one launch. The padding rows of a bucket have context length 0 and slot -1, which the
Triton KV-write and decode-attention kernels skip, so they touch no sequence's cache.

The captured forward must take the Triton decode path (`kernels.decode_attention_runs`): the torch
attention path loops over the batch on the host. Without `capture` (the CPU, in tests) the same
padded static batch runs eagerly, which checks everything but the capture itself.
"""
from __future__ import annotations

import torch

from qwen2vl.layers.attention_metadata import AttentionMetadata


def graph_batch_sizes(max_batch: int) -> list[int]:
    """The buckets: 1, 2, 4, 8, then every 16 up to `max_batch` (itself included)."""
    sizes = [size for size in (1, 2, 4, 8) if size < max_batch] + list(range(16, max_batch, 16))
    return [*sizes, max_batch]


class DecodeGraphs:
    def __init__(self, model, kv_caches: list[torch.Tensor], *, max_batch: int, max_blocks_per_seq: int,
                 block_size: int, capture: bool = True):
        device = model.device
        self.model, self.kv_caches, self.block_size = model, kv_caches, block_size
        self.batch_sizes = graph_batch_sizes(max_batch)
        self.input_ids = torch.zeros(max_batch, dtype=torch.long, device=device)
        self.positions = torch.zeros(3, max_batch, dtype=torch.long, device=device)
        self.slot_mapping = torch.full((max_batch,), -1, dtype=torch.long, device=device)
        self.context_lens = torch.zeros(max_batch, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros(max_batch, max_blocks_per_seq, dtype=torch.int32, device=device)
        self.query_start_loc = torch.arange(max_batch + 1, dtype=torch.int32, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}
        if capture:
            self._capture()

    @property
    def max_batch(self) -> int:
        return self.batch_sizes[-1]

    def fits(self, attn: AttentionMetadata) -> bool:
        """Whether a batch can replay a graph: one new token per sequence, few enough sequences,
        block tables no wider than the static one."""
        return (max(attn.query_lens_cpu) == 1 and attn.num_seqs <= self.max_batch
                and attn.block_tables.shape[1] <= self.block_tables.shape[1])

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttentionMetadata) -> torch.Tensor:
        """Float32 logits `[B, vocab]` of a batch that `fits` (valid until the next `run`)."""
        batch = attn.num_seqs
        bucket = next(size for size in self.batch_sizes if size >= batch)
        self.input_ids[:batch].copy_(input_ids)
        self.positions[:, :batch].copy_(positions)
        self.slot_mapping[:batch].copy_(attn.slot_mapping)
        self.slot_mapping[batch:bucket].fill_(-1)
        self.context_lens[:batch].copy_(attn.context_lens)
        self.context_lens[batch:bucket].fill_(0)
        self.block_tables[:batch, :attn.block_tables.shape[1]].copy_(attn.block_tables)
        if bucket in self.graphs:
            self.graphs[bucket].replay()
            return self.logits[bucket][:batch]
        return self._forward(bucket)[:batch]

    def _forward(self, batch: int) -> torch.Tensor:
        attn = AttentionMetadata(
            query_start_loc=self.query_start_loc[:batch + 1],
            context_lens=self.context_lens[:batch],
            slot_mapping=self.slot_mapping[:batch],
            block_tables=self.block_tables[:batch],
            query_lens_cpu=[1] * batch,
            # Only the torch attention path reads these, and a graph never takes it.
            context_lens_cpu=[self.block_tables.shape[1] * self.block_size] * batch,
            block_size=self.block_size,
        )
        return self.model(self.input_ids[:batch], self.positions[:, :batch], attn, self.kv_caches)

    @torch.inference_mode()
    def _capture(self) -> None:
        """Largest bucket first, all in one memory pool (a step replays one graph at a time).
        Each bucket runs once before its capture, so Triton compiles outside it; the buffers
        hold padding then (context 0, slot -1), so that run writes no cache."""
        pool = None
        side = torch.cuda.Stream(self.model.device)
        for batch in reversed(self.batch_sizes):
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self._forward(batch)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.logits[batch] = self._forward(batch)
            pool = graph.pool()
            self.graphs[batch] = graph
