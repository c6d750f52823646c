"""Structured output: what a request's constraint is (a JSON schema, any JSON object, a regex, a
choice of strings or a Lark grammar), compiled once per distinct constraint into an llguidance
matcher, and the allowed-token bitmasks the sampler applies.

llguidance (PyPI `llguidance`, the `structured` extra) builds its tokenizer straight from the
checkpoint's tokenizer.json; it is imported on the first constrained request only.
"""
from __future__ import annotations

import functools
import json
import time
from collections import OrderedDict
from collections.abc import Mapping

import torch

from qwen2vl.errors import InputError

# The SamplingParams fields that constrain the output, at most one per request.
KINDS = ("json_schema", "json_object", "regex", "choice", "grammar")
# llguidance's own grammar format of each kind
_FORMATS = {"json_schema": "json_schema", "json_object": "json_schema", "regex": "regex", "choice": "choice",
            "grammar": "lark"}
ANY_JSON_OBJECT = '{"type": "object"}'
# JSON is written without optional whitespace unless the schema asks otherwise ("x-guidance"):
# a model that may always add one more newline can run to max_tokens without closing the object.
# The separators are Python's and Qwen's templates' (`tojson`): ", " and ": ".
JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
MAX_SPEC_CHARS = 256 * 1024  # a constraint's text (a tool list's schemas fit easily)
MAX_COMPILE_SECONDS = 2.0
CACHE_ENTRIES = 256  # compiled constraints kept, least recently used dropped


def response_format_fields(response_format) -> dict:
    """The SamplingParams fields of an OpenAI `response_format`: `{"type": "text"}` (none),
    `{"type": "json_object"}`, or `{"type": "json_schema", "json_schema": {"name": ..., "schema":
    {...}, "strict": ...}}`."""
    if response_format is None:
        return {}
    if not isinstance(response_format, Mapping):
        raise InputError("response_format must be an object such as {\"type\": \"json_object\"}",
                         field="response_format")
    kind = response_format.get("type")
    if kind == "text":
        return {}
    if kind == "json_object":
        return {"json_object": True}
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, Mapping) or not isinstance(spec.get("schema", {}), (Mapping, bool)):
            raise InputError("response_format.json_schema must be an object with the JSON schema in its "
                             "\"schema\" field", field="response_format.json_schema")
        # OpenAI allows leaving the schema out: any JSON object then
        return {"json_schema": dict(spec["schema"])} if "schema" in spec else {"json_object": True}
    raise InputError(f"response_format.type must be one of text, json_object, json_schema (got {kind!r})",
                     field="response_format.type")


def normalize(kind: str, value):
    """A constraint as the resolved SamplingParams holds it (checked, hashable text): a JSON
    schema as its JSON text (from a dict, a JSON string or a pydantic model class), a choice as a
    tuple of strings, a regex or Lark grammar as given."""
    if kind == "json_schema":
        if isinstance(value, type) and hasattr(value, "model_json_schema"):
            value = value.model_json_schema()
        if isinstance(value, str):
            try:
                parsed = json.loads(value)
            except ValueError as e:
                raise InputError(f"json_schema is not valid JSON: {e}", field="json_schema") from None
        else:
            parsed = value
        if not isinstance(parsed, (Mapping, bool)):
            raise InputError("json_schema must be a JSON schema: an object (a dict, its JSON text or a pydantic "
                             f"model class), got {type(value).__name__}", field="json_schema")
        text = value if isinstance(value, str) else json.dumps(parsed)
    elif kind == "choice":
        if isinstance(value, str) or not isinstance(value, (list, tuple)) or not value \
                or not all(isinstance(item, str) and item for item in value):
            raise InputError("choice must be a non-empty list of non-empty strings", field="choice")
        return tuple(value)
    elif kind == "json_object":
        if value is not True:
            raise InputError(f"json_object must be true or unset, got {value!r}", field="json_object")
        return True
    else:
        if not isinstance(value, str) or not value:
            raise InputError(f"{kind} must be a non-empty string", field=kind)
        text = value
    if len(text) > MAX_SPEC_CHARS:
        raise InputError(f"{kind} is {len(text)} characters long, over the limit of {MAX_SPEC_CHARS}", field=kind)
    return text


def _grammar_text(kind: str, spec) -> str:
    import llguidance

    if kind in ("json_schema", "json_object"):
        schema = ANY_JSON_OBJECT if kind == "json_object" else spec
        return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_STYLE)
    return llguidance.grammar_from(_FORMATS[kind], list(spec) if kind == "choice" else spec)


class GrammarCompiler:
    """Compiles constraints into llguidance matchers for one tokenizer, each distinct (kind,
    spec) once: a request gets a copy of the compiled matcher (its own parse state).

    `eos_token_ids` end generation where the grammar accepts: the masks allow them there, and
    only there.
    """

    def __init__(self, tokenizer_json, eos_token_ids):
        self._tokenizer_json = tokenizer_json  # () -> the tokenizer.json text, read on first use
        self._eos_token_ids = sorted(eos_token_ids)
        self._tokenizer = None
        self._compiled: OrderedDict = OrderedDict()
        self.num_compiled = 0

    def _llguidance(self):
        try:
            import llguidance
        except ImportError:
            raise InputError("structured output needs llguidance: pip install 'qwen2vl[structured]'") from None
        if self._tokenizer is None:
            self._tokenizer = llguidance.LLTokenizer(self._tokenizer_json(), eos_token=self._eos_token_ids)
        return llguidance

    def constraint(self, kind: str, spec) -> Constraint:
        """A request's constraint, with a fresh parse state; `InputError` naming the problem (the
        keyword, the position in the regex or grammar) when it does not compile. Called where
        requests are added to the engine (one thread at a time: the driver's)."""
        llguidance = self._llguidance()
        key = (kind, spec)
        compiled = self._compiled.get(key)
        if compiled is None:
            compiled = self._compile(llguidance, kind, spec)
            self._compiled[key] = compiled
            if len(self._compiled) > CACHE_ENTRIES:
                self._compiled.popitem(last=False)
        self._compiled.move_to_end(key)
        return Constraint(compiled.deep_copy(), (self._tokenizer.vocab_size + 31) // 32)

    def _compile(self, llguidance, kind: str, spec):
        start = time.perf_counter()
        try:
            grammar = _grammar_text(kind, spec)
        except ValueError as e:
            raise InputError(f"{kind}: {e}", field=kind) from None
        matcher = llguidance.LLMatcher(self._tokenizer, grammar, log_level=0, limits=_limits(llguidance))
        if matcher.is_error():
            raise InputError(f"{kind} is not supported: {_first_lines(matcher.get_error())}", field=kind)
        seconds = time.perf_counter() - start
        if seconds > MAX_COMPILE_SECONDS:
            raise InputError(f"{kind} took {seconds:.1f} s to compile, over the limit of {MAX_COMPILE_SECONDS} s; "
                             "simplify it", field=kind)
        self.num_compiled += 1
        return matcher


class Constraint:
    """One request's constraint and where its output stands in it (llguidance's matcher)."""

    def __init__(self, matcher, mask_width: int):
        self.matcher = matcher
        self.mask_width = mask_width  # 32-bit words of its allowed-token bitmask

    def advance(self, token_id: int) -> str | None:
        """Feed it the sampled token: None while the output goes on, "stop" when it is complete
        (nothing may follow), or an error message when the token broke it."""
        if not self.matcher.consume_token(token_id):
            return f"the constraint refused token {token_id}: {_first_lines(self.matcher.get_error(), 2)}"
        return "stop" if self.matcher.is_stopped() else None


def allowed_tokens(constraints: list[Constraint]) -> torch.Tensor:
    """The bitmasks `[len(constraints), mask_width]` int32 of the tokens each allows next: bit
    t % 32 of word t // 32 set when token t is allowed."""
    from llguidance.torch import fill_next_token_bitmask, fill_next_token_bitmask_par

    masks = torch.empty(len(constraints), constraints[0].mask_width, dtype=torch.int32)
    if len(constraints) == 1:
        fill_next_token_bitmask(constraints[0].matcher, masks, 0)
    else:  # llguidance's threads, without the GIL
        fill_next_token_bitmask_par(_executor(), [(c.matcher, row) for row, c in enumerate(constraints)], masks)
    return masks


@functools.lru_cache(maxsize=None)
def _executor():
    import llguidance

    return llguidance.LLExecutor()


def _limits(llguidance):
    # llguidance's own defaults, said explicitly: they bound a grammar's size and the work of its
    # compilation (about 20 ms of lexer fuel) and of each token's mask
    return llguidance.LLParserLimits(max_grammar_size=500_000, initial_lexer_fuel=1_000_000,
                                     step_lexer_fuel=200_000, max_items_in_row=2000)


def _first_lines(message: str, count: int = 6) -> str:
    return "\n".join(message.strip().splitlines()[:count])
