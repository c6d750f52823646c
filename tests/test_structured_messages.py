"""What structured output says and writes: a constraint llguidance refuses is called invalid (or
beyond llguidance) with its reason, and JSON comes on one line with `, ` and `: ` separators."""
from __future__ import annotations

import json

import pytest

from qwen2vl import InputError, Qwen2VL

pytest.importorskip("llguidance")

PROMPT = [{"role": "user", "content": "Fill in the record."}]


@pytest.fixture(scope="module")
def llm(tiny_ckpt):
    return Qwen2VL.from_pretrained(tiny_ckpt)


@pytest.mark.parametrize("fields, message", [
    (dict(json_schema={"type": "objekt"}), "json_schema is invalid: Invalid type: objekt"),
    (dict(json_schema={"type": "integer", "minimum": 5, "maximum": 2}),
     "json_schema is invalid: Unsatisfiable schema: minimum (5) is greater than maximum (2)"),
    (dict(json_schema={"type": "object", "unevaluatedProperties": False}),
     'json_schema uses what llguidance does not support: Unimplemented keys: ["unevaluatedProperties"]'),
    (dict(json_schema={"type": "string", "pattern": "(?<=a)b"}), "json_schema uses what llguidance does not support"),
    (dict(regex="a(b"), "regex is invalid: "),
])
def test_a_refused_constraint_says_whether_it_is_invalid_or_beyond_llguidance(llm, fields, message):
    with pytest.raises(InputError) as caught:
        llm.chat(PROMPT, max_tokens=4, **fields)
    assert str(caught.value).startswith(message) and "is not supported:" not in str(caught.value)
    assert caught.value.field == next(iter(fields))


def whitespace_outside_strings(text: str) -> list[tuple[str, str]]:
    """Each run of whitespace outside JSON strings, with the character before it."""
    runs, in_string, escaped, index = [], False, False, 0
    while index < len(text):
        char = text[index]
        if in_string:
            in_string = escaped or char != '"'
            escaped = not escaped and char == "\\"
        elif char == '"':
            in_string = True
        elif char.isspace():
            end = index
            while end < len(text) and text[end].isspace():
                end += 1
            runs.append((text[index - 1] if index else "", text[index:end]))
            index = end
            continue
        index += 1
    return runs


def test_json_is_one_line_with_a_space_after_each_comma_and_colon(llm):
    small = {"type": "integer", "minimum": 0, "maximum": 99}
    point = {"type": "object", "properties": {"x": small, "y": small}, "required": ["x", "y"],
             "additionalProperties": False}
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                               "tags": {"type": "array", "items": small, "minItems": 2, "maxItems": 3},
                                               "point": point},
              "required": ["name", "tags", "point"], "additionalProperties": False}
    texts = [completion.text for completion in llm.chat([PROMPT, [{"role": "user", "content": "Another one."}]],
                                                         max_tokens=200, json_schema=schema, temperature=0)]
    for text in texts:
        record = json.loads(text)
        assert list(record) == ["name", "tags", "point"] and len(record["tags"]) >= 2
        runs = whitespace_outside_strings(text)
        assert runs == whitespace_outside_strings(json.dumps(record, ensure_ascii=False)), text  # Python's layout
        assert len(runs) == (3 + 2) + (len(record["tags"]) - 1) + (2 + 1)  # keys and commas: record, tags, point
        assert {run for run in runs} == {(",", " "), (":", " ")}
