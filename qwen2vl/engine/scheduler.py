"""Which sequences run in the next step, how many of their tokens, and where those tokens sit
(M-RoPE positions, KV-cache slots)."""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import torch

from qwen2vl.engine.block_manager import BlockManager
from qwen2vl.engine.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledChunk:
    """`seq.token_ids[start:start + num_tokens]` are computed this step."""

    seq: Sequence
    start: int
    num_tokens: int

    @property
    def end(self) -> int:
        return self.start + self.num_tokens

    @property
    def samples(self) -> bool:
        """The chunk reaches the sequence's last token, so the step samples its next one."""
        return self.end == self.seq.num_tokens


def step_positions(chunks: list[ScheduledChunk]) -> torch.Tensor:
    """M-RoPE positions `[3, N]` of a step's tokens: each prompt's own, then `i + rope_delta` on
    all three axes for generated token i (counted from the start of the prompt). Generated
    tokens' positions are gathered as plain numbers, one tensor for a whole run of decode chunks."""
    pieces, generated = [], []
    for chunk in chunks:
        seq = chunk.seq
        prompt_end = min(chunk.end, seq.prompt_len)
        if chunk.start < prompt_end:
            if generated:
                pieces.append(torch.tensor(generated, dtype=torch.long).expand(3, -1))
                generated = []
            pieces.append(seq.prompt.positions[:, chunk.start:prompt_end])
        delta = seq.prompt.rope_delta
        generated += range(max(chunk.start, prompt_end) + delta, chunk.end + delta)
    if generated:
        pieces.append(torch.tensor(generated, dtype=torch.long).expand(3, -1))
    return torch.cat(pieces, dim=1)


def step_tokens(chunks: list[ScheduledChunk]) -> list[int]:
    """The input token ids of a step's chunks, 0 in place of a token still pending on the device
    (see `Sequence.num_pending`; the runner puts it there)."""
    tokens = []
    for chunk in chunks:
        known = chunk.seq.token_ids[chunk.start:chunk.end]
        tokens += known
        tokens += [0] * (chunk.num_tokens - len(known))
    return tokens


def slot_mapping(block_table: list[int], start: int, end: int, block_size: int) -> list[int]:
    """Cache slot of each token `start..end-1` of a sequence with this block table."""
    return [block_table[i // block_size] * block_size + i % block_size for i in range(start, end)]


class Scheduler:
    """First come, first served, under three budgets per step.

    - `max_num_batched_tokens` new tokens: running sequences go first (one token each when
      decoding; the rest of a chunked prefill otherwise), then waiting ones are admitted with as
      much of their prompt as fits. A prompt longer than the budget is prefilled in chunks.
    - `max_num_seqs` running sequences.
    - `max_vision_tokens_per_step` tokens of vision encoder output for newly admitted requests
      (the first admitted request of a step may exceed it, so large images still run).

    When a running sequence needs a KV block and none is free, the most recently admitted
    running sequence is preempted: its blocks are freed and it goes back to the front of the
    waiting queue, to be recomputed later from its tokens (it keeps its vision embeddings).
    """

    def __init__(
        self,
        block_manager: BlockManager,
        *,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        max_vision_tokens_per_step: int,
    ):
        if max_num_seqs < 1 or max_num_batched_tokens < 1:
            raise ValueError(f"max_num_seqs={max_num_seqs} and max_num_batched_tokens={max_num_batched_tokens} must be >= 1")
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_vision_tokens_per_step = max_vision_tokens_per_step
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def remove(self, seq: Sequence) -> None:
        """Take a sequence out of the queues and free its blocks (when it finishes or aborts)."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.block_manager.free(seq)

    def schedule(self) -> list[ScheduledChunk]:
        budget = self.max_num_batched_tokens
        chunks: list[ScheduledChunk] = []
        preempted = False

        for seq in list(self.running):
            if budget == 0:
                break
            if seq.status is not SequenceStatus.RUNNING:
                continue  # preempted earlier in this loop
            num_tokens = min(seq.num_tokens - seq.num_computed_tokens, budget)
            end = seq.num_computed_tokens + num_tokens
            while not self.block_manager.can_grow(seq, end):
                victim = self.running[-1]
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            if seq.status is not SequenceStatus.RUNNING:
                continue
            self.block_manager.grow(seq, end)
            chunks.append(ScheduledChunk(seq, seq.num_computed_tokens, num_tokens))
            budget -= num_tokens

        vision_tokens = 0
        while self.waiting and budget > 0 and not preempted and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if seq.needs_vision_encoding:
                if vision_tokens and vision_tokens + seq.num_vision_tokens > self.max_vision_tokens_per_step:
                    break
                vision_tokens += seq.num_vision_tokens
            num_tokens = min(seq.num_tokens - seq.num_computed_tokens, budget)
            end = seq.num_computed_tokens + num_tokens
            if not self.block_manager.can_grow(seq, end):
                break
            self.waiting.popleft()
            self.block_manager.grow(seq, end)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            chunks.append(ScheduledChunk(seq, seq.num_computed_tokens, num_tokens))
            budget -= num_tokens
        return chunks

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1
