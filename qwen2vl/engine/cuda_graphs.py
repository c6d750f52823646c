"""Decode steps replayed from CUDA graphs.

A decode step of the 2B model launches about 15 kernels per decoder layer, each a few
microseconds of work at small batches; launched one by one from Python, the launches cost more
than the work. `DecodeGraphs` captures the whole forward (embedding to logits) once per
batch-size bucket over static input buffers, and a step replays the smallest bucket that holds
its batch: one launch. The padding rows of a bucket have context length 0 and slot -1, which the
Triton KV-write and decode-attention kernels skip, so they touch no sequence's cache.

A step's inputs are written on the host into one pinned staging buffer laid out like the static
buffers (token, three M-RoPE positions, slot and context length per row; then the block tables),
and reach the device in two asynchronous copies: no per-field transfer, no copy kernel.

The captured forward must take the Triton decode path (`kernels.decode_attention_runs`): the torch
attention path loops over the batch on the host. Without `capture` (the CPU, in tests) the same
padded static batch runs eagerly, which checks everything but the capture itself.
"""
from __future__ import annotations

import torch

from qwen2vl.engine.step_batch import StepInputs
from qwen2vl.engine.run_ahead import write_pending
from qwen2vl.layers.attention_metadata import AttentionMetadata

TOKEN, POSITIONS, SLOT, CONTEXT = 0, slice(1, 4), 4, 5  # rows of the per-sequence fields
NUM_FIELDS = 6


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
        self.max_blocks = max_blocks_per_seq
        # int64 throughout: the kernels read context lengths and block tables of either width.
        self.fields = torch.zeros(NUM_FIELDS, max_batch, dtype=torch.long, device=device)
        self.fields[SLOT] = -1
        self.block_tables = torch.zeros(max_batch, max_blocks_per_seq, dtype=torch.long, device=device)
        staging = torch.zeros(NUM_FIELDS * max_batch + max_batch * max_blocks_per_seq, dtype=torch.long,
                              pin_memory=device.type == "cuda")
        self.staged_fields = staging[:NUM_FIELDS * max_batch].view(NUM_FIELDS, max_batch)
        self.staged_tables = staging[NUM_FIELDS * max_batch:].view(max_batch, max_blocks_per_seq)
        # Marks when the last step's copies out of the staging buffer are done (before rewriting it).
        self.staging_free = torch.cuda.Event() if device.type == "cuda" else None
        self.device = device
        self.query_start_loc = torch.arange(max_batch + 1, dtype=torch.int32, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}
        if capture:
            self._capture()

    @property
    def max_batch(self) -> int:
        return self.batch_sizes[-1]

    def fits(self, inputs: StepInputs) -> bool:
        """Whether a step can replay a graph: a decode step of few enough sequences whose block
        tables are no wider than the static one."""
        return (inputs.is_decode and len(inputs.query_lens) <= self.max_batch
                and max(len(table) for table in inputs.block_tables) <= self.max_blocks)

    def run(self, inputs: StepInputs) -> torch.Tensor:
        """Float32 logits `[B, vocab]` of a step that `fits` (valid until the next `run`)."""
        if self.staging_free is not None:
            self.staging_free.synchronize()  # done long ago when the last step's tokens were read
        batch = len(inputs.query_lens)
        bucket = next(size for size in self.batch_sizes if size >= batch)
        fields, tables = self.staged_fields.numpy(), self.staged_tables.numpy()
        fields[TOKEN, :batch] = inputs.input_ids
        fields[POSITIONS, :batch] = inputs.positions.numpy()
        fields[SLOT, :batch] = inputs.slot_mapping
        fields[CONTEXT, :batch] = inputs.context_lens
        fields[SLOT, batch:bucket], fields[CONTEXT, batch:bucket] = -1, 0
        for row, table in enumerate(inputs.block_tables):
            tables[row, :len(table)] = table
        self.fields.copy_(self.staged_fields, non_blocking=True)
        self.block_tables[:bucket].copy_(self.staged_tables[:bucket], non_blocking=True)
        write_pending(inputs.pending, self.fields[TOKEN])
        if self.staging_free is not None:
            self.staging_free.record(torch.cuda.current_stream(self.device))
        if bucket in self.graphs:
            self.graphs[bucket].replay()
            return self.logits[bucket][:batch]
        return self._forward(bucket)[:batch]

    def _forward(self, batch: int) -> torch.Tensor:
        attn = AttentionMetadata(
            query_start_loc=self.query_start_loc[:batch + 1],
            context_lens=self.fields[CONTEXT, :batch],
            slot_mapping=self.fields[SLOT, :batch],
            block_tables=self.block_tables[:batch],
            query_lens_cpu=[1] * batch,
            context_lens_cpu=None,  # the replayed lengths are on the device only
            block_size=self.block_size,
        )
        return self.model(self.fields[TOKEN, :batch], self.fields[POSITIONS, :batch], attn, self.kv_caches)

    @torch.inference_mode()
    def _capture(self) -> None:
        """Largest bucket first, all in one memory pool (a step replays one graph at a time).
        Each bucket runs once before its capture, so Triton compiles outside it; the buffers
        hold padding then (context 0, slot -1), so that run writes no cache."""
        pool = None
        with torch.cuda.device(self.device):
            for batch in reversed(self.batch_sizes):
                # Warm-up on the current stream, capture on torch's shared capture stream: no new
                # stream per engine (each stream keeps a cuBLAS workspace of its own).
                self._forward(batch)
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    self.logits[batch] = self._forward(batch)
                pool = graph.pool()
                self.graphs[batch] = graph
