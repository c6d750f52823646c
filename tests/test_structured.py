"""Structured output: every constrained output of a random checkpoint (arbitrary tokens, which is
what a constraint must survive) parses and validates, greedy and sampled, alone and batched with
free rows; the compile cache; clear errors for bad constraints; the allowed-token masks."""
from __future__ import annotations

import json
import re
import subprocess
import sys

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
    from qwen2vl.structured import MAX_SPEC_CHARS

    with pytest.raises(InputError, match="over the limit"):
        llm.chat(PROMPT, max_tokens=4, regex="a" * (MAX_SPEC_CHARS + 1))


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
