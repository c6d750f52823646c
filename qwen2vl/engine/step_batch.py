"""A step's plan turned into the model's and the sampler's inputs: the one place that lays out a
batch, for the eager forward and the decode CUDA graphs alike."""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from qwen2vl.engine.run_ahead import PendingTokens, host_input_ids, pending_inputs, pending_output_tokens
from qwen2vl.engine.scheduler import SampledToken, ScheduledSpan, StepPlan
from qwen2vl.sampling_params import SAMPLER_COLUMNS
from qwen2vl.layers.sampler import AllowedTokens, LogitBias, PromptScores, SamplerOutput, SamplingBatch
from qwen2vl.structured import allowed_tokens


@dataclass
class LaunchedStep:
    """A step's sampled tokens, still on the device: `out.token_ids[r]` is the next token of
    `plan.sampling[r]`. Until they are read back, a next step can take them as its input there
    (`engine.run_ahead`)."""

    plan: StepPlan
    out: SamplerOutput | None  # None when no span samples
    scores: PromptScores | None = None  # of the spans' scored prompt rows, in order

    def __post_init__(self):
        self.row_of = {span.request_id: row for row, span in enumerate(self.plan.sampling)}

    def prompt_logprobs(self) -> dict[str, list[dict[int, float]]]:
        """Each scored span's prompt log-probabilities (its next tokens' and the top ones), by request."""
        if self.scores is None:
            return {}
        chosen, top_ids, top_logprobs = (t.tolist() for t in (self.scores.logprobs, self.scores.top_ids,
                                                              self.scores.top_logprobs))
        result, row = {}, 0
        for span in self.plan.spans:
            if span.scored is None:
                continue
            rows = []
            for target in span.scored.targets:
                k = span.scored.top
                rows.append({target: chosen[row], **dict(zip(top_ids[row][:k], top_logprobs[row][:k]))})
                row += 1
            result[span.request_id] = rows
        return result

    def result(self) -> list[SampledToken]:
        """The tokens on the host (waits for the device), one per sampling span, with the
        log-probabilities each asked for."""
        out, spans = self.out, self.plan.sampling
        if out is None:
            return []
        token_ids = out.token_ids.tolist()
        if out.logprobs is None:
            return [SampledToken(token_id, None) for token_id in token_ids]
        sampled_logprobs = out.logprobs.tolist()
        top_ids, top_logprobs = out.top_ids.tolist(), out.top_logprobs.tolist()
        sampled = []
        for row, span in enumerate(spans):
            logprobs = None
            k = span.sample.params.logprobs
            if k is not None:
                logprobs = {token_ids[row]: sampled_logprobs[row]}
                logprobs.update(zip(top_ids[row][:k], top_logprobs[row][:k]))
            sampled.append(SampledToken(token_ids[row], logprobs))
        return sampled


@dataclass
class StepInputs:
    """A step's model inputs on the host: N tokens, span after span.

    `input_ids` holds 0 where `pending` puts a token on the device. `logits_rows` are the rows
    whose logits are computed: the last of each sampling span (`sample_index` among them, None
    when they are all), and the scored prompt rows (`scored_index`, scoring `scored_targets` with
    the `scored_top` most likely). The vision embeddings fill the rows where `vision_mask` is set.
    """

    input_ids: list[int]
    positions: torch.Tensor  # [3, N] int64
    slot_mapping: list[int]
    query_lens: list[int]
    context_lens: list[int]
    block_tables: list[list[int]]
    logits_rows: list[int]
    sample_index: list[int] | None
    scored_index: list[int]
    scored_targets: list[int]
    scored_top: int
    vision_embeds: torch.Tensor | None
    vision_mask: torch.Tensor | None
    pending: PendingTokens | None

    @property
    def is_decode(self) -> bool:
        """One new token per sequence, none of them an image or video pad."""
        return self.vision_mask is None and all(length == 1 for length in self.query_lens)


def step_positions(spans: list[ScheduledSpan]) -> torch.Tensor:
    """M-RoPE positions `[3, N]` of a step's tokens: each prompt's own, then `i + rope_delta` on
    all three axes for generated token i (counted from the start of the prompt). Generated
    tokens' positions are gathered as plain numbers, one tensor for a whole run of decode spans."""
    pieces, generated = [], []
    for span in spans:
        prompt_len = len(span.prompt)
        prompt_end = min(span.end, prompt_len)
        if span.start < prompt_end:
            if generated:
                pieces.append(torch.tensor(generated, dtype=torch.long).expand(3, -1))
                generated = []
            pieces.append(span.prompt.positions[:, span.start:prompt_end])
        delta = span.prompt.rope_delta
        generated += range(max(span.start, prompt_end) + delta, span.end + delta)
    if generated:
        pieces.append(torch.tensor(generated, dtype=torch.long).expand(3, -1))
    return torch.cat(pieces, dim=1)


def slot_mapping(block_table: list[int], start: int, end: int, block_size: int) -> list[int]:
    """Cache slot of each token `start..end-1` of a sequence with this block table."""
    return [block_table[i // block_size] * block_size + i % block_size for i in range(start, end)]


def step_inputs(plan: StepPlan, *, block_size: int, vision_rows, previous: LaunchedStep | None,
                to_device) -> StepInputs:
    """The model inputs of `plan`. `vision_rows(request_id, start, end)` returns rows of a
    request's vision embeddings; `previous` is the step whose tokens are still on the device."""
    spans = plan.spans
    ends = list(itertools.accumulate(span.num_tokens for span in spans))
    logits_rows, sample_index, scored_index, targets = [], [], [], []
    for span, end in zip(spans, ends):
        if span.scored is not None:
            first = end - span.num_tokens + span.scored.first - span.start
            scored_index += range(len(logits_rows), len(logits_rows) + len(span.scored.targets))
            logits_rows += range(first, first + len(span.scored.targets))
            targets += span.scored.targets
        if span.sample is not None:
            sample_index.append(len(logits_rows))
            logits_rows.append(end - 1)
    return StepInputs(
        input_ids=host_input_ids(spans),
        positions=step_positions(spans),
        slot_mapping=[slot for span in spans for slot in slot_mapping(span.block_table, span.start, span.end, block_size)],
        query_lens=[span.num_tokens for span in spans],
        context_lens=[span.end for span in spans],
        block_tables=[span.block_table for span in spans],
        logits_rows=logits_rows,
        sample_index=sample_index if scored_index else None,
        scored_index=scored_index,
        scored_targets=targets,
        scored_top=max((span.scored.top for span in spans if span.scored is not None), default=0),
        **_vision_inputs(spans, vision_rows, to_device),
        pending=pending_inputs(spans, ends, previous, to_device),
    )


def _vision_inputs(spans: list[ScheduledSpan], vision_rows, to_device) -> dict:
    """The vision embeddings of the pad tokens computed this step and the mask of where they go
    among the step's tokens; None for both when there are none (every decode step)."""
    if not any(span.vision_mask is not None for span in spans):
        return {"vision_embeds": None, "vision_mask": None}
    masks, embeds = [], []
    for span in spans:
        if span.vision_mask is not None:
            masks.append(span.vision_mask)
            masks.append(torch.zeros(span.num_tokens - len(span.vision_mask), dtype=torch.bool))
            embeds.append(vision_rows(span.request_id, *span.vision_rows))
        else:
            masks.append(torch.zeros(span.num_tokens, dtype=torch.bool))
    return {"vision_embeds": torch.cat(embeds), "vision_mask": to_device(torch.cat(masks))}


def sampling_batch(plan: StepPlan, previous: LaunchedStep | None, *, vocab_size: int, to_device) -> SamplingBatch:
    """The sampler's inputs for the sampling spans of `plan`, one row each."""
    rows = [span.sample for span in plan.sampling]
    params = [row.params for row in rows]
    any_penalty = any(p.has_penalty for p in params)
    all_greedy = all(p.greedy for p in params)
    column = dict.fromkeys(SAMPLER_COLUMNS)
    if any_penalty or not all_greedy:  # greedy rows without penalties need none of the numbers
        # one transfer for all the per-row numbers (float32 holds any top_k exactly)
        table = to_device([p.sampler_row() for p in params], torch.float32)
        column = dict(zip(SAMPLER_COLUMNS, table.unbind(1)))
        column["top_k"] = column["top_k"].long()
    asked = [p.logprobs for p in params if p.logprobs is not None]
    padded = _padder(vocab_size, to_device)
    entries = []
    for index, row in enumerate(rows):
        # stopping tokens are banned (-inf wins over any bias) until min_tokens were generated
        bias = {**(row.params.logit_bias or {}), **dict.fromkeys(row.banned_token_ids, float("-inf"))}
        entries += [(index, token, value) for token, value in bias.items()]
    logit_bias = None
    if entries:
        indices, token_ids, values = zip(*entries)
        logit_bias = LogitBias(to_device(indices, torch.long), to_device(token_ids, torch.long),
                               to_device(values, torch.float32))
    constrained = [index for index, row in enumerate(rows) if row.constraint is not None]
    allowed = None
    if constrained:  # on the host, while the device runs the forward
        masks = allowed_tokens([rows[index].constraint for index in constrained])
        every_row = len(constrained) == len(rows)  # known here, where asking the device would wait for it
        allowed = AllowedTokens(None if every_row else to_device(constrained, torch.long), to_device(masks))
    return SamplingBatch(
        **column,
        prompt_tokens=padded([row.prompt_token_ids for row in rows]) if any_penalty else None,
        output_tokens=output_tokens(plan, previous, vocab_size=vocab_size, to_device=to_device) if any_penalty else None,
        generators=[row.generator for row in rows],
        num_logprobs=max(asked) if asked else None,
        all_greedy=all_greedy,
        any_penalty=any_penalty,
        any_filter=any(p.has_filter for p in params),
        logit_bias=logit_bias,
        allowed=allowed,
    )


def output_tokens(plan: StepPlan, previous: LaunchedStep | None, *, vocab_size: int, to_device) -> torch.Tensor:
    """The generated tokens of the sampling spans, padded with `vocab_size` (the penalties'
    input), a pending last token taken on the device from `previous`."""
    spans = plan.sampling
    read_back = _padder(vocab_size, to_device)([span.sample.output_token_ids for span in spans])
    pending = pending_output_tokens(spans, previous, pad=vocab_size, to_device=to_device)
    return read_back if pending is None else torch.cat([read_back, pending], dim=1)


def _padder(vocab_size: int, to_device):
    def padded(rows: list[list[int]]) -> torch.Tensor:
        width = max(1, max(len(row) for row in rows))
        return to_device([row + [vocab_size] * (width - len(row)) for row in rows], torch.long)
    return padded

