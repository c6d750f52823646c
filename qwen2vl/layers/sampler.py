"""Batched token sampling: each row of the logits with its own parameters, in one pass."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SamplingBatch:
    """Per-row sampling parameters of R rows, as tensors on the logits' device.

    Neutral values switch a step off for a row: temperature 0 = greedy (the engine sends 0 for
    each row whose `SamplingParams.greedy` holds), top_k 0, top_p 1, min_p 0,
    repetition_penalty 1, presence/frequency penalty 0. A batch of greedy rows without
    penalties reads none of these and may leave them `None` (no host-to-device transfer).

    `prompt_tokens` / `output_tokens` are `[R, L]` token ids padded with `vocab_size`; they are
    only needed (and may be `None`) when some row has a penalty. The repetition penalty counts
    both, presence and frequency penalties the output only.

    `generators[r]` is row r's seeded generator, or `None` to draw from the global one; a
    seeded row's draws never depend on the other rows.

    `logit_bias` holds the few (row, token) logits to shift, or `None` when no row has any.
    `allowed` restricts the constrained rows (structured output) to their allowed tokens.
    """

    temperature: torch.Tensor | None  # [R] float32
    top_k: torch.Tensor | None  # [R] int64
    top_p: torch.Tensor | None  # [R] float32
    min_p: torch.Tensor | None  # [R] float32
    repetition_penalty: torch.Tensor | None  # [R] float32
    presence_penalty: torch.Tensor | None  # [R] float32
    frequency_penalty: torch.Tensor | None  # [R] float32
    prompt_tokens: torch.Tensor | None  # [R, Lp] int64
    output_tokens: torch.Tensor | None  # [R, Lo] int64
    generators: list[torch.Generator | None]
    num_logprobs: int | None  # largest top-k logprobs asked by a row; None: no row wants logprobs
    all_greedy: bool
    any_penalty: bool
    any_filter: bool  # some sampling row has top_k, top_p or min_p
    logit_bias: LogitBias | None = None
    allowed: AllowedTokens | None = None


@dataclass
class AllowedTokens:
    """Rows `rows` (None: every row, in order) may only take the tokens set in their bitmask
    `masks[i]`: bit t % 32 of word t // 32 for token t (llguidance's layout); tokens past the
    mask's end are never allowed."""

    rows: torch.Tensor | None  # [N] int64
    masks: torch.Tensor  # [N, W] int32


@dataclass
class LogitBias:
    """Sparse additions to the logits: `values[i]` goes to token `token_ids[i]` of row `rows[i]`;
    -inf bans the token (a row's stopping tokens before its `min_tokens`)."""

    rows: torch.Tensor  # [N] int64
    token_ids: torch.Tensor  # [N] int64
    values: torch.Tensor  # [N] float32


@dataclass
class SamplerOutput:
    """`token_ids[r]` is row r's next token. With logprobs asked: `logprobs[r]` is its
    log-probability, `top_ids[r]` / `top_logprobs[r]` the `num_logprobs` most likely tokens."""

    token_ids: torch.Tensor  # [R] int64
    logprobs: torch.Tensor | None = None  # [R] float32
    top_ids: torch.Tensor | None = None  # [R, K] int64
    top_logprobs: torch.Tensor | None = None  # [R, K] float32


@dataclass
class PromptScores:
    """Of R scored rows: `logprobs[r]` is the log-probability of row r's target token,
    `top_ids[r]` / `top_logprobs[r]` the `top` most likely tokens there."""

    logprobs: torch.Tensor  # [R] float32
    top_ids: torch.Tensor  # [R, top] int64
    top_logprobs: torch.Tensor  # [R, top] float32


def score_tokens(logits: torch.Tensor, targets: torch.Tensor, top: int) -> PromptScores:
    """The model's own log-probabilities (log-softmax of the raw logits) of `targets` [R] at the
    rows of `logits` [R, V], and the `top` most likely tokens of each row."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    top_logprobs, top_ids = logprobs.topk(top, dim=-1) if top else (logprobs[:, :0], targets[:, None][:, :0])
    return PromptScores(logprobs.gather(1, targets[:, None])[:, 0], top_ids, top_logprobs)


class Sampler(torch.nn.Module):
    """logits [R, V] -> next tokens: penalties, logit bias, allowed tokens, temperature, top-k,
    top-p, min-p, then a draw. The logits of constrained rows may be overwritten.

    Logprobs are the log-softmax of the raw logits (the model's distribution, before penalties
    and temperature), the convention of transformers' `output_logits` and vLLM's default.
    """

    def forward(self, logits: torch.Tensor, batch: SamplingBatch) -> SamplerOutput:
        logits = logits.float()
        raw_logprobs = torch.log_softmax(logits, dim=-1) if batch.num_logprobs is not None else None
        if batch.any_penalty:
            logits = apply_penalties(logits, batch)
        if batch.logit_bias is not None:
            bias = batch.logit_bias
            logits = logits.index_put((bias.rows, bias.token_ids), bias.values, accumulate=True)
        if batch.allowed is not None:
            logits = apply_allowed_tokens(logits, batch.allowed)
        greedy_ids = logits.argmax(dim=-1)
        if batch.all_greedy:
            token_ids = greedy_ids
        else:
            drawn = batch.temperature > 0  # the other rows are greedy
            scaled = logits / torch.where(drawn, batch.temperature, 1.0).unsqueeze(1)
            if batch.any_filter:
                scaled = apply_filters(scaled, batch.top_k, batch.top_p, batch.min_p)
            sampled_ids = draw(torch.softmax(scaled, dim=-1), batch.generators)
            token_ids = torch.where(drawn, sampled_ids, greedy_ids)
        if raw_logprobs is None:
            return SamplerOutput(token_ids)
        top_logprobs, top_ids = raw_logprobs.topk(batch.num_logprobs, dim=-1)
        sampled_logprobs = raw_logprobs.gather(1, token_ids.unsqueeze(1)).squeeze(1)
        return SamplerOutput(token_ids, sampled_logprobs, top_ids, top_logprobs)


def apply_allowed_tokens(logits: torch.Tensor, allowed: AllowedTokens) -> torch.Tensor:
    """-inf for every token a constrained row may not take, in place (0 is added to the others:
    a branch-free pass over the vocabulary)."""
    bias = allowed_tokens_bias(allowed.masks)
    width = min(bias.shape[1], logits.shape[1])
    rows = logits if allowed.rows is None else logits[allowed.rows]
    rows[:, :width] += bias[:, :width]
    rows[:, width:] = float("-inf")
    if allowed.rows is not None:
        logits[allowed.rows] = rows
    return logits


# byte -> the biases of its 8 tokens: 0 where the bit is set, -inf where not
_BYTE_BIAS = torch.where(((torch.arange(256)[:, None] >> torch.arange(8)) & 1).bool(), 0.0, float("-inf"))


def allowed_tokens_bias(masks: torch.Tensor) -> torch.Tensor:
    """int32 bitmasks `[N, W]` -> float32 `[N, 32 W]` of 0 (allowed) and -inf; bit j of word i is
    column 32 i + j."""
    if masks.device.type == "cpu":  # a table lookup per byte, 2-3x torch's shifts and selects there
        import numpy as np

        table = _BYTE_BIAS.numpy()
        return torch.from_numpy(table[masks.numpy().view(np.uint8)].reshape(masks.shape[0], -1))
    return torch.where(unpack_bits(masks), 0.0, float("-inf"))


def unpack_bits(masks: torch.Tensor) -> torch.Tensor:
    """int32 bitmasks `[N, W]` -> bool `[N, 32 W]`, bit j of word i at column 32 i + j."""
    bits = torch.arange(32, dtype=torch.int32, device=masks.device)
    return ((masks.unsqueeze(-1) >> bits) & 1).bool().flatten(1)


def apply_penalties(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Penalties touch only the logits of tokens a row has seen, gathered and scattered back, so
    their cost grows with the sequences' lengths, not with the vocabulary."""
    vocab_size = logits.shape[1]
    # a spare last column absorbs the padding id `vocab_size`
    padded = torch.nn.functional.pad(logits, (0, 1))
    seen = torch.cat([batch.prompt_tokens, batch.output_tokens], dim=1)
    values = padded.gather(1, seen)
    penalty = batch.repetition_penalty.unsqueeze(1)
    padded.scatter_(1, seen, torch.where(values > 0, values / penalty, values * penalty))
    output = batch.output_tokens
    padded.scatter_(1, output, padded.gather(1, output) - batch.presence_penalty.unsqueeze(1))
    padded.scatter_add_(1, output, (-batch.frequency_penalty).unsqueeze(1).expand(output.shape).contiguous())
    return padded[:, :vocab_size]


def apply_filters(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor,
                  num_candidates: int = 1024) -> torch.Tensor:
    """Set to -inf every token outside a row's top-k, its top-p nucleus, or below min_p times
    the most likely token's probability; the most likely token always stays. Rows with none of
    the three are left as they are."""
    rows = ((top_k > 0) | (top_p < 1) | (min_p > 0)).nonzero().squeeze(1)
    if rows.numel() == 0:
        return logits
    filtered = logits.clone()
    filtered[rows] = _filter_rows(logits[rows], top_k[rows], top_p[rows], min_p[rows], num_candidates)
    return filtered


def _filter_rows(logits, top_k, top_p, min_p, num_candidates: int) -> torch.Tensor:
    # Ranking only the most likely candidates is much cheaper than sorting the vocabulary. A row
    # keeps a prefix of its ranking, so when it drops its last candidate the result is exact;
    # rows that keep them all are redone over the whole vocabulary.
    vocab = logits.shape[1]
    width = min(vocab, max(num_candidates, int(top_k.max())))
    top_logits, top_ids = logits.topk(width, dim=-1)
    drop = torch.arange(width, device=logits.device) >= torch.where(top_k > 0, top_k, vocab).unsqueeze(1)
    kept_logits = top_logits.masked_fill(drop, float("-inf"))
    # probabilities after top-k: over the row's top k tokens, else over the whole vocabulary
    log_total = torch.where(top_k > 0, kept_logits.logsumexp(dim=-1), logits.logsumexp(dim=-1))
    probs = (kept_logits - log_total.unsqueeze(1)).exp()
    mass_above = probs.cumsum(dim=-1) - probs
    drop |= mass_above >= top_p.unsqueeze(1)
    drop |= probs < min_p.unsqueeze(1) * probs[:, :1]
    drop[:, 0] = False
    filtered = torch.full_like(logits, float("-inf")).scatter_(1, top_ids, top_logits.masked_fill(drop, float("-inf")))
    spill = ~drop[:, -1] & (top_k == 0)
    if width < vocab and bool(spill.any()):
        filtered[spill] = _filter_rows(logits[spill], top_k[spill], top_p[spill], min_p[spill], vocab)
    return filtered


def draw(probs: torch.Tensor, generators: list[torch.Generator | None]) -> torch.Tensor:
    """One token per row with probability `probs`: argmax of probs / Exp(1) noise (the
    exponential race), so each seeded row draws its noise from its own generator alone."""
    noise = torch.empty_like(probs)
    unseeded = [r for r, g in enumerate(generators) if g is None]
    if unseeded:
        noise[unseeded] = torch.empty_like(probs[unseeded]).exponential_()
    for r, generator in enumerate(generators):
        if generator is not None:
            noise[r].exponential_(generator=generator)
    return (probs / noise).argmax(dim=-1)
