"""One request's whole state, from its prepared prompt to its finished text."""
from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass

import torch

from qwen2vl.processor.types import PreparedPrompt
from qwen2vl.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class RequestOutput:
    """What one request produced so far, returned by `LLMEngine.step` when it got new tokens or
    finished.

    `token_ids` are all generated tokens (a stopping end-of-sequence / stop token included, as
    transformers does); `text` is their text with a stop string and what follows it cut off.
    `new_token_ids` / `text_delta` are what this step added; concatenated over the steps the
    deltas give `text`. Text that might be the start of a stop string is held back from the
    deltas until it is resolved. `logprobs[i]` maps token ids to log-probabilities at generated
    token i: the sampled token plus the top `SamplingParams.logprobs` ones.
    """

    request_id: str
    prompt_len: int
    token_ids: list[int]
    new_token_ids: list[int]
    text: str
    text_delta: str
    finished: bool
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    logprobs: list[dict[int, float]] | None = None
    error: str | None = None
    num_cached_tokens: int = 0  # prompt tokens whose keys and values came from the prefix cache
    # with `SamplingParams.prompt_logprobs`: per prompt token, None for the first (complete once
    # the prompt is computed, then never changed)
    prompt_logprobs: list[dict[int, float] | None] | None = None


class Sequence:
    """A request in the engine: its tokens, KV blocks, vision inputs, positions, sampling
    parameters, random generator, detokenizer and cache salt. Its vision embeddings are the engine's (kept
    across preemption, so recomputing a prompt never re-encodes its images).

    `token_ids` holds the prompt and then the generated tokens; the first `num_computed_tokens`
    of them have keys/values in the cache blocks listed in `block_table`. `num_pending` tokens
    more were sampled on the device and are not read back yet; `num_tokens` counts them (see
    `engine.run_ahead`, the only code that changes it).
    `vision_rows_before[p]` counts the vision pad tokens before prompt position p, so the rows
    of the vision embeddings that fill a span are a plain slice.
    """

    def __init__(
        self,
        request_id: str,
        prompt: PreparedPrompt,
        params: SamplingParams,
        *,
        vision_token_ids: list[int],
        stop_token_ids: set[int],
        detokenizer,
        generator: torch.Generator | None,
        item_tokens: list[int] | None = None,
        constraint=None,
        cache_salt: str | None = None,
    ):
        self.request_id = request_id
        self.cache_salt = cache_salt  # its prefix and vision cache entries are shared only within this salt
        self.prompt = prompt
        self.params = params
        self.token_ids = list(prompt.input_ids)
        self.prompt_len = len(prompt.input_ids)
        self.status = SequenceStatus.WAITING
        self.num_computed_tokens = 0
        self.num_pending = 0
        self.block_table: list[int] = []
        self.num_preemptions = 0

        ids = torch.tensor(prompt.input_ids, dtype=torch.long)
        self.vision_mask = torch.isin(ids, torch.tensor(vision_token_ids, dtype=torch.long))
        self.vision_rows_before = torch.cat([torch.zeros(1, dtype=torch.long), self.vision_mask.cumsum(0)]).tolist()
        # Where each vision item's rows start among the prompt's vision rows (one item if not told).
        self.item_row_starts = [0, *itertools.accumulate(item_tokens or [self.vision_rows_before[-1]])][:-1]
        self.encoded_items: set[int] = set()  # items a step was planned to encode (the engine holds them)
        self.block_digests: list[bytes] = []  # of its full blocks, in order (see `BlockManager`)
        self.num_cached_tokens: int | None = None  # prompt tokens found in the prefix cache, at first admission

        self.stop_token_ids = stop_token_ids
        self.generator = generator
        self.constraint = constraint  # a `structured.Constraint`, advanced by each sampled token
        self.detokenizer = detokenizer
        self.text = ""
        self.num_emitted_chars = 0
        self.num_emitted_tokens = 0
        self.logprobs: list[dict[int, float]] | None = [] if params.logprobs is not None else None
        # prompt token i's log-probabilities given the tokens before it (the first has none)
        self.prompt_logprobs: list[dict[int, float] | None] | None = (
            [None] if params.prompt_logprobs is not None else None)
        self.finish_reason: str | None = None
        self.error: str | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids) + self.num_pending

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.prompt_len:]

    @property
    def num_vision_tokens(self) -> int:
        return self.vision_rows_before[-1]

    def item_rows(self, index: int) -> tuple[int, int]:
        """The vision rows of item `index`."""
        starts = self.item_row_starts
        return starts[index], starts[index + 1] if index + 1 < len(starts) else self.num_vision_tokens

    def items_to_encode_from(self, start: int) -> list[int]:
        """The vision items whose rows the tokens from `start` on need and no step encoded yet."""
        computed_rows = self.vision_rows_before[min(start, self.prompt_len)]
        return [index for index in range(len(self.prompt.vision_items))
                if index not in self.encoded_items and self.item_rows(index)[1] > computed_rows]

    @property
    def items_to_encode(self) -> list[int]:
        return self.items_to_encode_from(self.num_computed_tokens)

    def media_in(self, start: int, end: int) -> list[tuple[bytes, int]]:
        """For each vision item with pad tokens among tokens `start:end`: its digest and the
        offset of its first row there (what a block's digest takes of its media)."""
        first, last = self.vision_rows_before[min(start, self.prompt_len)], self.vision_rows_before[min(end, self.prompt_len)]
        media = []
        for index, item in enumerate(self.prompt.vision_items):
            item_start, item_end = self.item_rows(index)
            if item_start < last and item_end > first:
                media.append((item.digest, max(first, item_start) - item_start))
        return media

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def append_token(self, token_id: int, logprobs: dict[int, float] | None, max_model_len: int | None) -> None:
        """Add a generated token, its text, and finish the sequence if a stop condition holds."""
        self.token_ids.append(token_id)
        if self.logprobs is not None:
            self.logprobs.append(logprobs)
        if token_id in self.stop_token_ids:
            self.finish("stop")
        else:
            constrained = self.constraint.advance(token_id) if self.constraint is not None else None
            old_len = len(self.text)
            self.detokenizer.add(token_id)
            self.text = self.detokenizer.text
            cut = find_stop_string(self.text, old_len, self.params.stop)
            if cut is not None:
                self.text = self.text[:cut]
                self.finish("stop")
                return
            if constrained == "stop":  # the constrained output is complete
                self.finish("stop")
            elif constrained is not None:  # the token broke it (its masks never let one through)
                self.finish("error", constrained)
            elif self.ends_by_length(len(self.token_ids), max_model_len):
                self.finish("length")
        if self.is_finished:  # a character cut short by the end is released as U+FFFD, as decode does
            self.detokenizer.flush()
            self.text = self.detokenizer.text

    def ends_by_length(self, num_tokens: int, max_model_len: int | None) -> bool:
        """Whether `num_tokens` tokens (prompt included) reach max_tokens or `max_model_len` (None: no limit)."""
        return (num_tokens - self.prompt_len >= self.params.max_tokens
                or (max_model_len is not None and num_tokens >= max_model_len))

    def finish(self, reason: str, error: str | None = None) -> None:
        self.status = SequenceStatus.FINISHED
        self.finish_reason = reason
        self.error = error

    def take_output(self) -> RequestOutput:
        """The output as of now, with the tokens and text not yet reported as deltas."""
        visible = len(self.text) if self.is_finished else len(self.text) - partial_stop_length(self.text, self.params.stop)
        visible = max(visible, self.num_emitted_chars)
        output = RequestOutput(
            request_id=self.request_id,
            prompt_len=self.prompt_len,
            token_ids=self.output_token_ids,
            new_token_ids=self.token_ids[self.prompt_len + self.num_emitted_tokens:],
            text=self.text,
            text_delta=self.text[self.num_emitted_chars:visible],
            finished=self.is_finished,
            finish_reason=self.finish_reason,
            logprobs=list(self.logprobs) if self.logprobs is not None else None,
            error=self.error,
            num_cached_tokens=self.num_cached_tokens or 0,
            prompt_logprobs=self.prompt_logprobs,
        )
        self.num_emitted_chars = visible
        self.num_emitted_tokens = len(self.token_ids) - self.prompt_len
        return output


def find_stop_string(text: str, new_from: int, stops: list[str]) -> int | None:
    """Index where the earliest stop string starts in `text`, looking only at matches that end
    after `new_from` (older text was checked before); None if there is none."""
    found = None
    for stop in stops:
        index = text.find(stop, max(0, new_from - len(stop) + 1))
        if index != -1 and (found is None or index < found):
            found = index
    return found


def partial_stop_length(text: str, stops: list[str]) -> int:
    """Length of the longest end of `text` that is the beginning of a stop string: text that
    must not be streamed yet, since the next tokens may complete the stop string."""
    longest = 0
    for stop in stops:
        for length in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:length]):
                longest = length
                break
    return longest
