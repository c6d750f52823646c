"""Tool-call arguments and JSON-schema answers hold only the keys their schema declares, each once,
unless the schema allows more (`structured.closed_objects`): checked with jsonschema, a walk for
undeclared keys and a parse that sees repeated keys, over random nested schemas and seeds, through
the grammars the server builds (`tool_choice` required, named and auto; `response_format`),
sampled uniformly among the tokens each grammar allows (what a random model under it does)."""
from __future__ import annotations

import copy
import json
import random

import numpy as np
import pytest

from qwen2vl.structured import _grammar_text, closed_objects, normalize, response_format_fields
from qwen2vl.tool_calls import TOOL_CALL_START, parse_tool_calls, tool_call_grammar

llguidance = pytest.importorskip("llguidance")
jsonschema = pytest.importorskip("jsonschema")

from test_tool_calls import _lltokenizer  # noqa: E402

TOOL_CALL_ID = 151657


@pytest.fixture(scope="module")
def tokenizer():
    return _lltokenizer("demo")


# --- the rule, by hand -------------------------------------------------------------------------

def test_objects_with_properties_are_closed_at_every_depth():
    schema = {"type": "object", "properties": {
        "a": {"type": "object", "properties": {"x": {"type": "integer"}}},
        "b": {"type": "array", "items": {"$ref": "#/$defs/point"}},
        "c": {"anyOf": [{"type": "object", "properties": {"y": {}}}, {"type": "null"}]},
        "d": {"type": "array", "prefixItems": [{"properties": {"p": {}}}]},
        "open": {"type": "object", "properties": {"z": {}}, "additionalProperties": True},
        "typed": {"type": "object", "properties": {"z": {}}, "additionalProperties": {"type": "integer"}},
        "data": {"enum": [{"properties": {"q": 1}}], "default": {"properties": {}}},
        "properties": {"type": "object", "properties": {"properties": {}}}},
        "required": ["a", "undeclared"],
        "$defs": {"point": {"type": "object", "properties": {"x": {}}}}}
    before = copy.deepcopy(schema)
    closed = closed_objects(schema)
    assert schema == before  # the caller's schema is not changed
    assert closed["additionalProperties"] is False
    # a key `required` names is declared (JSON Schema allowed it as an extra key: any value)
    assert list(closed["properties"])[-1] == "undeclared" and closed["properties"]["undeclared"] == {}
    props = closed["properties"]
    assert props["a"]["additionalProperties"] is False
    assert closed["$defs"]["point"]["additionalProperties"] is False
    assert props["c"]["anyOf"][0]["additionalProperties"] is False and props["c"]["anyOf"][1] == {"type": "null"}
    assert props["d"]["prefixItems"][0]["additionalProperties"] is False
    assert props["open"]["additionalProperties"] is True  # an explicit value is kept
    assert props["typed"]["additionalProperties"] == {"type": "integer"}
    assert props["data"] == before["properties"]["data"]  # values, not schemas
    assert props["properties"] == {"type": "object", "properties": {"properties": {}}, "additionalProperties": False}
    assert list(props["a"]) == ["type", "properties", "additionalProperties"]


def test_objects_validated_together_are_left_open():
    """Closing each of two schemas that apply to one place would forbid the other's keys."""
    schema = {"type": "object", "properties": {
        "both": {"allOf": [{"$ref": "#/$defs/a"}, {"properties": {"b": {}}}]},
        "single": {"allOf": [{"properties": {"s": {}}}]},
        "beside_ref": {"$ref": "#/$defs/c", "properties": {"extra": {}}},
        "tagged": {"properties": {"kind": {}}, "oneOf": [{"properties": {"r": {}}}, {"properties": {"side": {}}}]},
        "required_branches": {"properties": {"x": {}, "y": {}}, "anyOf": [{"required": ["x"]}, {"required": ["y"]}]},
        "conditional": {"properties": {"k": {}}, "if": {"properties": {"k": {"const": 1}}},
                        "then": {"properties": {"n": {}}}}},
        "$defs": {"a": {"properties": {"a": {}}}, "c": {"properties": {"c": {}}}, "alone": {"properties": {}}}}
    closed = closed_objects(schema)
    props = closed["properties"]
    assert props["both"] == schema["properties"]["both"]
    assert closed["$defs"]["a"] == schema["$defs"]["a"] and closed["$defs"]["c"] == schema["$defs"]["c"]
    assert props["beside_ref"] == schema["properties"]["beside_ref"]
    assert props["tagged"] == schema["properties"]["tagged"]
    assert props["conditional"] == schema["properties"]["conditional"]  # nothing under if/then/else either
    assert props["single"]["allOf"][0]["additionalProperties"] is False
    assert props["required_branches"]["additionalProperties"] is False
    assert closed["$defs"]["alone"]["additionalProperties"] is False
    assert closed["additionalProperties"] is False


def _accepts(tokenizer, grammar: str, text: str) -> bool:
    matcher = llguidance.LLMatcher(tokenizer, grammar, log_level=0)
    assert not matcher.is_error(), matcher.get_error()
    return matcher.consume_tokens(tokenizer.tokenize_str(text)) and matcher.is_accepting()


def _schema_grammar(schema) -> str:
    """The grammar of a `response_format` json_schema answer, as the server builds it."""
    fields = response_format_fields({"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}})
    return _grammar_text("json_schema", normalize("json_schema", fields["json_schema"]))


def test_only_declared_keys_each_once_unless_more_are_allowed(tokenizer):
    declared = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "string"}}}
    grammar = _schema_grammar(declared)
    assert _accepts(tokenizer, grammar, '{"a": 1, "b": "x"}') and _accepts(tokenizer, grammar, '{"b": "x"}')
    for bad in ('{"a": 1, "c": 2}', '{"a": 1, "a": 2}', '{"a": 1, "b": "x", "b": "y"}', '{"zz": 0}'):
        assert not _accepts(tokenizer, grammar, bad), bad
    more = _schema_grammar({**declared, "additionalProperties": True})
    assert _accepts(tokenizer, more, '{"a": 1, "c": 2}') and not _accepts(tokenizer, more, '{"a": 1, "a": 2}')
    typed = _schema_grammar({**declared, "additionalProperties": {"type": "integer"}})
    assert _accepts(tokenizer, typed, '{"a": 1, "c": 2}') and not _accepts(tokenizer, typed, '{"a": 1, "c": "x"}')
    # an object without `properties` declares nothing and stays any object
    assert _accepts(tokenizer, _schema_grammar({"type": "object"}), '{"any": [1]}')


def test_auto_tool_choice_is_free_text_with_valid_calls(tokenizer):
    tool = {"type": "function", "function": {"name": "tap", "parameters": {
        "type": "object", "properties": {"x": {"type": "integer"}, "y": {"type": "integer"}}, "required": ["x"]}}}
    call = '<tool_call>\n{"name": "tap", "arguments": {"x": 1, "y": 2}}\n</tool_call>'
    grammar = tool_call_grammar([tool], "auto", parallel=True)
    for good in ("Just text, with <tool and _call> in it.", call, f"Tapping.\n{call}\n{call}\nDone."):
        assert _accepts(tokenizer, grammar, good), good
    for bad in (call.replace('"y": 2', '"z": 2'), call.replace('"y": 2', '"x": 2'),
                call.replace('"tap"', '"fly"'), '<tool_call>\nnot a call\n</tool_call>'):
        assert not _accepts(tokenizer, grammar, bad), bad
    # the marker spelled in ordinary tokens, which the parser would read as a call
    spelled = tokenizer.tokenize_str("see <tool") + tokenizer.tokenize_str("_call>")
    assert TOOL_CALL_ID not in spelled
    matcher = llguidance.LLMatcher(tokenizer, grammar, log_level=0)
    assert not matcher.consume_tokens(spelled)
    single = tool_call_grammar([tool], "auto", parallel=False)
    assert _accepts(tokenizer, single, f"Tapping.\n{call}") and not _accepts(tokenizer, single, f"{call}\n{call}")
    assert tool_call_grammar([], "auto") is None and tool_call_grammar([tool], "none") is None


# --- random schemas, sampled -------------------------------------------------------------------

SCALARS = [
    lambda rng: {"type": "integer", "minimum": rng.randint(-9, 0), "maximum": rng.randint(0, 99)},
    lambda rng: {"type": "string", "maxLength": rng.randint(0, 6)},
    lambda rng: {"type": "boolean"},
    lambda rng: {"type": "null"},
    lambda rng: {"enum": rng.sample(["red", "green", 3, None, True], rng.randint(1, 3))},
    lambda rng: {"const": rng.choice(["on", 0, False])},
    lambda rng: {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 9}, {"type": "string", "maxLength": 3}]},
]
NAMES = ["id", "name", "city", "unit", "count", "tags", "mode", "x", "y", "query", "limit", "options"]


class SchemaMaker:
    """Random nested object schemas: scalar, array, nested-object and `$ref` properties, random
    `required` sets and property orders, `$defs`, objects among `anyOf` branches; now and then an
    explicit `"additionalProperties": false`."""

    def __init__(self, seed: int):
        self.rng = random.Random(seed)
        self.defs: dict[str, dict] = {}

    def schema(self) -> dict:
        root = self.object(depth=0)
        if self.defs:
            root["$defs"] = self.defs
        return root

    def object(self, depth: int) -> dict:
        rng = self.rng
        names = rng.sample(NAMES, rng.randint(1 if depth else 0, 4))
        node = {"type": "object", "properties": {name: self.value(depth + 1) for name in names}}
        if names and rng.random() < 0.7:
            node["required"] = rng.sample(names, rng.randint(1, len(names)))
        if rng.random() < 0.15:  # (other keys allowed: tested alone, their names are long under uniform sampling)
            node["additionalProperties"] = False
        return node

    def value(self, depth: int) -> dict:
        rng = self.rng
        kind = rng.random() if depth < 3 else 0.0
        if kind < 0.55:
            return rng.choice(SCALARS)(rng)
        if kind < 0.7:
            return {"type": "array", "maxItems": rng.randint(0, 2), "items": self.value(depth + 1)}
        if kind < 0.85:
            return self.object(depth)
        if kind < 0.93:
            name = f"def{len(self.defs)}"
            self.defs[name] = {}  # the name taken before the objects inside take theirs
            self.defs[name] = self.object(depth)
            return {"$ref": f"#/$defs/{name}"}
        return {"anyOf": [self.object(depth), {"type": "null"}]}


class Pairs(list):
    """A JSON object as its (key, value) pairs in order, repeats kept."""


def key_problems(value, schema, root, path="$") -> list[str]:
    """Undeclared keys where the schema says nothing of other keys, and repeated keys where the
    schema allows no other keys or declares the key, anywhere in `value` (parsed into `Pairs`)."""
    schema = _resolved(schema, root)
    if isinstance(schema, dict) and "anyOf" in schema:  # the branches here differ by type
        branches = [_resolved(branch, root) for branch in schema["anyOf"]]
        schema = next((branch for branch in branches if _fits(value, branch)), {})
    problems = []
    if isinstance(value, Pairs):
        keys = [key for key, _ in value]
        declared = schema.get("properties", {})
        more = schema.get("additionalProperties", "unsaid")
        if more == "unsaid" and "properties" in schema:
            problems += [f"{path}: undeclared {key!r}" for key in keys if key not in declared]
        problems += [f"{path}: repeated {key!r}" for key in sorted(set(keys))
                     if keys.count(key) > 1 and (key in declared or more in (False, "unsaid"))]
        for key, item in value:
            problems += key_problems(item, declared.get(key, more if isinstance(more, dict) else {}), root,
                                     f"{path}.{key}")
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for index, item in enumerate(value):
            problems += key_problems(item, schema["items"], root, f"{path}[{index}]")
    return problems


def _resolved(schema, root):
    if isinstance(schema, dict) and "$ref" in schema:
        return root["$defs"][schema["$ref"].rsplit("/", 1)[1]]
    return schema


def _fits(value, branch) -> bool:
    return (branch.get("type") == "object") == isinstance(value, Pairs)


def plain(value):
    if isinstance(value, Pairs):
        return {key: plain(item) for key, item in value}
    return [plain(item) for item in value] if isinstance(value, list) else value


def check_answer(text: str, schema: dict):
    """The answer valid against `schema` as given (closing only narrows it), with only declared
    keys (unless allowed more), none repeated."""
    value = json.loads(text, object_pairs_hook=Pairs)
    jsonschema.validate(plain(value), schema)
    assert key_problems(value, schema, schema) == [], text
    return value


def draw(tokenizer, grammar: str, seed: int, prefer=(), end_chance: float = 0.5,
         max_tokens: int = 600) -> tuple[str, list[int]]:
    """A reply drawn uniformly among the tokens the grammar allows, ending with `end_chance` where
    it may end; one of the `prefer` tokens allowed is taken instead with chance 1/3."""
    matcher = llguidance.LLMatcher(tokenizer, grammar, log_level=0)
    assert not matcher.is_error(), matcher.get_error()
    rng, tokens = random.Random(seed), []
    for _ in range(max_tokens):
        mask = np.frombuffer(matcher.compute_bitmask(), np.uint8)
        bits = np.unpackbits(mask, bitorder="little")[:tokenizer.vocab_size]
        bits[tokenizer.eos_token] = 0
        allowed = np.flatnonzero(bits)
        if matcher.is_accepting() and (rng.random() < end_chance or not len(allowed)):
            return tokenizer.decode_str(tokens), tokens
        preferred = [token for token in prefer if bits[token]]
        if preferred and rng.random() < 1 / 3:
            token = rng.choice(preferred)
        else:
            token = int(allowed[rng.randrange(len(allowed))])
        assert matcher.consume_token(token), matcher.get_error()
        tokens.append(token)
    pytest.fail("the grammar did not finish within max_tokens")


SEEDS = range(6)


def random_schemas(count: int, offset: int) -> list[dict]:
    return [SchemaMaker(offset + index).schema() for index in range(count)]


@pytest.mark.parametrize("seed", SEEDS)
def test_random_response_format_schemas(tokenizer, seed):
    for schema in random_schemas(16, 1000 * seed):
        grammar = _schema_grammar(schema)
        for draw_seed in range(2):
            check_answer(draw(tokenizer, grammar, draw_seed)[0], schema)


def _tools(schemas: list[dict]) -> list[dict]:
    return [{"type": "function", "function": {"name": f"f{index}", "parameters": schema}}
            for index, schema in enumerate(schemas)]


def check_calls(text: str, tools: list[dict]) -> list:
    by_name = {tool["function"]["name"]: tool["function"]["parameters"] for tool in tools}
    content, calls = parse_tool_calls(text)
    assert content is None or TOOL_CALL_START not in content
    for call in calls:
        check_answer(call.arguments, by_name[call.name])
    return calls


@pytest.mark.parametrize("seed", SEEDS)
def test_random_forced_tool_calls(tokenizer, seed):
    """`tool_choice` required (parallel calls or one) and named, over random `parameters`."""
    tools = _tools(random_schemas(4, 1000 * seed + 500))
    originals = copy.deepcopy(tools)
    for choice, parallel in (("required", True), ("required", False),
                             ({"type": "function", "function": {"name": "f2"}}, True)):
        grammar = tool_call_grammar(tools, choice, parallel)
        for draw_seed in range(3):
            text, _ = draw(tokenizer, grammar, draw_seed)
            calls = check_calls(text, tools)
            assert parse_tool_calls(text)[0] is None and calls and (parallel or len(calls) == 1)
            assert isinstance(choice, str) or {call.name for call in calls} == {"f2"}
    assert tools == originals  # the caller's schemas are not changed


@pytest.mark.parametrize("seed", SEEDS)
def test_random_auto_tool_calls(tokenizer, seed):
    """`tool_choice` auto: free text with calls in it; every `<tool_call>` is a valid call."""
    tools = _tools(random_schemas(3, 1000 * seed + 700))
    grammar = tool_call_grammar(tools, "auto", parallel=True)
    made = 0
    for draw_seed in range(4):
        text, tokens = draw(tokenizer, grammar, draw_seed, prefer=[TOOL_CALL_ID], end_chance=0.1)
        calls = check_calls(text, tools)
        assert len(calls) == tokens.count(TOOL_CALL_ID)
        made += len(calls)
    assert made >= 2


def test_an_explicit_additional_properties_still_allows_extra_keys(tokenizer):
    """`additionalProperties` given is kept: sampled answers and arguments do carry other keys,
    the declared one once (llguidance enforces uniqueness for declared keys only)."""
    schema = {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9}},
              "required": ["a"], "additionalProperties": {"type": "integer", "minimum": 0, "maximum": 9}}
    quote = tokenizer.tokenize_str('"')  # closes a key: names stay short
    replies = [draw(tokenizer, _schema_grammar(schema), seed, prefer=quote)[0] for seed in range(6)]
    replies += [call.arguments for seed in range(6) for call in parse_tool_calls(
        draw(tokenizer, tool_call_grammar(_tools([schema]), "required", False), seed, prefer=quote)[0])[1]]
    extra = 0
    for reply in replies:
        pairs = json.loads(reply, object_pairs_hook=list)
        jsonschema.validate(dict(pairs), schema)
        assert [key for key, _ in pairs].count("a") == 1
        extra += any(key != "a" for key, _ in pairs)
    assert extra >= 4


def test_a_schema_is_closed_where_it_is_normalized():
    """One place for every JSON schema: `json_schema=`, `response_format`, `structured_outputs`
    and tools' `parameters` all pass through `normalize` / `checked_schema`."""
    schema = {"type": "object", "properties": {"a": {}}}
    assert json.loads(normalize("json_schema", schema)) == {**schema, "additionalProperties": False}
    opened = {**schema, "additionalProperties": True}
    assert json.loads(normalize("json_schema", opened)) == opened


def test_auto_tool_calls_after_the_reasoning(tokenizer):
    """A thinking model's reply: free reasoning (a `<tool_call>` in it is not a call), then the
    answer under the "auto" grammar."""
    from qwen2vl.reasoning import ThinkingTags
    from qwen2vl.structured import after_reasoning

    think, end_think, eos = 151667, 151668, [151643, 151645]
    tool = _tools([{"type": "object", "properties": {"x": {"type": "integer"}}}])
    grammar = after_reasoning(tool_call_grammar(tool, "auto"), ThinkingTags(think, end_think, True), eos)
    thought = tokenizer.tokenize_str('Maybe <tool_call>\n{"name": "f0", "arguments": {"y": 1}}\n</tool_call>')
    for answer, valid in (('Calling.\n<tool_call>\n{"name": "f0", "arguments": {"x": 1}}\n</tool_call>', True),
                          ("No call.", True),
                          ('<tool_call>\n{"name": "f0", "arguments": {"x": 1, "y": 2}}\n</tool_call>', False)):
        matcher = llguidance.LLMatcher(tokenizer, grammar, log_level=0)
        assert not matcher.is_error(), matcher.get_error()
        tokens = thought + [end_think] + tokenizer.tokenize_str("\n\n" + answer)
        assert (matcher.consume_tokens(tokens) and matcher.is_accepting()) == valid, answer


def test_server_requests_constrain_auto_calls_unless_a_format_is_asked():
    from qwen2vl.server.requests import ChatCompletionRequest

    tools = _tools([{"type": "object", "properties": {"x": {"type": "integer"}}}])
    messages = [{"role": "user", "content": "Tap."}]
    param, constraint = ChatCompletionRequest(messages=messages, tools=tools).constraint()
    assert param == "tools" and constraint == {"grammar": tool_call_grammar(tools, "auto")}
    assert ChatCompletionRequest(messages=messages, tools=tools, tool_choice="none").constraint() == (None, {})
    # "auto" (the default) beside a response format: the format constrains the reply, as before
    param, constraint = ChatCompletionRequest(messages=messages, tools=tools,
                                              response_format={"type": "json_object"}).constraint()
    assert param == "response_format" and constraint == {"json_object": True}


def test_pydantic_models_get_only_their_fields(tokenizer):
    """pydantic writes no `additionalProperties` (its models ignore other keys by default): the
    answers have the models' fields only, nested models (`$defs`, `anyOf` with null) included."""
    pydantic = pytest.importorskip("pydantic")
    from typing import Literal, Optional

    class Point(pydantic.BaseModel):
        x: int = pydantic.Field(ge=0, le=9)
        label: Optional[str] = pydantic.Field(default=None, max_length=3)

    class Shape(pydantic.BaseModel):
        kind: Literal["box", "dot"]
        points: list[Point] = pydantic.Field(max_length=2)
        center: Optional[Point] = None

    schema = Shape.model_json_schema()
    assert "additionalProperties" not in json.dumps(schema)
    grammar = _grammar_text("json_schema", normalize("json_schema", Shape))  # as `json_schema=Shape`
    for seed in range(6):
        text = draw(tokenizer, grammar, seed)[0]
        check_answer(text, schema)
        Shape.model_validate_json(text)
