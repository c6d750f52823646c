"""Runs a step's inputs through the model once and samples, on the device that holds the KV cache."""
from __future__ import annotations

import itertools

import torch

from qwen2vl import kernels
from qwen2vl.engine.cuda_graphs import DecodeGraphs
from qwen2vl.engine.step_batch import LaunchedStep, StepInputs, sampling_batch, step_inputs
from qwen2vl.engine.run_ahead import write_pending
from qwen2vl.engine.scheduler import StepPlan, VisionWork
from qwen2vl.layers.attention_metadata import AttentionMetadata
from qwen2vl.layers.patchify import VisionPixels
from qwen2vl.layers.sampler import Sampler, score_tokens


def kv_cache_bytes_per_block(num_layers: int, num_kv_heads: int, head_dim: int, block_size: int, dtype: torch.dtype) -> int:
    return 2 * num_layers * block_size * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


class ModelRunner:
    """Owns the KV caches (one `[2, num_blocks, block_size, kv_heads, head_dim]` tensor per
    decoder layer), the decode CUDA graphs and the sampler.

    `cuda_graphs` (default: on CUDA where the Triton decode path runs) replays decode batches of
    up to `max_num_seqs` sequences of up to `max_model_len` tokens from CUDA graphs; True on the
    CPU runs the same padded static batches eagerly (tests, with the Triton paths forced on)."""

    def __init__(self, model, *, num_blocks: int, block_size: int, max_num_seqs: int, max_model_len: int,
                 cuda_graphs: bool | None = None):
        text = model.config.text
        self.model = model
        self.device = model.device
        self.block_size = block_size
        self.vocab_size = text.vocab_size
        # Attention reads only the slots written before it (`context_lens`), so the pool needs no
        # zeroing; left untouched, its pages cost no memory until tokens fill them.
        self.kv_caches = [
            torch.empty(2, num_blocks, block_size, text.num_kv_heads, text.head_dim, dtype=model.dtype, device=model.device)
            for _ in range(text.num_layers)
        ]
        self.sampler = Sampler()
        graphs_run = kernels.cuda_graphs_run(self.device, model.dtype, text.head_dim)
        if cuda_graphs and self.device.type == "cuda" and not graphs_run:
            raise ValueError(f"CUDA graphs need float16/bfloat16 weights, Triton and a power-of-2 head size "
                             f"(found {model.dtype}, head size {text.head_dim}); pass cuda_graphs=False")
        cuda_graphs = graphs_run if cuda_graphs is None else cuda_graphs
        self.graphs = DecodeGraphs(model, self.kv_caches, max_batch=max_num_seqs,
                                   max_blocks_per_seq=-(-max_model_len // block_size), block_size=block_size,
                                   capture=self.device.type == "cuda") if cuda_graphs else None

    @torch.inference_mode()
    def encode_vision(self, works: list[VisionWork]) -> list[list[torch.Tensor]]:
        """Run the vision encoder once over the items of `works`, in order (same-sized images of
        different requests share their attention calls); each work's item embeddings."""
        items = [item for work in works for item in work.items]
        pixels = VisionPixels([item.pixels for item in items], items[0].patchifier)
        pixels = pixels.to(self.device, non_blocking=self.device.type == "cuda")
        grid_thw = torch.tensor([item.grid_thw for item in items], dtype=torch.long, device=self.device)
        merge = self.model.config.vision.spatial_merge_size
        embeds = iter(self.model.encode_vision(pixels, grid_thw).split([item.num_tokens(merge) for item in items]))
        return [[next(embeds) for _ in work.items] for work in works]

    @torch.inference_mode()
    def launch(self, plan: StepPlan, previous: LaunchedStep | None, vision_rows) -> LaunchedStep:
        """One forward over the plan's spans and the sampling of those that reach their
        request's last token, without waiting for the device. Input tokens still pending on the
        device are taken from `previous`; `vision_rows(request_id, start, end)` gives rows of a
        request's vision embeddings."""
        inputs = step_inputs(plan, block_size=self.block_size, vision_rows=vision_rows, previous=previous,
                             to_device=self.to_device)
        if self.graphs is not None and self.graphs.fits(inputs):
            logits = self.graphs.run(inputs)
            if len(inputs.logits_rows) < len(inputs.query_lens):  # a one-token span inside a prompt samples nothing
                logits = logits[inputs.logits_rows]
        else:
            logits = self._forward(inputs)
        scores = None
        if inputs.scored_index:
            scores = score_tokens(logits[self.to_device(inputs.scored_index, torch.long)],
                                  self.to_device(inputs.scored_targets, torch.long), inputs.scored_top)
            logits = logits[self.to_device(inputs.sample_index, torch.long)]
        if not plan.sampling:
            return LaunchedStep(plan, None, scores)
        sampling = sampling_batch(plan, previous, vocab_size=self.vocab_size, to_device=self.to_device)
        return LaunchedStep(plan, self.sampler(logits, sampling), scores)

    def _forward(self, inputs: StepInputs) -> torch.Tensor:
        input_ids = self.to_device(inputs.input_ids, torch.long)
        write_pending(inputs.pending, input_ids)
        return self.model(input_ids, self.to_device(inputs.positions), self._attention_metadata(inputs), self.kv_caches,
                          inputs.vision_embeds, inputs.vision_mask, self.to_device(inputs.logits_rows, torch.long))

    def _attention_metadata(self, inputs: StepInputs) -> AttentionMetadata:
        max_blocks = max(len(table) for table in inputs.block_tables)
        return AttentionMetadata(
            query_start_loc=self.to_device([0, *itertools.accumulate(inputs.query_lens)], torch.int32),
            context_lens=self.to_device(inputs.context_lens, torch.int32),
            slot_mapping=self.to_device(inputs.slot_mapping, torch.long),
            block_tables=self.to_device([table + [-1] * (max_blocks - len(table)) for table in inputs.block_tables],
                                        torch.int32),
            query_lens_cpu=inputs.query_lens,
            context_lens_cpu=inputs.context_lens,
            block_size=self.block_size,
        )

    def to_device(self, data, dtype: torch.dtype | None = None) -> torch.Tensor:
        """A host list or tensor on the model's device. On CUDA it goes through pinned memory
        without waiting: a step's dozen small inputs then cost no host-device round trip each."""
        cpu = data if isinstance(data, torch.Tensor) else torch.tensor(data, dtype=dtype)
        if self.device.type != "cuda":
            return cpu
        return cpu.pin_memory().to(self.device, non_blocking=True)
