"""How one request chooses its tokens and when it stops."""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass

from qwen2vl import structured
from qwen2vl.errors import InputError

DEFAULT_MAX_TOKENS = 256
MAX_LOGPROBS = 20
MAX_LOGIT_BIAS = 100  # OpenAI's range for a logit bias: [-100, 100]
# Seeds are int64 (OpenAI's and vLLM's range): each maps to its own generator state, where torch
# would wrap a negative seed onto [2**63, 2**64).
SEED_RANGE = (-(1 << 63), (1 << 63) - 1)



def _field(default=None, *, flag: str | None = None, generation_config: bool = False, per_row: bool = False):
    """A sampling field. `flag`: the CLI offers it as `--name-with-dashes`, with this help;
    `generation_config`: `resolve` may take it from a checkpoint's generation_config.json (same
    name there); `per_row`: a number the sampler takes per row."""
    return dataclasses.field(default=default, metadata={"flag": flag, "generation_config": generation_config,
                                                        "per_row": per_row})


@dataclass
class SamplingParams:
    """Sampling and stopping settings of one request.

    Fields left `None` are filled by `resolve` from the checkpoint's generation_config.json, then
    from neutral defaults; explicit values always win. `temperature=0` means greedy decoding.
    `top_k` of 0 or -1 and `top_p` of 1 disable those filters.

    Penalties follow transformers / vLLM: `repetition_penalty` divides positive (multiplies
    negative) logits of every token already in the prompt or the output; `presence_penalty` and
    `frequency_penalty` (OpenAI semantics) subtract from the logits of tokens already generated.

    `logprobs=k` returns, per generated token, the log-probability of the sampled token plus the
    k most likely ones (`0`: only the sampled token's). They are the model's own distribution:
    log-softmax of the raw logits, before penalties, temperature and filters (as transformers'
    `output_logits` and vLLM's default).

    `stop` strings end generation and are cut from the text together with everything after
    them. `stop_token_ids` and the model's end-of-sequence ids end generation too (unless
    `ignore_eos`, which ignores only the model's end-of-sequence ids); the stopping token stays in
    `token_ids` but adds no text. `min_tokens` (vLLM's): those stopping tokens cannot be sampled
    before `min_tokens` tokens were generated (stop strings still apply).

    `prompt_logprobs=k` (vLLM's) returns, for each prompt token after the first, its
    log-probability given the tokens before it and the k most likely there; such a prompt is
    computed whole (not from the prefix cache).

    `logit_bias` (OpenAI's) maps token ids to a number in [-100, 100] added to their logits before
    sampling (after the penalties; -100 all but bans a token, 100 all but forces it). Logprobs
    stay the model's own, before the bias.

    Structured output (at most one of these; see `qwen2vl.structured`): `json_schema` (a dict,
    its JSON text or a pydantic model class), `json_object=True` (any JSON object), `regex`,
    `choice` (a list of strings) or `grammar` (Lark text, llguidance's dialect) restrict every
    sampled token to those that keep the output valid, in any sampling mode; end-of-sequence is
    allowed only where the output is complete, and generation stops once nothing may follow.
    JSON is written without optional whitespace unless the schema's "x-guidance" asks for it.
    Logprobs stay the model's own, before the constraint.
    """

    max_tokens: int | None = _field(flag="most tokens to generate")
    temperature: float | None = _field(flag="0 = greedy", generation_config=True, per_row=True)
    top_p: float | None = _field(flag="", generation_config=True, per_row=True)
    top_k: int | None = _field(flag="", generation_config=True, per_row=True)
    min_p: float | None = _field(flag="", per_row=True)
    repetition_penalty: float | None = _field(flag="", generation_config=True, per_row=True)
    presence_penalty: float | None = _field(flag="", per_row=True)
    frequency_penalty: float | None = _field(flag="", per_row=True)
    seed: int | None = _field(flag="makes sampling reproducible")
    stop: str | list[str] | None = _field(flag="stop string (repeatable)")
    stop_token_ids: list[int] | None = _field()
    logprobs: int | None = _field()
    ignore_eos: bool = _field(False)
    skip_special_tokens: bool = _field(True)
    min_tokens: int = _field(0, flag="fewest tokens to generate before an end-of-sequence token may end it")
    logit_bias: dict[int, float] | None = _field()
    prompt_logprobs: int | None = _field()
    json_schema: dict | str | type | None = _field(flag="FILE: the output is JSON valid against this JSON schema")
    json_object: bool = _field(False, flag="the output is a JSON object")
    regex: str | None = _field(flag="the output matches this regular expression")
    choice: list[str] | None = _field(flag="A,B,...: the output is one of these strings")
    grammar: str | None = _field(flag="FILE: the output follows this Lark grammar (llguidance's dialect)")

    @classmethod
    def from_overrides(cls, params: SamplingParams | None = None, **overrides) -> SamplingParams:
        """A copy of `params` (or of the defaults) with keyword overrides applied.

        Accepts the field names above and transformers' `generate` names: `max_new_tokens`
        (= `max_tokens`) and `do_sample` (`False` = greedy; `True` keeps the temperature, and an
        explicit `temperature=0` stays greedy), and OpenAI's `response_format` (`{"type":
        "json_object"}`, `{"type": "json_schema", "json_schema": {"schema": ...}}`). Unknown names
        raise `InputError`.
        """
        base = params if params is not None else cls()
        overrides = dict(overrides)
        if "response_format" in overrides:
            overrides.update(structured.response_format_fields(overrides.pop("response_format")))
        if "max_new_tokens" in overrides:
            if "max_tokens" in overrides:
                raise InputError("give either max_tokens or max_new_tokens, not both")
            overrides["max_tokens"] = overrides.pop("max_new_tokens")
        do_sample = overrides.pop("do_sample", None)
        if do_sample is False:
            overrides["temperature"] = 0.0
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - fields)
        if unknown:
            raise InputError(
                f"unknown sampling parameter(s) {', '.join(unknown)}; "
                f"known: {', '.join(sorted(fields | {'max_new_tokens', 'do_sample', 'response_format'}))}"
            )
        return dataclasses.replace(base, **overrides)

    def resolve(self, generation_config: dict | None = None, vocab_size: int | None = None) -> SamplingParams:
        """Fill unset fields from `generation_config` (a parsed generation_config.json), then
        from neutral defaults; returns a new object, validated (token ids below `vocab_size`),
        with no `None` left but `seed` and `logprobs`.

        As in transformers, `do_sample: false` in the generation config means greedy unless the
        caller set a temperature.
        """
        config = generation_config or {}
        values = dataclasses.asdict(self)
        for name in fields_where("generation_config"):
            if values[name] is None and config.get(name) is not None:
                values[name] = config[name]
        if self.temperature is None and config.get("do_sample") is False:
            values["temperature"] = 0.0
        if values["max_tokens"] is None:
            values["max_tokens"] = config.get("max_new_tokens") or DEFAULT_MAX_TOKENS
        defaults = dict(
            temperature=1.0, top_p=1.0, top_k=0, min_p=0.0,
            repetition_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0,
        )
        for name, default in defaults.items():
            if values[name] is None:
                values[name] = default
        if values["top_k"] == -1:
            values["top_k"] = 0
        stop = values["stop"]
        values["stop"] = [stop] if isinstance(stop, str) else list(stop or [])
        values["stop_token_ids"] = list(values["stop_token_ids"] or [])
        values["logit_bias"] = dict(values["logit_bias"] or {})
        for kind in self._constraint_kinds():
            values[kind] = structured.normalize(kind, getattr(self, kind))
        resolved = SamplingParams(**values)
        resolved.validate(vocab_size)
        return resolved

    @property
    def constraint(self) -> tuple[str, object] | None:
        """The structured-output constraint as (kind, spec), or None (resolved params)."""
        kinds = self._constraint_kinds()
        return (kinds[0], getattr(self, kinds[0])) if kinds else None

    def _constraint_kinds(self) -> list[str]:
        """The structured-output fields set (json_object=False sets nothing)."""
        return [kind for kind in structured.KINDS if getattr(self, kind) not in (None, False)]

    @property
    def greedy(self) -> bool:
        """Whether the next token is always the most likely one (after penalties): temperature 0,
        or top_k 1, which keeps only that token at any temperature (the card's checkpoints ship
        top_k 1), so the sampler can take the argmax without drawing. The one rule for it:
        `do_sample=False` (the caller's or the generation config's) reaches it as temperature 0,
        and the engine reads it here (and through `sampler_row`, `has_filter`), never temperature
        or top_k."""
        return self.temperature == 0 or self.top_k == 1

    @property
    def has_filter(self) -> bool:
        """Whether top-k, top-p or min-p leaves out tokens for a draw (a greedy request draws none)."""
        return not self.greedy and (self.top_k > 0 or self.top_p < 1 or self.min_p > 0)

    def sampler_row(self) -> list[float]:
        """The numbers the sampler takes for this request (resolved params), in `SAMPLER_COLUMNS`
        order; a greedy request's temperature is 0 there, which is how the sampler knows it."""
        return [0.0 if name == "temperature" and self.greedy else getattr(self, name) for name in SAMPLER_COLUMNS]

    @property
    def has_penalty(self) -> bool:
        """Whether a penalty reads the tokens so far (resolved params: no field is None)."""
        return self.repetition_penalty != 1 or self.presence_penalty != 0 or self.frequency_penalty != 0

    def validate(self, vocab_size: int | None = None, names: Mapping[str, str] | None = None) -> None:
        """Raise `InputError` naming the first field that is out of range (also as its `field`).

        With `vocab_size`, token ids (`stop_token_ids`, `logit_bias`) must be below it. `names`
        maps field names to the caller's where they differ (the server's `top_logprobs` for
        `logprobs`), for the messages and `field`.
        """
        names = names or {}

        def fail(name: str, problem: str) -> None:
            shown = names.get(name, name)
            raise InputError(f"sampling parameter {shown}{problem}", field=shown)

        def check(ok: bool, name: str, expected: str) -> None:
            if not ok:
                fail(name, f"={getattr(self, name)!r} is invalid: expected {expected}")

        def is_int(value) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        def is_number(value) -> bool:
            return isinstance(value, (int, float)) and not isinstance(value, bool)

        def optional(name: str, ok) -> bool:
            value = getattr(self, name)
            return value is None or ok(value)

        def token_ids_in_vocabulary(name: str, ids) -> None:
            bad = next((token for token in ids if vocab_size is not None and token >= vocab_size), None)
            if bad is not None:
                fail(name, f": token id {bad} is outside the vocabulary [0, {vocab_size})")

        check(optional("max_tokens", lambda v: is_int(v) and v >= 1), "max_tokens", "an integer >= 1")
        check(is_int(self.min_tokens) and self.min_tokens >= 0, "min_tokens", "an integer >= 0")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            fail("min_tokens", f"={self.min_tokens} is invalid: expected at most "
                               f"{names.get('max_tokens', 'max_tokens')}={self.max_tokens}")
        check(optional("temperature", lambda v: is_number(v) and v >= 0), "temperature", "a number >= 0 (0 = greedy)")
        check(optional("top_p", lambda v: is_number(v) and 0 < v <= 1), "top_p", "a number in (0, 1]")
        check(optional("top_k", lambda v: is_int(v) and v >= -1), "top_k", "an integer >= 0 (0 or -1 = off)")
        check(optional("min_p", lambda v: is_number(v) and 0 <= v <= 1), "min_p", "a number in [0, 1]")
        check(optional("repetition_penalty", lambda v: is_number(v) and v > 0), "repetition_penalty", "a number > 0 (1 = off)")
        for name in ("presence_penalty", "frequency_penalty"):
            check(optional(name, lambda v: is_number(v) and -2 <= v <= 2), name, "a number in [-2, 2]")
        check(optional("seed", lambda v: is_int(v) and SEED_RANGE[0] <= v <= SEED_RANGE[1]), "seed",
              f"an integer in [{SEED_RANGE[0]}, {SEED_RANGE[1]}] (int64)")
        for name in ("logprobs", "prompt_logprobs"):
            check(optional(name, lambda v: is_int(v) and 0 <= v <= MAX_LOGPROBS), name,
                  f"an integer in [0, {MAX_LOGPROBS}]")
        check(
            optional("stop", lambda v: (isinstance(v, str) and v != "")
                     or (isinstance(v, (list, tuple)) and all(isinstance(s, str) and s for s in v))),
            "stop", "a non-empty string or a list of non-empty strings",
        )
        check(
            optional("stop_token_ids", lambda v: isinstance(v, (list, tuple)) and all(is_int(t) and t >= 0 for t in v)),
            "stop_token_ids", "a list of token ids",
        )
        token_ids_in_vocabulary("stop_token_ids", self.stop_token_ids or ())
        check(optional("logit_bias", lambda v: isinstance(v, Mapping) and all(is_int(t) and t >= 0 for t in v)),
              "logit_bias", "a mapping of token ids to numbers")
        token_ids_in_vocabulary("logit_bias", self.logit_bias or {})
        constraints = [names.get(kind, kind) for kind in self._constraint_kinds()]
        if len(constraints) > 1:
            fail(constraints[1], f": give at most one structured-output constraint, got {' and '.join(constraints)}")
        for token, bias in (self.logit_bias or {}).items():
            if not (is_number(bias) and -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS):
                fail("logit_bias", f": the bias of token id {token} is {bias!r}, expected a number in "
                                   f"[-{MAX_LOGIT_BIAS}, {MAX_LOGIT_BIAS}]")


def fields_where(key: str) -> tuple[str, ...]:
    """The names of the sampling fields whose `key` metadata is set (see `_field`)."""
    return tuple(f.name for f in dataclasses.fields(SamplingParams) if f.metadata[key] not in (None, False))


# The per-row numbers a sampling batch carries, as `SamplingParams` names them.
SAMPLER_COLUMNS = fields_where("per_row")
