"""Turns a scheduled step into one batch, runs the model once, and samples."""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from qwen2vl import kernels
from qwen2vl.engine.cuda_graphs import DecodeGraphs
from qwen2vl.engine.scheduler import ScheduledChunk, slot_mapping, step_positions, step_tokens
from qwen2vl.engine.sequence import Sequence
from qwen2vl.layers.attention_metadata import AttentionMetadata
from qwen2vl.layers.sampler import LogitBias, Sampler, SamplerOutput, SamplingBatch


@dataclass
class SampledToken:
    token_id: int
    logprobs: dict[int, float] | None  # the sampled token's and the top-k, when asked


@dataclass
class LaunchedStep:
    """A step's sampled tokens, still on the device: `out.token_ids[r]` is the next token of
    `seqs[r]`. `result()` reads them back (and waits for the device); until then a next step can
    be launched that takes them as its input tokens there."""

    seqs: list[Sequence]
    out: SamplerOutput

    def __post_init__(self):
        self.row_of = {seq: row for row, seq in enumerate(self.seqs)}

    def result(self) -> list[SampledToken]:
        token_ids = self.out.token_ids.tolist()
        if self.out.logprobs is None:
            return [SampledToken(token_id, None) for token_id in token_ids]
        sampled_logprobs = self.out.logprobs.tolist()
        top_ids, top_logprobs = self.out.top_ids.tolist(), self.out.top_logprobs.tolist()
        sampled = []
        for row, seq in enumerate(self.seqs):
            logprobs = None
            if seq.params.logprobs is not None:
                k = seq.params.logprobs
                logprobs = {token_ids[row]: sampled_logprobs[row]}
                logprobs.update(zip(top_ids[row][:k], top_logprobs[row][:k]))
            sampled.append(SampledToken(token_ids[row], logprobs))
        return sampled


def kv_cache_bytes_per_block(num_layers: int, num_kv_heads: int, head_dim: int, block_size: int, dtype: torch.dtype) -> int:
    return 2 * num_layers * block_size * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


class ModelRunner:
    """Owns the KV caches (one `[2, num_blocks, block_size, kv_heads, head_dim]` tensor per
    decoder layer), the decode CUDA graphs and the sampler; builds each step's batch from the
    scheduled chunks.

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
    def encode_vision(self, seqs: list[Sequence]) -> None:
        """Run the vision encoder once over all images and videos of `seqs`, in prompt order
        (so same-sized images of different requests share their attention calls), and give
        each sequence its rows."""
        items = [item for seq in seqs for item in seq.prompt.vision_items]
        pixel_values = torch.cat([item.pixel_values for item in items]).to(self.device)
        grid_thw = torch.tensor([item.grid_thw for item in items], dtype=torch.long, device=self.device)
        embeds = self.model.encode_vision(pixel_values, grid_thw)
        expected = [seq.num_vision_tokens for seq in seqs]
        if embeds.shape[0] != sum(expected):
            raise ValueError(
                f"the vision encoder returned {embeds.shape[0]} embeddings for "
                f"{sum(expected)} image/video pad tokens in the prompt(s)"
            )
        for seq, rows in zip(seqs, embeds.split(expected)):
            seq.vision_embeds = rows

    @torch.inference_mode()
    def launch(self, chunks: list[ScheduledChunk], previous: LaunchedStep | None = None) -> LaunchedStep | None:
        """One forward over all chunks and the sampling of those that reach their sequence's
        end, without waiting for the device; None if no chunk samples. A chunk whose input token
        is still pending (sampled by `previous`, not read back) takes it from there."""
        sampling = [chunk.seq for chunk in chunks if chunk.samples]
        pending = self._pending_inputs(chunks, previous)
        if self.graphs is not None and self.graphs.fits(chunks):
            logits = self.graphs.run(chunks, pending)
            if len(sampling) < len(chunks):  # a one-token chunk inside a prompt samples nothing
                logits = logits[[row for row, chunk in enumerate(chunks) if chunk.samples]]
        else:
            logits = self._forward(chunks, pending)
        return LaunchedStep(sampling, self.sampler(logits, self._sampling_batch(sampling, previous))) if sampling else None

    def _pending_inputs(self, chunks: list[ScheduledChunk], previous: LaunchedStep | None):
        """Where the step's pending input tokens go and what they are: `(positions among the
        step's tokens, token ids on the device)`, or None when every input token is on the host.
        The usual case, the same sequences in the same order, needs no index transfer."""
        positions, rows, offset = [], [], 0
        for chunk in chunks:
            known = len(chunk.seq.token_ids)
            if chunk.end > known:  # its last token was sampled by `previous`
                positions.append(offset + known - chunk.start)
                rows.append(previous.row_of[chunk.seq])
            offset += chunk.num_tokens
        if not positions:
            return None
        in_order = list(range(len(rows)))
        sampled = previous.out.token_ids
        sampled = sampled[:len(rows)] if rows == in_order else sampled[self._tensor(rows, torch.long)]
        return (slice(0, len(rows)) if positions == in_order else self._tensor(positions, torch.long)), sampled

    def _forward(self, chunks: list[ScheduledChunk], pending) -> torch.Tensor:
        input_ids = self._tensor(step_tokens(chunks), torch.long)
        if pending is not None:
            input_ids[pending[0]] = pending[1]
        vision_embeds, vision_mask = self._vision_inputs(chunks)
        ends = list(itertools.accumulate(chunk.num_tokens for chunk in chunks))
        logits_indices = [end - 1 for chunk, end in zip(chunks, ends) if chunk.samples]
        return self.model(input_ids, self._tensor(step_positions(chunks)),
                          self._attention_metadata(chunks), self.kv_caches, vision_embeds, vision_mask,
                          self._tensor(logits_indices, torch.long))

    def _attention_metadata(self, chunks: list[ScheduledChunk]) -> AttentionMetadata:
        query_lens = [chunk.num_tokens for chunk in chunks]
        context_lens = [chunk.end for chunk in chunks]
        max_blocks = max(len(chunk.seq.block_table) for chunk in chunks)
        block_tables = [chunk.seq.block_table + [-1] * (max_blocks - len(chunk.seq.block_table)) for chunk in chunks]
        slots = [slot for chunk in chunks for slot in slot_mapping(chunk.seq.block_table, chunk.start, chunk.end, self.block_size)]
        return AttentionMetadata(
            query_start_loc=self._tensor([0, *itertools.accumulate(query_lens)], torch.int32),
            context_lens=self._tensor(context_lens, torch.int32),
            slot_mapping=self._tensor(slots, torch.long),
            block_tables=self._tensor(block_tables, torch.int32),
            query_lens_cpu=query_lens,
            context_lens_cpu=context_lens,
            block_size=self.block_size,
        )

    def _vision_inputs(self, chunks: list[ScheduledChunk]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The vision embeddings of the pad tokens computed this step, and the mask of where
        they go among the step's tokens; `(None, None)` when there are none."""
        if not any(chunk.start < chunk.seq.prompt_len and chunk.seq.num_vision_tokens for chunk in chunks):
            return None, None  # decode steps: no prompt tokens, or none of them vision pads
        masks, embeds = [], []
        for chunk in chunks:
            seq = chunk.seq
            prompt_start, prompt_end = min(chunk.start, seq.prompt_len), min(chunk.end, seq.prompt_len)
            num_generated = chunk.end - max(chunk.start, prompt_end)
            masks += [seq.vision_mask[prompt_start:prompt_end], torch.zeros(num_generated, dtype=torch.bool)]
            if seq.vision_embeds is not None:
                embeds.append(seq.vision_embeds[seq.vision_rows_before[prompt_start]:seq.vision_rows_before[prompt_end]])
        mask = torch.cat(masks)
        if not mask.any():
            return None, None
        return torch.cat(embeds), mask.to(self.device)

    def _sampling_batch(self, seqs: list[Sequence], previous: LaunchedStep | None = None) -> SamplingBatch:
        params = [seq.params for seq in seqs]
        any_penalty = any(
            p.repetition_penalty != 1 or p.presence_penalty != 0 or p.frequency_penalty != 0 for p in params
        )
        all_greedy = all(p.greedy for p in params)
        names = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty")
        column = dict.fromkeys(names)
        if any_penalty or not all_greedy:  # greedy rows without penalties need none of the numbers
            # One transfer for all the per-row numbers (float32 holds any top_k exactly). A greedy
            # row (`SamplingParams.greedy`: top_k 1 too) goes with temperature 0: the argmax.
            table = self._tensor([[0.0 if p.greedy and name == "temperature" else getattr(p, name) for name in names]
                                  for p in params], torch.float32)
            column = dict(zip(names, table.unbind(1)))
            column["top_k"] = column["top_k"].long()
        asked = [p.logprobs for p in params if p.logprobs is not None]
        entries = []
        for row, seq in enumerate(seqs):
            bias = seq.params.logit_bias or {}
            # stopping tokens are banned (-inf wins over any bias) until min_tokens were generated
            if seq.num_tokens - seq.prompt_len < seq.params.min_tokens:
                bias = {**bias, **dict.fromkeys(seq.stop_token_ids, float("-inf"))}
            entries += [(row, token, value) for token, value in bias.items()]
        logit_bias = None
        if entries:
            rows, token_ids, values = zip(*entries)
            logit_bias = LogitBias(self._tensor(rows, torch.long), self._tensor(token_ids, torch.long),
                                   self._tensor(values, torch.float32))
        return SamplingBatch(
            **column,
            prompt_tokens=self._padded([seq.token_ids[:seq.prompt_len] for seq in seqs]) if any_penalty else None,
            output_tokens=self._output_tokens(seqs, previous) if any_penalty else None,
            generators=[seq.generator for seq in seqs],
            num_logprobs=max(asked) if asked else None,
            all_greedy=all_greedy,
            any_penalty=any_penalty,
            any_filter=any(not p.greedy and (p.top_k > 0 or p.top_p < 1 or p.min_p > 0) for p in params),
            logit_bias=logit_bias,
        )

    def _output_tokens(self, seqs: list[Sequence], previous: LaunchedStep | None) -> torch.Tensor:
        """The generated tokens of `seqs`, padded (the penalties' input), a pending last token
        taken on the device from `previous`."""
        read_back = self._padded([seq.output_token_ids for seq in seqs])
        if not any(seq.num_pending for seq in seqs):
            return read_back
        rows = [previous.row_of[seq] if seq.num_pending else 0 for seq in seqs]
        pending = self._tensor([bool(seq.num_pending) for seq in seqs], torch.bool)
        last = torch.where(pending, previous.out.token_ids[self._tensor(rows, torch.long)], self.vocab_size)
        return torch.cat([read_back, last[:, None]], dim=1)

    def _padded(self, rows: list[list[int]]) -> torch.Tensor:
        width = max(1, max(len(row) for row in rows))
        return self._tensor([row + [self.vocab_size] * (width - len(row)) for row in rows], torch.long)

    def _tensor(self, data, dtype: torch.dtype | None = None) -> torch.Tensor:
        """A host list or tensor on the model's device. On CUDA it goes through pinned memory
        without waiting: a step's dozen small inputs then cost no host-device round trip each."""
        cpu = data if isinstance(data, torch.Tensor) else torch.tensor(data, dtype=dtype)
        if self.device.type != "cuda":
            return cpu
        return cpu.pin_memory().to(self.device, non_blocking=True)
