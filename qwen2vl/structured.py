"""Structured output: what a request's constraint is (a JSON schema, any JSON object, a regex, a
choice of strings or a Lark grammar), compiled once per distinct constraint into an llguidance
matcher, and the allowed-token bitmasks the sampler applies.

llguidance (PyPI `llguidance`, the `structured` extra) builds its tokenizer straight from the
checkpoint's tokenizer.json; it is imported on the first constrained request only (the server
builds its tokenizer at start: that holds the GIL for a second or more).

What a request carries cannot stall or crash the process: a constraint is bounded before it is
compiled (its size in bytes; a Lark grammar's rules; a schema's nesting, `$ref` chain and
properties per object), and compiled on threads of the compiler's own (`COMPILE_THREADS`, with a
`COMPILE_STACK_BYTES` stack: llguidance recurses once per chained rule or `$ref` and overflows a
default 8 MiB stack at about 2,500 rules or 900 `$defs`; it releases the GIL while it compiles),
under a deadline that refuses the request when it passes, whether or not the compile has ended.
"""
from __future__ import annotations

import functools
import json
import re
import threading
from collections import OrderedDict
from collections.abc import Mapping
from concurrent.futures import Future, InvalidStateError, ThreadPoolExecutor

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
MAX_SPEC_BYTES = 256 * 1024  # a constraint's text in UTF-8 (a tool list's schemas fit easily)
MAX_GRAMMAR_RULES = 1000  # rules and terminals of a Lark grammar
MAX_SCHEMA_DEPTH = 128  # nesting of a JSON schema's objects and arrays (llguidance's JSON parser's own limit)
MAX_REF_DEPTH = 64  # `$ref`s followed one inside another
# properties of one object schema: llguidance's parser holds about 4 items per optional property
# in one row, and refuses a row of over 2,000 (`_limits`) in the middle of generation
MAX_SCHEMA_PROPERTIES = 400
MAX_COMPILE_SECONDS = 2.0
COMPILE_THREADS = 2
COMPILE_STACK_BYTES = 256 << 20  # virtual: only the pages a compile touches are used
# What a cached compiled constraint is taken to hold: llguidance does not report it, and its
# lexer grows as masks are computed (about 14 MB once a 230 KB schema has been used), so it is
# estimated from the constraint's text.
CACHE_BYTES = 256 << 20
_CACHED_BYTES_PER_BYTE = 64
_MIN_CACHED_BYTES = 64 << 10
# the JSON Schema keywords that take an integer (2.0 is one: the JSON Schema test suite says so)
_INTEGER_KEYWORDS = frozenset({"minItems", "maxItems", "minLength", "maxLength", "minProperties", "maxProperties",
                               "minContains", "maxContains"})
_LARK_RULE = re.compile(r"^[ \t]*[?!]?[A-Za-z_][A-Za-z0-9_]*(\.-?[0-9]+)?[ \t]*:", re.MULTILINE)


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
        if spec.get("schema") is False:
            raise InputError("response_format.json_schema.schema is false, which no output satisfies",
                             field="response_format.json_schema")
        # OpenAI allows leaving the schema out: any JSON object then
        return {"json_schema": spec["schema"]} if "schema" in spec else {"json_object": True}
    raise InputError(f"response_format.type must be one of text, json_object, json_schema (got {kind!r})",
                     field="response_format.type")


class _Checked(str):
    """A constraint's text as `normalize` returned it: normalizing it again returns it as it is.
    A request's params are resolved where it is handed to the engine (to compile its constraint
    off the stepping thread) and again where the engine adds it; a 200 KB schema is not parsed
    and bounded a second time, on the stepping thread."""


def normalize(kind: str, value):
    """A constraint as the resolved SamplingParams holds it (checked, hashable text): a JSON
    schema as its JSON text (from a dict, a JSON string or a pydantic model class; `true` is any
    JSON value, integral floats such as `"maxItems": 2.0` are integers), a choice as a tuple of
    strings, a regex or Lark grammar as given. `InputError` when it is over a bound."""
    if isinstance(value, _Checked):
        return value
    if kind == "choice":
        if isinstance(value, str) or not isinstance(value, (list, tuple)) or not value \
                or not all(isinstance(item, str) and item for item in value):
            raise InputError("choice must be a non-empty list of non-empty strings", field="choice")
        _check_size(kind, json.dumps(value))
        return tuple(value)
    if kind == "json_object":
        if value is not True:
            raise InputError(f"json_object must be true or unset, got {value!r}", field="json_object")
        return True
    if kind == "json_schema":
        return _Checked(json.dumps(checked_schema(value)))
    if not isinstance(value, str) or not value:
        raise InputError(f"{kind} must be a non-empty string", field=kind)
    _check_size(kind, value)
    rules = len(_LARK_RULE.findall(value)) if kind == "grammar" else 0
    if rules > MAX_GRAMMAR_RULES:
        raise InputError(f"grammar has {rules} rules, over the limit of {MAX_GRAMMAR_RULES}", field=kind)
    return _Checked(value)


def _check_size(kind: str, text: str) -> None:
    size = len(text.encode())
    if size > MAX_SPEC_BYTES:
        raise InputError(f"{kind} is {size} bytes long, over the limit of {MAX_SPEC_BYTES}", field=kind)


def checked_schema(value, field: str = "json_schema") -> dict:
    """A JSON schema (a dict, its JSON text or a pydantic model class) as a dict, within the
    bounds, with integral floats as integers where the schema takes an integer and its objects
    closed to undeclared keys (`closed_objects`); `InputError` naming `field` (the request's name
    for it) when it is not."""
    if isinstance(value, type) and hasattr(value, "model_json_schema"):
        value = value.model_json_schema()
    if isinstance(value, str):
        _check_size(field, value)
        try:
            value = json.loads(value)
        except RecursionError:
            raise InputError(f"{field} nests deeper than the limit of {MAX_SCHEMA_DEPTH}",
                             field=field) from None
        except ValueError as e:
            raise InputError(f"{field} is not valid JSON: {e}", field=field) from None
    if value is True:
        return {}  # any JSON value
    if value is False:
        raise InputError(f"{field} is false, which no output satisfies", field=field)
    if not isinstance(value, Mapping):
        raise InputError(f"{field} must be a JSON schema: an object (a dict, its JSON text or a pydantic "
                         f"model class), got {type(value).__name__}", field=field)
    schema = _normalized_node(value, 0, field)
    try:
        _check_size(field, json.dumps(schema))  # as the client wrote it
    except (TypeError, ValueError) as e:
        raise InputError(f"{field} is not JSON: {e}", field=field) from None
    _check_ref_depth(schema, field)
    return closed_objects(schema)


def _normalized_node(node, depth: int, field: str):
    if depth > MAX_SCHEMA_DEPTH:
        raise InputError(f"{field} nests deeper than the limit of {MAX_SCHEMA_DEPTH}", field=field)
    if isinstance(node, Mapping):
        properties = node.get("properties")
        if isinstance(properties, Mapping) and len(properties) > MAX_SCHEMA_PROPERTIES:
            raise InputError(f"{field} has an object of {len(properties)} properties, over the limit of "
                             f"{MAX_SCHEMA_PROPERTIES}", field=field)
        return {key: int(item) if key in _INTEGER_KEYWORDS and isinstance(item, float) and item.is_integer()
                else _normalized_node(item, depth + 1, field) for key, item in node.items()}
    if isinstance(node, (list, tuple)):
        return [_normalized_node(item, depth + 1, field) for item in node]
    return node


# Keywords whose value is a subschema, a list of them, or a map of names to them, each at its own
# place in the instance (JSON Schema 2020-12 and draft 7's `items` list, `definitions`). The
# conditional and negating ones (`not`, `if`/`then`/`else`, `dependentSchemas`, `dependencies`) are
# not listed: what is under them is left as given.
_SUBSCHEMA = ("items", "additionalItems", "contains", "additionalProperties", "unevaluatedItems",
              "unevaluatedProperties")
_SUBSCHEMA_LISTS = ("prefixItems", "items")
_SUBSCHEMA_MAPS = ("properties", "patternProperties")
_DEFINITIONS = ("$defs", "definitions")
# keywords beside which an object schema is validated together with others at the same place
_CONDITIONS = ("not", "if", "then", "else", "dependentSchemas", "dependencies")


def closed_objects(schema: dict) -> dict:
    """`schema` (not changed) with `"additionalProperties": false` on every object schema that
    lists `properties` and says nothing of other keys, at any depth (`$defs`, `items`, `anyOf`
    branches...): JSON Schema allows any other key there, and a model given the chance writes
    keys the schema does not declare; OpenAI's strict function calling, and we, allow only the
    declared ones (those in `required` too). An explicit `additionalProperties` (or
    `unevaluatedProperties`) is kept. An object schema validated together with another that may
    declare keys (`allOf` members, `$ref` beside `properties`, `properties` beside `anyOf`
    branches that declare keys, `if`/`then`/`else`) is left open, with all it contains: closing
    each would forbid the other's keys. Declared keys are written once each (llguidance's
    grammar); with no other keys allowed, no key repeats."""
    shared: set[str] = set()  # `$ref`s to a schema validated together with others
    while True:
        closer = _ObjectCloser(shared)
        closed = closer.walk(schema, "#", True)
        if closer.shared_refs <= shared:
            return closed
        shared |= closer.shared_refs


class _ObjectCloser:
    def __init__(self, shared: set[str]):
        self.shared = shared
        self.shared_refs: set[str] = set()

    def walk(self, node, pointer: str, alone: bool):
        """`node` (a subschema at `pointer`) closed where `alone`: nothing else validates its place."""
        if not isinstance(node, Mapping):
            return node
        alone = alone and pointer not in self.shared
        own = isinstance(node.get("properties"), Mapping)
        branches = [branch for key in ("anyOf", "oneOf") for branch in _as_list(node.get(key))]
        # the schemas that constrain the keys of this place, alternatives counted once
        sources = (own + len([part for part in _as_list(node.get("allOf")) if _may_declare_keys(part)])
                   + ("$ref" in node) + any(key in node for key in _CONDITIONS)
                   + any(_may_declare_keys(branch) for branch in branches))
        alone = alone and sources <= 1
        if not alone and isinstance(node.get("$ref"), str):
            self.shared_refs.add(node["$ref"])
        result = {}
        for key, value in node.items():
            here = f"{pointer}/{_escaped(key)}"
            if key in _DEFINITIONS and isinstance(value, Mapping):
                result[key] = {name: self.walk(item, f"{here}/{_escaped(name)}", True) for name, item in value.items()}
            elif key in _SUBSCHEMA_MAPS and isinstance(value, Mapping):
                result[key] = {name: self.walk(item, f"{here}/{_escaped(name)}", alone) for name, item in value.items()}
            elif key in (*_SUBSCHEMA_LISTS, "allOf", "anyOf", "oneOf") and isinstance(value, list):
                result[key] = [self.walk(item, f"{here}/{index}", alone) for index, item in enumerate(value)]
            elif key in _SUBSCHEMA:
                result[key] = self.walk(value, here, alone)
            else:
                result[key] = value
        if alone and own and "additionalProperties" not in node and "unevaluatedProperties" not in node:
            undeclared = [name for name in _as_list(node.get("required"))
                          if isinstance(name, str) and name not in node["properties"]]
            result["properties"] = {**result["properties"], **{name: {} for name in undeclared}}
            result["additionalProperties"] = False
        return result


def _may_declare_keys(schema) -> bool:
    """Whether a subschema may allow object keys (a schema of `required` or bounds alone does not)."""
    return isinstance(schema, Mapping) and any(key in schema for key in (
        "properties", "patternProperties", "additionalProperties", "unevaluatedProperties", "$ref", "allOf",
        "anyOf", "oneOf", *_CONDITIONS))


def _as_list(value) -> list:
    return value if isinstance(value, list) else []


def _escaped(key: str) -> str:
    """A name as a JSON pointer writes it."""
    return str(key).replace("~", "~0").replace("/", "~1")


def _check_ref_depth(schema: dict, field: str) -> None:
    """`InputError` when local `$ref`s lead through more than MAX_REF_DEPTH others (a cycle, as in
    a recursive schema, is followed once)."""
    below: dict[str, int] = {}  # a reference -> the longest chain of references from its target

    def deepest(node, path: tuple[str, ...]) -> int:
        if isinstance(node, Mapping):
            ref = node.get("$ref")
            found = chain(ref, path) if isinstance(ref, str) and ref.startswith("#") else 0
            return max([found, *(deepest(item, path) for key, item in node.items() if key != "$ref")])
        if isinstance(node, list):
            return max((deepest(item, path) for item in node), default=0)
        return 0

    def chain(ref: str, path: tuple[str, ...]) -> int:
        if ref in path:
            return 0
        if len(path) >= MAX_REF_DEPTH:
            raise InputError(f"{field} has a chain of over {MAX_REF_DEPTH} $refs", field=field)
        if ref not in below:
            target = _resolve_pointer(schema, ref)
            below[ref] = 1 + (deepest(target, path + (ref,)) if target is not None else 0)
        if len(path) + below[ref] > MAX_REF_DEPTH:
            raise InputError(f"{field} has a chain of over {MAX_REF_DEPTH} $refs", field=field)
        return below[ref]

    try:
        deepest(schema, ())
    except RecursionError:  # deep nesting inside each of many $refs
        raise InputError(f"{field} nests deeper than the limit of {MAX_SCHEMA_DEPTH} through its $refs",
                         field=field) from None


def _resolve_pointer(schema: dict, ref: str):
    node = schema
    for part in ref[1:].split("/")[1:]:
        part = part.replace("~1", "/").replace("~0", "~")
        if isinstance(node, Mapping) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return None  # llguidance names it
    return node


def _grammar_text(kind: str, spec) -> str:
    import llguidance

    if kind in ("json_schema", "json_object"):
        schema = ANY_JSON_OBJECT if kind == "json_object" else spec
        return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_STYLE)
    return llguidance.grammar_from(_FORMATS[kind], list(spec) if kind == "choice" else spec)


def after_reasoning(grammar: str, thinking, eos_token_ids) -> str:
    """`grammar` (llguidance's JSON or Lark text) applied to a thinking model's answer only: free
    reasoning first, any tokens but `</think>` and the end of generation, then `</think>`, the
    newlines that follow it and the answer. `thinking`: the model's `reasoning.ThinkingTags`; when
    its prompts do not open the reasoning, the reasoning is optional and opens with `<think>`."""
    try:
        top = json.loads(grammar)
    except ValueError:
        top = None
    answer = top["grammars"] if isinstance(top, dict) else [{"lark_grammar": grammar}]
    free = ",".join(str(token) for token in sorted({thinking.end_id, *eos_token_ids}))
    reasoning = f'<[^{free}]>* <[{thinking.end_id}]> /\\n{{0,2}}/'
    if not thinking.opened_by_prompt:
        reasoning = f"(<[{thinking.start_id}]> {reasoning})?"
    prefix = {"name": "reasoning", "lark_grammar": f"start: {reasoning} @answer\n"}
    return json.dumps({"grammars": [prefix, {**answer[0], "name": "answer"}, *answer[1:]]})


class GrammarCompiler:
    """Compiles constraints into llguidance matchers for one tokenizer, each distinct (kind,
    spec) once: a request gets a copy of the compiled matcher (its own parse state).

    `compile` starts a compile on the compiler's threads and returns its future; `constraint`
    waits for it. A compile that runs past `compile_seconds` (counted from its start, not from
    its wait in the queue) fails its future then, while it runs; it is not cached. The compiled
    matchers kept are capped at `cache_bytes` (estimated from their text), least recently used
    dropped first. Thread-safe.

    `eos_token_ids` end generation where the grammar accepts: the masks allow them there, and
    only there. With `thinking` (a thinking model's tags), every constraint applies to the answer
    after the reasoning (`after_reasoning`).
    """

    def __init__(self, tokenizer_json, eos_token_ids, cache_bytes: int = CACHE_BYTES,
                 compile_seconds: float = MAX_COMPILE_SECONDS, thinking=None):
        self._tokenizer_json = tokenizer_json  # () -> the tokenizer.json text, read on first use
        self._eos_token_ids = sorted(eos_token_ids)
        self.thinking = thinking  # a thinking model's `reasoning.ThinkingTags` (set at load): constraints follow it
        self.cache_bytes = cache_bytes
        self.compile_seconds = compile_seconds
        self._lock = threading.Lock()  # guards the fields below
        self._tokenizer = None
        self._compiled: OrderedDict = OrderedDict()  # (kind, spec) -> (matcher, its estimated bytes)
        self.cached_bytes = 0
        self._compiling: dict[tuple, Future] = {}  # until the compile ends, even past its deadline
        self._threads: ThreadPoolExecutor | None = None
        self.num_compiled = 0

    def load(self) -> None:
        """Build llguidance's tokenizer now (the server does, before it serves: it holds the GIL
        for a second or more); nothing without llguidance installed."""
        try:
            self._llguidance()
        except InputError:
            pass

    def _llguidance(self):
        try:
            import llguidance
        except ImportError:
            raise InputError("structured output needs llguidance: pip install 'qwen2vl[structured]'") from None
        with self._lock:
            if self._tokenizer is None:
                self._tokenizer = llguidance.LLTokenizer(self._tokenizer_json(), eos_token=self._eos_token_ids)
        return llguidance

    def constraint(self, kind: str, spec) -> Constraint:
        """A request's constraint, with a fresh parse state; `InputError` naming the problem (the
        keyword, the position in the regex or grammar, a limit) when it does not compile."""
        matcher = self.compile(kind, spec).result()
        return Constraint(matcher.deep_copy(), (self._tokenizer.vocab_size + 31) // 32)

    def compile(self, kind: str, spec) -> Future:
        """The future of (kind, spec)'s compiled matcher: done already when cached, else compiled
        on the compiler's threads (one compile for concurrent requests of the same constraint)."""
        key = (kind, spec, self.thinking)  # a compile for the model as it is now
        with self._lock:
            cached = self._compiled.get(key)
            if cached is not None:
                self._compiled.move_to_end(key)
                future = Future()
                future.set_result(cached[0])
                return future
            future = self._compiling.get(key)
            if future is None:
                future = self._compiling[key] = Future()
                self._submit(self._run, key, future)
        return future

    def _submit(self, function, *args) -> None:
        """(With the lock held.) A compile thread is made on a submit: with the big stack."""
        if self._threads is None:
            self._threads = ThreadPoolExecutor(COMPILE_THREADS, thread_name_prefix="qwen2vl-grammar")
        with _STACK_SIZE_LOCK:
            default = threading.stack_size(COMPILE_STACK_BYTES)
            try:
                self._threads.submit(function, *args)
            finally:
                threading.stack_size(default)

    def _run(self, key: tuple, future: Future) -> None:
        """On a compile thread: compile `key`, failing `future` at the deadline if it is not done by then."""
        kind, spec, _ = key
        matcher = error = None
        try:
            llguidance = self._llguidance()
            deadline = threading.Timer(self.compile_seconds, _settle, (future, None, InputError(
                f"{kind} took over {self.compile_seconds:g} s to compile, the limit; simplify it", field=kind)))
            deadline.daemon = True
            deadline.start()
            try:
                matcher = self._compile(llguidance, kind, spec)
            finally:
                deadline.cancel()
        except InputError as e:
            error = e
        except BaseException as e:  # noqa: BLE001 - llguidance's panics too: this request's alone
            error = InputError(f"{kind} could not be compiled: {type(e).__name__}: {_first_lines(str(e), 2)}",
                               field=kind)
        with self._lock:
            del self._compiling[key]
            if matcher is not None and not future.done():
                self.num_compiled += 1
                self._cache(key, matcher)
        _settle(future, matcher, error)

    def _cache(self, key: tuple, matcher) -> None:
        """(With the lock held.)"""
        size = max(_MIN_CACHED_BYTES, _CACHED_BYTES_PER_BYTE * len(str(key[1]).encode()))
        if size > self.cache_bytes:
            return
        self._compiled[key] = (matcher, size)
        self.cached_bytes += size
        while self.cached_bytes > self.cache_bytes:
            _, (_, dropped) = self._compiled.popitem(last=False)
            self.cached_bytes -= dropped

    def _compile(self, llguidance, kind: str, spec):
        try:
            grammar = _grammar_text(kind, spec)
            if self.thinking is not None:
                grammar = after_reasoning(grammar, self.thinking, self._eos_token_ids)
        except ValueError as e:
            raise InputError(f"{kind}: {e}", field=kind) from None
        matcher = llguidance.LLMatcher(self._tokenizer, grammar, log_level=0, limits=_limits(llguidance))
        if matcher.is_error():
            error = _first_lines(matcher.get_error())
            if "coerce_one_of" in error:  # not on by default: an output could then match two branches
                error += '; set "x-guidance": {"coerce_one_of": true} in the schema to read this oneOf as anyOf'
            raise InputError(_rejection(kind, error), field=kind)
        return matcher


# threading.stack_size is process-wide: set for the moment a compile thread is made
_STACK_SIZE_LOCK = threading.Lock()


def _settle(future: Future, result, error: BaseException | None) -> None:
    """Complete `future` unless the deadline or the compile did first."""
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
    except InvalidStateError:
        pass


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


def _rejection(kind: str, error: str) -> str:
    """What is wrong with a constraint llguidance refused: a feature it lacks (its own words say
    so: "Unimplemented keys", "... is not supported"), else the constraint itself."""
    lacking = any(word in error.lower() for word in ("unimplemented", "not supported", "unsupported"))
    return f"{kind} uses what llguidance does not support: {error}" if lacking else f"{kind} is invalid: {error}"


def _first_lines(message: str, count: int = 6) -> str:
    return "\n".join(message.strip().splitlines()[:count])
