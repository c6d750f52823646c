"""Which requests run in the next step and how many of their tokens, as a plan of plain data;
and the one place where a step's results advance the requests."""
from __future__ import annotations

import functools
from collections import deque
from dataclasses import dataclass

import torch

from qwen2vl.engine import run_ahead
from qwen2vl.engine.block_manager import BlockManager
from qwen2vl.engine.sequence import Sequence, SequenceStatus
from qwen2vl.processor.types import PreparedPrompt, VisionItem
from qwen2vl.sampling_params import SamplingParams


@dataclass(frozen=True)
class SampleRow:
    """What the sampler needs of a request whose next token the step samples."""

    params: SamplingParams
    generator: torch.Generator | None
    prompt_token_ids: list[int]
    output_token_ids: list[int]  # those read back; a pending last one is on the device (`engine.run_ahead`)
    banned_token_ids: frozenset[int]  # its stopping tokens, until it has `min_tokens` tokens
    constraint: object | None = None  # its `structured.Constraint`, which masks the tokens it may take


@dataclass(frozen=True)
class ScoredRows:
    """Prompt positions `first:first + len(targets)` of a span whose logits score the prompt's
    next tokens `targets` (`SamplingParams.prompt_logprobs`: the `top` most likely too)."""

    first: int
    targets: list[int]
    top: int


@dataclass(frozen=True)
class ScheduledSpan:
    """Tokens `start:start + num_tokens` of request `request_id` are computed this step.

    `input_ids` are those of them known on the host; when `pending`, the last one was sampled by
    the step before and is still on the device (see `engine.run_ahead`). `block_table` lists
    the request's KV blocks, room for this span included. `vision_rows` are the rows of the
    request's vision embeddings that fill the span's image and video pad tokens, which sit where
    `vision_mask` (over the span's prompt tokens) is set; `vision_mask` is None without any.
    `sample` is set when the span reaches the request's last token, so its next one is sampled.
    """

    request_id: str
    start: int
    num_tokens: int
    input_ids: list[int]
    pending: bool
    block_table: list[int]
    prompt: PreparedPrompt
    vision_rows: tuple[int, int]
    vision_mask: torch.Tensor | None
    sample: SampleRow | None
    scored: ScoredRows | None = None

    @property
    def end(self) -> int:
        return self.start + self.num_tokens


@dataclass(frozen=True)
class VisionWork:
    """Images and videos of one request (its items `indices`), to encode before its span runs;
    their encodings are shared with other requests of its `cache_salt` only."""

    request_id: str
    indices: list[int]
    items: list[VisionItem]
    cache_salt: str | None = None


@dataclass
class StepPlan:
    """One step: the spans to compute, sequence after sequence, and the vision items to encode first."""

    spans: list[ScheduledSpan]
    encode: list[VisionWork]

    @functools.cached_property
    def sampling(self) -> list[ScheduledSpan]:
        return [span for span in self.spans if span.sample is not None]

    def without(self, request_ids: set[str]) -> StepPlan:
        return StepPlan([s for s in self.spans if s.request_id not in request_ids],
                        [w for w in self.encode if w.request_id not in request_ids])


@dataclass(frozen=True)
class SampledToken:
    token_id: int
    logprobs: dict[int, float] | None  # the sampled token's and the top-k, when asked


def make_span(seq: Sequence, start: int, num_tokens: int) -> ScheduledSpan:
    """The span of `seq`'s tokens `start:start + num_tokens`, as a step sees them now."""
    end = start + num_tokens
    prompt_start, prompt_end = min(start, seq.prompt_len), min(end, seq.prompt_len)
    rows = (seq.vision_rows_before[prompt_start], seq.vision_rows_before[prompt_end])
    sample = None
    if end == seq.num_tokens:
        too_short = seq.num_tokens - seq.prompt_len < seq.params.min_tokens
        sample = SampleRow(seq.params, seq.generator, seq.prompt.input_ids,
                           seq.output_token_ids if seq.params.has_penalty else [],
                           frozenset(seq.stop_token_ids) if too_short else frozenset(), seq.constraint)
    return ScheduledSpan(
        request_id=seq.request_id, start=start, num_tokens=num_tokens,
        input_ids=seq.token_ids[start:end], pending=run_ahead.last_input_pending(seq, end),
        block_table=list(seq.block_table), prompt=seq.prompt, vision_rows=rows,
        vision_mask=seq.vision_mask[prompt_start:prompt_end] if rows[1] > rows[0] else None,
        sample=sample,
        scored=_scored_rows(seq, start, end),
    )


def _scored_rows(seq: Sequence, start: int, end: int) -> ScoredRows | None:
    """The span's prompt rows whose next token's log-probability the request asked for and has
    not got yet (a recomputed prompt is not scored twice)."""
    if seq.prompt_logprobs is None:
        return None
    first, stop = max(start, len(seq.prompt_logprobs) - 1), min(end, seq.prompt_len - 1)
    if first >= stop:
        return None
    return ScoredRows(first, seq.token_ids[first + 1:stop + 1], seq.params.prompt_logprobs)


class Scheduler:
    """Owns the requests' progress: first come, first served, under three budgets per step.

    - `max_num_batched_tokens` new tokens: running sequences go first (one token each when
      decoding; the rest of a chunked prefill otherwise), then waiting ones are admitted with as
      much of their prompt as fits. A prompt longer than the budget is prefilled in chunks.
    - `max_num_seqs` running sequences.
    - `max_vision_tokens_per_step` tokens of vision encoder output for newly admitted requests
      (the first admitted request of a step may exceed it, so large images still run).

    When a running sequence needs a KV block and none is free, the most recently admitted
    running sequence is preempted: its blocks are freed and it goes back to the front of the
    waiting queue, to be recomputed later from its tokens (its vision embeddings are kept).

    `schedule` commits what it plans: the spans' tokens count as computed and each sampling
    span's token as pending from then on, so that the next step can be planned before this one's
    tokens are read back (`engine.run_ahead`). `update` is where those tokens arrive: it appends
    them, applies the stop conditions and takes finished requests out.
    """

    def __init__(
        self,
        block_manager: BlockManager,
        *,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        max_vision_tokens_per_step: int,
        max_model_len: int | None = None,
    ):
        if max_num_seqs < 1 or max_num_batched_tokens < 1:
            raise ValueError(f"max_num_seqs={max_num_seqs} and max_num_batched_tokens={max_num_batched_tokens} must be >= 1")
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_vision_tokens_per_step = max_vision_tokens_per_step
        self.max_model_len = max_model_len
        self.requests: dict[str, Sequence] = {}
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        if seq.request_id in self.requests:
            raise ValueError(f"request id {seq.request_id!r} is already in use")
        seq.status = SequenceStatus.WAITING
        self.requests[seq.request_id] = seq
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def remove(self, seq: Sequence) -> None:
        """Take a finished (or aborted) sequence out of the queues and free its blocks."""
        self.requests.pop(seq.request_id, None)
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.block_manager.free(seq)

    def schedule(self) -> StepPlan:
        budget = self.max_num_batched_tokens
        scheduled: list[tuple[Sequence, int]] = []
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
            scheduled.append((seq, num_tokens))
            budget -= num_tokens

        vision_tokens = 0
        manager = self.block_manager
        while self.waiting and budget > 0 and not preempted and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            # a waiting sequence holds no blocks; one that scores its prompt computes all of it
            cached = manager.cached_prefix(seq) if seq.prompt_logprobs is None else []
            start = len(cached) * manager.block_size
            num_tokens = min(seq.num_tokens - start, budget)
            if manager.blocks_for(start + num_tokens) - len(cached) + manager.blocks_taken_from_free(cached) \
                    > manager.num_free_blocks:
                break
            encode = sum(seq.item_rows(i)[1] - seq.item_rows(i)[0] for i in seq.items_to_encode_from(start))
            if encode and vision_tokens and vision_tokens + encode > self.max_vision_tokens_per_step:
                break
            vision_tokens += encode
            self.waiting.popleft()
            manager.take_prefix(seq, cached)
            seq.num_computed_tokens = start
            if seq.num_cached_tokens is None:
                seq.num_cached_tokens = start
            manager.grow(seq, start + num_tokens)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            scheduled.append((seq, num_tokens))
            budget -= num_tokens
        return self._commit(scheduled)

    def _commit(self, scheduled: list[tuple[Sequence, int]]) -> StepPlan:
        spans, encode = [], []
        for seq, num_tokens in scheduled:
            indices = seq.items_to_encode
            if indices:
                encode.append(VisionWork(seq.request_id, indices, [seq.prompt.vision_items[i] for i in indices],
                                         seq.cache_salt))
                seq.encoded_items.update(indices)
            spans.append(make_span(seq, seq.num_computed_tokens, num_tokens))
            seq.num_computed_tokens += num_tokens
            if spans[-1].sample is not None:
                run_ahead.expect_token(seq)
        return StepPlan(spans, encode)

    def update(self, plan: StepPlan, sampled: list[SampledToken],
               scores: dict[str, list[dict[int, float]]] | None = None) -> list[Sequence]:
        """The results of `plan`'s step arrive: the computed blocks become findable; the prompt
        log-probabilities of scored spans (`scores`, by request) and the sampled tokens (one per
        sampling span, in order) go to their requests, unless a request finished or was aborted
        since. Finished requests are taken out. Returns the requests that got a token."""
        for span in plan.spans:
            seq = self.requests.get(span.request_id)
            if seq is None:
                continue
            self.block_manager.register(seq, span.end, span.block_table)
            if span.scored is not None and len(seq.prompt_logprobs) == span.scored.first + 1:
                seq.prompt_logprobs += scores[span.request_id]
        updated = []
        for span, token in zip(plan.sampling, sampled):
            seq = self.requests.get(span.request_id)
            if seq is None:
                continue  # finished or aborted after the step was launched: its token is dropped
            run_ahead.receive(seq, token, self.max_model_len)
            if seq.is_finished:
                self.remove(seq)
            updated.append(seq)
        return updated

    def restart(self) -> None:
        """The tokens of every step scheduled and not updated yet will never arrive (a step
        failed or was interrupted, perhaps half way through `schedule` or `update`): every
        unfinished request goes back to waiting, in arrival order, holding no blocks, to be
        recomputed from the tokens it has, as a preempted one is. Finished ones are taken out."""
        self.running, self.waiting = [], deque()
        for seq in list(self.requests.values()):
            self.block_manager.free(seq)
            if seq.is_finished:
                del self.requests[seq.request_id]
                continue
            run_ahead.forget_pending(seq)
            seq.num_computed_tokens = 0
            seq.status = SequenceStatus.WAITING
            self.waiting.append(seq)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1
