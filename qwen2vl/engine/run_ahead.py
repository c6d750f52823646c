"""Running ahead: a step is launched before the tokens of the step before it are read back.

Reading a step's sampled tokens back waits for the device; with `LLMEngine`'s `run_ahead` the
host schedules, prepares and launches the next step first, so it does that work while the
device computes, instead of in turn. The next step then plans with tokens it does not know yet:
they are *pending*. This module is the one place that knows what is pending when; the scheduler,
the batch layout, the model runner and the decode graphs call it.

Host and device. `Sequence.token_ids` holds what the host knows: the prompt and the tokens read
back. A token that a launched step samples exists only on the device, in that step's
`LaunchedStep.out.token_ids`, at row `LaunchedStep.row_of[request_id]`, until it is read back.
`Sequence.num_pending` counts a request's pending tokens and `Sequence.num_tokens` includes them,
so the scheduler plans as if they were known. At most one step is in flight
(`LLMEngine._in_flight`), so a request has at most one pending token between steps, and two
for the moment from the scheduling of a step to the read-back of the step before it.

A token's life:
- Pending (`expect_token`): `Scheduler.schedule` commits a span that reaches the request's
  last token, so its step samples the next one.
- Taken as input on the device: the next step's span of that request ends past `token_ids`
  (`ScheduledSpan.pending`, `last_input_pending`). The host puts a 0 in its place
  (`host_input_ids`), `pending_inputs` gathers the real token from the step before, and
  `write_pending` puts it into the step's input ids on the device (eager forward and graph
  replay alike). Penalties count it the same way (`pending_output_tokens`).
- Real (`receive`): `Scheduler.update` takes the read-back result of its step; the token is
  appended to `token_ids` and the stop conditions apply to it.

When the engine reads back. After launching the next step, usually; before scheduling it when
the in-flight step must be known first (`must_read_back_first`): a request of it reaches its
last token by length (max_tokens or max_model_len: running ahead it would compute a token past
its end) or is constrained (structured output: the next token's mask needs the token). Without
`run_ahead` every step is read back right after its launch, so nothing stays pending between
steps.

What ends a pending token early:
- A request that finishes (a stop token or string, an error) or is aborted while a token of it
  is in flight leaves `Scheduler.requests`; the token still arrives with its step and is
  dropped. So a request stopping while running ahead computes one token more, thrown away, and
  an aborted one reports one token fewer than stepping in turn would have.
- Preemption frees the request's blocks and recomputes it later from `num_tokens`, its pending
  token kept pending: the step that holds it is read back in the same `LLMEngine.step` that
  preempted it, before the request can be scheduled again.
- A restart (a step failed or was interrupted anywhere) drops the in-flight step: its tokens
  never arrive, so every request forgets its pending ones (`forget_pending`) and starts over from
  the tokens it has.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from qwen2vl.engine.step_batch import LaunchedStep
    from qwen2vl.engine.scheduler import SampledToken, ScheduledSpan
    from qwen2vl.engine.sequence import Sequence


def expect_token(seq: Sequence) -> None:
    """A committed step samples `seq`'s next token: it is pending from now on."""
    seq.num_pending += 1


def receive(seq: Sequence, token: SampledToken, max_model_len: int | None) -> None:
    """The oldest pending token of `seq` is read back: it becomes one of its tokens."""
    seq.num_pending -= 1
    seq.append_token(token.token_id, token.logprobs, max_model_len)


def forget_pending(seq: Sequence) -> None:
    """The steps holding `seq`'s pending tokens were dropped: those tokens never arrive."""
    seq.num_pending = 0


def last_input_pending(seq: Sequence, end: int) -> bool:
    """Whether a span of `seq` ending at `end` takes its last input token from the device."""
    return end > len(seq.token_ids)


def must_read_back_first(launched: LaunchedStep, requests: dict[str, Sequence], max_model_len: int) -> bool:
    """Whether `launched`'s tokens must be read back before the next step is scheduled: a request
    of it ends by length with its token, or its next token's mask needs it. Requests finished or
    aborted since it was launched do not count."""
    for span in launched.plan.sampling:
        seq = requests.get(span.request_id)
        if seq is not None and (span.sample.constraint is not None
                                or seq.ends_by_length(seq.num_tokens, max_model_len)):
            return True
    return False


def host_input_ids(spans: list[ScheduledSpan]) -> list[int]:
    """A step's input tokens as the host knows them, span after span: 0 in place of each pending
    one (`pending_inputs` says which token goes there)."""
    return [token for span in spans for token in span.input_ids + [0] * span.pending]


@dataclass
class PendingTokens:
    """Input tokens of a step that the step before sampled and that are still on the device."""

    rows: torch.Tensor | slice  # where they go among the step's input tokens
    token_ids: torch.Tensor  # on the device


def pending_inputs(spans: list[ScheduledSpan], ends: list[int], previous: LaunchedStep | None,
                   to_device) -> PendingTokens | None:
    """Where a step's pending input tokens go (`ends`: each span's end among the step's tokens)
    and what they are. The usual case, the same sequences in the same order as the step before,
    needs no index transfer."""
    rows = [end - 1 for span, end in zip(spans, ends) if span.pending]
    if not rows:
        return None
    sources = [previous.row_of[span.request_id] for span in spans if span.pending]
    in_order = list(range(len(rows)))
    sampled = previous.out.token_ids
    sampled = sampled[:len(rows)] if sources == in_order else sampled[to_device(sources, torch.long)]
    return PendingTokens(slice(0, len(rows)) if rows == in_order else to_device(rows, torch.long), sampled)


def write_pending(pending: PendingTokens | None, input_ids: torch.Tensor) -> None:
    """Put a step's pending input tokens into its input ids on the device (where the host put 0)."""
    if pending is not None:
        input_ids[pending.rows] = pending.token_ids


def pending_output_tokens(spans: list[ScheduledSpan], previous: LaunchedStep | None, *, pad: int,
                          to_device) -> torch.Tensor | None:
    """Each sampling span's pending last generated token, taken on the device from `previous`
    (`pad` for a span with none), as a column `[R, 1]`; None when no span has one."""
    if not any(span.pending for span in spans):
        return None
    sources = [previous.row_of[span.request_id] if span.pending else 0 for span in spans]
    pending = to_device([span.pending for span in spans], torch.bool)
    return torch.where(pending, previous.out.token_ids[to_device(sources, torch.long)], pad)[:, None]
