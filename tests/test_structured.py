"""Structured output: every constrained output of a random checkpoint (arbitrary tokens, which is
what a constraint must survive) parses and validates, greedy and sampled, alone and batched with
free rows; the compile cache; clear errors for bad constraints; the allowed-token masks."""
from __future__ import annotations

import json
import re
import subprocess
import sys
import threading

import jsonschema
import pytest
import torch

from qwen2vl import InputError, Qwen2VL, SamplingParams
from qwen2vl.layers.sampler import AllowedTokens, allowed_tokens_bias, apply_allowed_tokens, unpack_bits

pytest.importorskip("llguidance")

PROMPT = [{"role": "user", "content": "Fill in the record."}]
# Sampling over the whole vocabulary (the checkpoint's own defaults have top_k 1: greedy).
SAMPLED = dict(temperature=1.0, top_k=0, top_p=1.0)
MAX_TOKENS = 400

LABEL = {"type": "string", "maxLength": 8}
SCHEMAS = {
    "flat": {"type": "object", "properties": {"name": LABEL, "age": {"type": "integer", "minimum": 0, "maximum": 130}},
             "required": ["name", "age"], "additionalProperties": False},
    "nested": {"type": "object", "properties": {
        "user": {"type": "object", "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 999}, "nick": LABEL},
                 "required": ["id", "nick"], "additionalProperties": False},
        "active": {"type": "boolean"}}, "required": ["user", "active"], "additionalProperties": False},
    "int_array": {"type": "array", "items": {"type": "integer", "minimum": -50, "maximum": 50}, "minItems": 2,
                  "maxItems": 4},
    "enum": {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}}, "required": ["color"],
             "additionalProperties": False},
    "const": {"type": "object", "properties": {"version": {"const": 2}, "kind": {"const": "box"}},
              "required": ["version", "kind"], "additionalProperties": False},
    "any_of": {"type": "object", "properties": {"value": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 9},
                                                                    {"type": "string", "maxLength": 3}]}},
               "required": ["value"], "additionalProperties": False},
    "number_bounds": {"type": "object", "properties": {
        "score": {"type": "number", "minimum": 0, "maximum": 1},
        "offset": {"type": "integer", "exclusiveMinimum": -3, "exclusiveMaximum": 3}},
        "required": ["score", "offset"], "additionalProperties": False},
    "pattern": {"type": "object", "properties": {"code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"}},
                "required": ["code"], "additionalProperties": False},
    "optional_keys": {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 5}, "b": LABEL,
                                                       "c": {"type": "boolean"}},
                      "required": ["a"], "additionalProperties": False},
    "array_of_objects": {"type": "array", "maxItems": 2, "items": {
        "type": "object", "properties": {"x": {"type": "integer", "minimum": 0, "maximum": 99},
                                         "y": {"type": "integer", "minimum": 0, "maximum": 99}},
        "required": ["x", "y"], "additionalProperties": False}},
    "nested_arrays": {"type": "array", "minItems": 1, "maxItems": 2,
                      "items": {"type": "array", "maxItems": 3, "items": {"type": "boolean"}}},
    "null_and_bool": {"type": "object", "properties": {"none": {"type": "null"}, "flag": {"type": "boolean"}},
                      "required": ["none", "flag"], "additionalProperties": False},
    "mixed_enum": {"type": "object", "properties": {"v": {"enum": [1, "two", None, True]}}, "required": ["v"],
                   "additionalProperties": False},
    "string_lengths": {"type": "object", "properties": {"s": {"type": "string", "minLength": 2, "maxLength": 4}},
                       "required": ["s"], "additionalProperties": False},
    "refs": {"type": "object", "$defs": {"point": {"type": "object", "properties": {
        "x": {"type": "integer", "minimum": 0, "maximum": 9}}, "required": ["x"], "additionalProperties": False}},
        "properties": {"start": {"$ref": "#/$defs/point"}, "end": {"$ref": "#/$defs/point"}},
        "required": ["start", "end"], "additionalProperties": False},
    "one_of_tagged": {"oneOf": [
        {"type": "object", "properties": {"type": {"const": "circle"}, "r": {"type": "integer", "minimum": 1, "maximum": 9}},
         "required": ["type", "r"], "additionalProperties": False},
        {"type": "object", "properties": {"type": {"const": "square"}, "side": {"type": "integer", "minimum": 1,
                                                                              "maximum": 9}},
         "required": ["type", "side"], "additionalProperties": False}]},
    "enum_array_unique": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
    "ui_action": {"type": "object", "properties": {
        "action": {"enum": ["click", "type", "scroll"]},
        "box": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 1000}, "minItems": 4, "maxItems": 4},
        "text": {"type": "string", "maxLength": 6}},
        "required": ["action", "box"], "additionalProperties": False},
    "receipt": {"type": "object", "properties": {
        "store": LABEL, "total": {"type": "number", "minimum": 0, "maximum": 1000},
        "items": {"type": "array", "maxItems": 2, "items": {"type": "object", "properties": {
            "name": LABEL, "qty": {"type": "integer", "minimum": 1, "maximum": 9}},
            "required": ["name", "qty"], "additionalProperties": False}}},
        "required": ["store", "total", "items"], "additionalProperties": False},
    "top_level_string": {"type": "string", "maxLength": 5},
}
# `\d` is any Unicode digit there (Rust's regex, with a newer Unicode than Python's re knows)
REGEXES = [r"[a-z]{2,6}@[a-z]{2,4}\.(com|org)", r"[0-9]{3}-[0-9]{4}", r"(yes|no)(, because [a-z ]{1,12})?",
           r"\([0-9]{1,3},[0-9]{1,3}\),\([0-9]{1,3},[0-9]{1,3}\)"]
GRAMMAR = """
start: "(" num "," num ")" ("," "(" num "," num ")")?
num: /[0-9]{1,3}/
"""


@pytest.fixture(scope="module")
def llm(tiny_ckpt):
    return Qwen2VL.from_pretrained(tiny_ckpt, num_kv_blocks=512, max_num_seqs=32)


def check_json(completion, schema):
    assert completion.finish_reason == "stop", completion.text
    jsonschema.validate(json.loads(completion.text), schema)


@pytest.mark.parametrize("name", list(SCHEMAS))
def test_greedy_output_validates_against_its_schema(llm, name):
    # A greedy random model repeats a token forever where the schema lets it (a number's
    # digits: 1.000...); the penalty ends such loops.
    completion = llm.chat(PROMPT, max_tokens=MAX_TOKENS, json_schema=SCHEMAS[name], frequency_penalty=2.0)
    check_json(completion, SCHEMAS[name])


def test_sampled_outputs_validate_batched_with_free_rows(llm):
    """All schemas in one continuous batch with free rows, sampled over the whole vocabulary; the
    free rows' outputs are those they get alone (the masks touch constrained rows only)."""
    names = list(SCHEMAS)
    free = llm.chat([PROMPT] * 3, max_tokens=12, seed=7, **SAMPLED)
    prompts, params = [], []
    for index, name in enumerate(names):
        prompts.append(PROMPT)
        params.append(SamplingParams(max_tokens=MAX_TOKENS, seed=index, json_schema=SCHEMAS[name], **SAMPLED))
    for _ in range(3):
        prompts.append(PROMPT)
        params.append(SamplingParams(max_tokens=12, seed=7, **SAMPLED))
    outputs = run_each(llm, prompts, params)
    for name, completion in zip(names, outputs):
        check_json(completion, SCHEMAS[name])
    assert [c.token_ids for c in outputs[len(names):]] == [c.token_ids for c in free]
    # a random model's sampled outputs differ from its greedy ones
    greedy = llm.chat(PROMPT, max_tokens=MAX_TOKENS, json_schema=SCHEMAS["receipt"])
    assert outputs[names.index("receipt")].text != greedy.text


def run_each(llm, prompts, params):
    """One continuous batch where each conversation has its own params (through the engine)."""
    engine = llm.engine
    ids = [engine.add_request(llm.processor.prepare(p), sp) for p, sp in zip(prompts, params)]
    final = {}
    while engine.has_unfinished():
        for output in engine.step():
            if output.finished:
                final[output.request_id] = output
    return [final[request_id] for request_id in ids]


@pytest.mark.parametrize("pattern", REGEXES)
def test_regex_outputs_fullmatch(llm, pattern):
    for seed in range(2):
        completion = llm.chat(PROMPT, max_tokens=MAX_TOKENS, regex=pattern, seed=seed, **SAMPLED)
        assert completion.finish_reason == "stop"
        assert re.fullmatch(pattern, completion.text), completion.text


def test_choice_and_grammar(llm):
    choices = ["red circle", "blue square", "red", "none"]
    texts = {llm.chat(PROMPT, max_tokens=50, choice=choices, seed=seed, **SAMPLED).text for seed in range(6)}
    assert texts <= set(choices) and len(texts) > 1
    for seed in range(3):
        completion = llm.chat(PROMPT, max_tokens=MAX_TOKENS, grammar=GRAMMAR, seed=seed, **SAMPLED)
        assert completion.finish_reason == "stop"
        assert re.fullmatch(r"\(\d{1,3},\d{1,3}\)(,\(\d{1,3},\d{1,3}\))?", completion.text), completion.text


def test_json_object_and_the_openai_response_format(llm):
    vocab = llm.processor.tokenizer
    # a push towards closing quotes and braces, so that a random model ends its object soon
    bias = {vocab.token_to_id(token): 12.0 for token in ('"', '":', '}', '"}')}
    plain = llm.chat(PROMPT, max_tokens=MAX_TOKENS, json_object=True, logit_bias=bias)
    assert plain.finish_reason == "stop"
    assert isinstance(json.loads(plain.text), dict)
    assert llm.chat(PROMPT, max_tokens=MAX_TOKENS, logit_bias=bias,
                    response_format={"type": "json_object"}).text == plain.text
    schema = SCHEMAS["ui_action"]
    via_openai = llm.chat(PROMPT, max_tokens=MAX_TOKENS, response_format={
        "type": "json_schema", "json_schema": {"name": "action", "schema": schema, "strict": True}})
    assert via_openai.text == llm.chat(PROMPT, max_tokens=MAX_TOKENS, json_schema=schema).text
    assert llm.chat(PROMPT, max_tokens=8, response_format={"type": "text"}).text == llm.chat(PROMPT, max_tokens=8).text


def test_pydantic_model_class_as_schema(llm):
    pydantic = pytest.importorskip("pydantic")

    class Point(pydantic.BaseModel):
        model_config = pydantic.ConfigDict(extra="forbid")
        x: int = pydantic.Field(ge=0, le=9)
        label: str = pydantic.Field(max_length=4)

    completion = llm.chat(PROMPT, max_tokens=MAX_TOKENS, json_schema=Point)
    assert completion.finish_reason == "stop"
    Point.model_validate_json(completion.text)


def test_a_repeated_constraint_compiles_once(llm):
    schema = {"type": "object", "properties": {"k": {"type": "integer", "minimum": 0, "maximum": 3}},
              "required": ["k"], "additionalProperties": False}
    grammars = llm.engine.grammars
    before = grammars.num_compiled
    first = llm.chat(PROMPT, max_tokens=MAX_TOKENS, json_schema=schema)
    assert grammars.num_compiled == before + 1
    # the same schema, as JSON text or a dict, in a batch: nothing compiled
    again = llm.chat([PROMPT, PROMPT], max_tokens=MAX_TOKENS, json_schema=json.dumps(schema))
    assert grammars.num_compiled == before + 1
    assert [c.text for c in again] == [first.text] * 2


@pytest.mark.parametrize("fields, field, words", [
    (dict(json_schema={"type": "object", "properties": {"a": {"type": "strin"}}}), "json_schema", "strin"),
    (dict(json_schema="{not json"), "json_schema", "not valid JSON"),
    (dict(json_schema=[1, 2]), "json_schema", "must be a JSON schema"),
    (dict(regex="a(b"), "regex", "unclosed group"),
    (dict(grammar="start: foo"), "grammar", 'unknown name: "foo"'),
    (dict(choice=[]), "choice", "non-empty list"),
    (dict(choice="yes"), "choice", "non-empty list"),
    (dict(regex="[a-z]+", choice=["a"]), "choice", "at most one"),
    (dict(json_object="yes"), "json_object", "true or unset"),
    (dict(response_format={"type": "xml"}), "response_format.type", "one of text, json_object, json_schema"),
    (dict(response_format={"type": "json_schema", "json_schema": "{}"}), "response_format.json_schema", "object"),
])
def test_bad_constraints_are_clear_errors_and_the_engine_goes_on(llm, fields, field, words):
    with pytest.raises(InputError) as caught:
        llm.chat(PROMPT, max_tokens=4, **fields)
    assert caught.value.field == field
    assert words in str(caught.value)
    assert llm.chat(PROMPT, max_tokens=4).finish_reason == "length"


def test_a_constraint_over_the_size_limit_is_refused(llm):
    from qwen2vl.structured import MAX_SPEC_BYTES

    with pytest.raises(InputError, match="bytes long, over the limit"):
        llm.chat(PROMPT, max_tokens=4, regex="a" * (MAX_SPEC_BYTES + 1))
    with pytest.raises(InputError, match="bytes long, over the limit"):  # bytes, not characters
        llm.chat(PROMPT, max_tokens=4, regex="é" * (MAX_SPEC_BYTES // 2 + 1))


# --- what a request carries cannot crash or stall the process ------------------------------------

def chained_grammar(rules: int) -> str:
    """A Lark grammar of `rules` rules, each the next one's only use (llguidance recursed once per
    rule and overflowed the stack at 3,000)."""
    return "start: r0\n" + "\n".join(f'r{i}: "a" r{i + 1}' for i in range(rules - 1)) + f'\nr{rules - 1}: "a"\n'


def chained_defs(count: int) -> dict:
    """A schema of `count` `$defs`, each referring to the next (a segfault at 1,000)."""
    defs = {f"d{i}": {"type": "object", "properties": {"x": {"$ref": f"#/$defs/d{i + 1}"}}} for i in range(count - 1)}
    defs[f"d{count - 1}"] = {"type": "integer"}
    return {"$defs": defs, "$ref": "#/$defs/d0"}


def optional_properties(count: int) -> dict:
    return {"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(count)}}


def test_a_resolved_constraint_is_checked_once(monkeypatch):
    """The driver resolves a request's params (to compile off the stepping thread) and the engine
    resolves them again when it adds the request: the second pass takes the checked text as it is."""
    from qwen2vl import structured

    resolved = {kind: SamplingParams(**{kind: value}).resolve() for kind, value in
                [("json_schema", chained_defs(50)), ("grammar", chained_grammar(50)), ("regex", "[0-9]{4}")]}
    calls = []
    monkeypatch.setattr(structured, "checked_schema", lambda *args: calls.append(args))
    monkeypatch.setattr(structured, "_check_size", lambda *args: calls.append(args))
    for kind, params in resolved.items():
        again = params.resolve()
        assert again.constraint == params.constraint and type(getattr(again, kind)) is type(getattr(params, kind))
    assert calls == []
    assert SamplingParams(json_schema=resolved["json_schema"].json_schema + " ").resolve() is not None and calls


@pytest.mark.parametrize("fields, field, words", [
    (dict(grammar=chained_grammar(3000)), "grammar", "3001 rules, over the limit of 1000"),
    (dict(json_schema=chained_defs(1000)), "json_schema", "a chain of over 64 $refs"),
    (dict(json_schema={"type": "array", "items": {"$ref": "#/$defs/x"}, "$defs": dict(
        reversed(list(chained_defs(200)["$defs"].items())), x={"$ref": "#/$defs/d0"})}),
     "json_schema", "a chain of over 64 $refs"),
    (dict(json_schema='{"items": ' * 200 + "{}" + "}" * 200), "json_schema", "nests deeper than the limit of 128"),
    (dict(json_schema=optional_properties(2000)), "json_schema", "an object of 2000 properties, over the limit of 400"),
    (dict(response_format={"type": "json_schema", "json_schema": {"name": "no", "schema": False}}),
     "response_format.json_schema", "false, which no output satisfies"),
    (dict(json_schema="false"), "json_schema", "false, which no output satisfies"),
])
def test_constraints_over_a_bound_are_refused_before_compiling(llm, fields, field, words):
    before = llm.engine.grammars.num_compiled
    with pytest.raises(InputError) as caught:
        llm.chat(PROMPT, max_tokens=4, **fields)
    assert caught.value.field == field and words in str(caught.value), caught.value
    assert llm.engine.grammars.num_compiled == before
    assert llm.chat(PROMPT, max_tokens=4).finish_reason == "length"


def test_the_compiler_threads_survive_what_crashed_the_process(tiny_ckpt):
    """The grammar and schema that segfaulted llguidance on an 8 MiB stack, past the bounds (the
    compiler itself): they compile on its big-stack threads. In a child process, so that a crash
    fails this test instead of ending the run."""
    script = f"""
import json, sys
sys.path[:0] = {sys.path!r}
from test_structured import chained_grammar, chained_defs
from qwen2vl import Qwen2VL
llm = Qwen2VL.from_pretrained({str(tiny_ckpt)!r}, num_kv_blocks=64)
grammars = llm.engine.grammars
grammars.compile_seconds = 600
grammars.compile("grammar", chained_grammar(3000)).result()
grammars.compile("json_schema", json.dumps(chained_defs(1000))).result()
print("compiled", grammars.num_compiled)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600,
                          cwd=str(__import__("pathlib").Path(__file__).parent))
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
    assert done.stdout.split() == ["compiled", "2"]


def test_schema_true_integral_floats_and_the_most_properties(llm):
    anything = llm.chat(PROMPT, max_tokens=MAX_TOKENS, response_format={
        "type": "json_schema", "json_schema": {"name": "any", "schema": True}}, frequency_penalty=2.0)
    assert anything.finish_reason == "stop"
    json.loads(anything.text)
    pair = {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "minItems": 2.0, "maxItems": 2.0}
    check_json(llm.chat(PROMPT, max_tokens=MAX_TOKENS, json_schema=pair), {**pair, "minItems": 2, "maxItems": 2})
    from qwen2vl.structured import MAX_SCHEMA_PROPERTIES

    # the most properties an object may have: no parser-row error in the middle of generation
    widest = llm.chat(PROMPT, max_tokens=12, json_schema=optional_properties(MAX_SCHEMA_PROPERTIES), **SAMPLED, seed=1)
    assert widest.finish_reason in ("stop", "length"), widest


class StandInCompile:
    """`GrammarCompiler._compile` that blocks on the constraint `spec` until released."""

    def __init__(self, monkeypatch, spec):
        from qwen2vl.structured import GrammarCompiler

        self.spec, self.started, self.release = spec, threading.Event(), threading.Event()
        real = GrammarCompiler._compile

        def compile_(compiler, llguidance, kind, value):
            if value == spec:
                self.started.set()
                assert self.release.wait(120), "never released"
            return real(compiler, llguidance, kind, value)

        monkeypatch.setattr(GrammarCompiler, "_compile", compile_)


def in_thread(function):
    """Run `function` in a thread; returns (thread, results list of its value or exception)."""
    results = []

    def run():
        try:
            results.append(function())
        except BaseException as error:  # noqa: BLE001
            results.append(error)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, results


def test_a_compile_in_progress_does_not_stall_other_requests(llm, monkeypatch):
    """While a constraint compiles (a stand-in that blocks until released) other requests are
    stepped to their end; then the constrained one runs."""
    stand_in = StandInCompile(monkeypatch, "[0-9]{5}")
    slow, slow_result = in_thread(lambda: llm.chat(PROMPT, max_tokens=20, regex="[0-9]{5}"))
    try:
        assert stand_in.started.wait(120)
        plain, plain_result = in_thread(lambda: llm.chat(PROMPT, max_tokens=6))
        plain.join(120)  # only a bound on the failure: the compile is still blocked
        assert plain_result and plain_result[0].finish_reason == "length", plain_result
        assert slow.is_alive()
    finally:
        stand_in.release.set()
    slow.join(120)
    assert re.fullmatch("[0-9]{5}", slow_result[0].text), slow_result


def test_a_request_aborted_while_its_constraint_compiles_never_starts(llm, monkeypatch):
    from qwen2vl.engine.driver import NewRequest

    stand_in = StandInCompile(monkeypatch, "[0-9]{8}")
    driver, outputs = llm.driver, []
    accepted = driver.submit([NewRequest(llm.processor.prepare(PROMPT), SamplingParams(max_tokens=20, regex="[0-9]{8}"),
                                         "early-1")], outputs.append)
    try:
        assert stand_in.started.wait(120)
        driver.abort("early-1")  # applied at once: no thread holds the engine
    finally:
        stand_in.release.set()
    driver.pump(accepted.done)
    [result] = accepted.result()
    assert isinstance(result, Exception) and "aborted before it started" in str(result)
    assert not llm.engine.has_unfinished() and outputs == []


def test_the_compile_deadline_is_enforced_while_it_runs(llm, monkeypatch):
    stand_in = StandInCompile(monkeypatch, "[a-z]{7}")
    monkeypatch.setattr(llm.engine.grammars, "compile_seconds", 0.05)
    try:
        with pytest.raises(InputError) as caught:
            llm.chat(PROMPT, max_tokens=4, regex="[a-z]{7}")
        assert stand_in.started.is_set() and not stand_in.release.is_set()  # refused while it ran
        assert caught.value.field == "regex" and "took over 0.05 s to compile" in str(caught.value)
    finally:
        stand_in.release.set()
    assert llm.chat(PROMPT, max_tokens=4).finish_reason == "length"


def test_a_compiler_failure_is_that_request_alone(llm, monkeypatch):
    from qwen2vl.structured import GrammarCompiler

    class Panic(BaseException):  # as pyo3 raises a Rust panic
        pass

    calls = []

    def panics(compiler, llguidance, kind, value):
        calls.append(value)
        raise Panic("index out of bounds")

    monkeypatch.setattr(GrammarCompiler, "_compile", panics)
    with pytest.raises(InputError) as caught:
        llm.chat(PROMPT, max_tokens=4, regex="[0-9]{9}")
    assert caught.value.field == "regex" and "could not be compiled: Panic: index out of bounds" in str(caught.value)
    assert calls == ["[0-9]{9}"]  # not compiled again on the stepping thread
    assert llm.chat(PROMPT, max_tokens=4).finish_reason == "length"


def test_the_compiled_constraint_cache_is_capped_by_bytes(tiny_ckpt):
    from qwen2vl.structured import _MIN_CACHED_BYTES

    small = Qwen2VL.from_pretrained(tiny_ckpt, num_kv_blocks=64, grammar_cache_bytes=2 * _MIN_CACHED_BYTES)
    grammars = small.engine.grammars
    for pattern in ["a{1}", "b{2}", "c{3}", "a{1}"]:
        small.chat(PROMPT, max_tokens=4, regex=pattern)
        assert grammars.cached_bytes <= 2 * _MIN_CACHED_BYTES
    assert grammars.num_compiled == 4  # a{1} was dropped for c{3}, then compiled again
    small.chat(PROMPT, max_tokens=4, regex="c{3}")
    assert grammars.num_compiled == 4
    with pytest.raises(InputError, match="grammar_cache_bytes"):
        Qwen2VL.from_pretrained(tiny_ckpt, grammar_cache_bytes=-1)


def test_preemption_and_run_ahead_keep_constrained_outputs(tiny_ckpt, llm):
    """A pool so small that requests are preempted and recomputed, and run-ahead (the GPU
    default): the matcher states stay with their requests; outputs equal the plain engine's."""
    names = ["receipt", "ui_action", "array_of_objects"]
    params = [SamplingParams(max_tokens=MAX_TOKENS, seed=i, json_schema=SCHEMAS[n], **SAMPLED) for i, n in enumerate(names)]
    params.append(SamplingParams(max_tokens=40, seed=9, **SAMPLED))
    prompts = [PROMPT] * len(params)
    outputs = run_each(llm, prompts, params)
    expected = [c.token_ids for c in outputs]
    longest = max(o.prompt_len + len(o.token_ids) for o in outputs)
    # room for the longest request and a little more: the others are preempted on the way
    small = Qwen2VL.from_pretrained(tiny_ckpt, block_size=4, num_kv_blocks=-(-longest // 4) + 2)
    assert [c.token_ids for c in run_each(small, prompts, params)] == expected
    assert small.engine.num_preemptions > 0
    ahead = Qwen2VL.from_pretrained(tiny_ckpt, num_kv_blocks=512, run_ahead=True)
    assert [c.token_ids for c in run_each(ahead, prompts, params)] == expected


def test_masks_ban_all_but_the_allowed_tokens():
    vocab, width = 100, 3  # the mask covers 96 tokens: the model's last 4 are never allowed
    allowed_ids = [[0, 5, 31, 32, 95], [7]]
    masks = torch.zeros(2, width, dtype=torch.int32)
    for row, ids in enumerate(allowed_ids):
        for token in ids:
            masks[row, token // 32] |= torch.tensor(1 << (token % 32)).to(torch.int32)
    logits = torch.randn(3, vocab)
    out = apply_allowed_tokens(logits.clone(), AllowedTokens(torch.tensor([2, 0]), masks))
    assert torch.equal(out[1], logits[1])  # an unconstrained row is untouched
    for row, ids in zip([2, 0], allowed_ids):
        finite = torch.isfinite(out[row]).nonzero().flatten().tolist()
        assert finite == ids
        assert torch.equal(out[row, ids], logits[row, ids])
    # every row constrained: the same, in place
    every = AllowedTokens(None, masks)
    assert torch.equal(apply_allowed_tokens(logits[:2].clone(), every), apply_allowed_tokens(
        torch.cat([logits[:2], logits[:1]]), AllowedTokens(torch.tensor([0, 1]), masks))[:2])
    # the device path (shifts and a select) gives the host path's (a byte table) biases
    device_path = torch.where(unpack_bits(masks), 0.0, float("-inf"))
    assert torch.equal(device_path, allowed_tokens_bias(masks))
    assert unpack_bits(masks)[0].nonzero().flatten().tolist() == allowed_ids[0]


def test_cli_structured_flags(tmp_path, tiny_ckpt):
    from qwen2vl.cli import _sampling_params, build_parser

    schema_file = tmp_path / "schema.json"
    schema_file.write_text(json.dumps(SCHEMAS["flat"]))
    grammar_file = tmp_path / "g.lark"
    grammar_file.write_text(GRAMMAR)

    def params(*flags):
        return _sampling_params(build_parser().parse_args(["generate", "--input", "x", *flags]))

    assert params("--json-schema", str(schema_file)).json_schema == SCHEMAS["flat"]
    assert params("--choice", "alpha,beta").choice == ["alpha", "beta"]
    assert params("--regex", "[0-9]{2}").regex == "[0-9]{2}"
    assert params("--grammar", str(grammar_file)).grammar == GRAMMAR
    assert params("--json-object").json_object is True and params().json_object is False
    with pytest.raises(SystemExit):
        params("--json-schema", str(tmp_path / "none.json"))
    # end to end, once
    out = subprocess.run([sys.executable, "-m", "qwen2vl.cli", "chat", "--model", str(tiny_ckpt), "--max-tokens", "200",
                          "--json-schema", str(schema_file), "Hi"], capture_output=True, text=True, check=True)
    jsonschema.validate(json.loads(out.stdout), SCHEMAS["flat"])


def test_one_of_that_llguidance_cannot_tell_apart_takes_x_guidance(llm):
    """Not coerced by default: with overlapping branches (an integer is also a number) an output
    could match two of them, which oneOf forbids."""
    branches = [{"type": "integer", "minimum": 0, "maximum": 9}, {"type": "number", "minimum": 0, "maximum": 9}]
    with pytest.raises(InputError) as caught:
        llm.chat(PROMPT, max_tokens=4, json_schema={"oneOf": branches})
    assert caught.value.field == "json_schema" and '"x-guidance": {"coerce_one_of": true}' in str(caught.value)
    coerced = llm.chat(PROMPT, max_tokens=MAX_TOKENS, frequency_penalty=2.0,
                       json_schema={"oneOf": branches, "x-guidance": {"coerce_one_of": True}})
    check_json(coerced, {"anyOf": branches})
