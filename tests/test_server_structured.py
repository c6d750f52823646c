"""Structured output and tool calls through the server, with the official `openai` client against
a live uvicorn on a tiny random checkpoint: whatever tokens the random model prefers, forced
calls and constrained replies are valid, streamed calls assemble to the non-streamed ones, and
bad constraints are 400s that leave the server answering."""
from __future__ import annotations

import json
import re

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("llguidance")

from test_server import MAX_MODEL_LEN, RunningServer  # noqa: E402

from test_structured import StandInCompile, chained_defs, chained_grammar, in_thread, optional_properties  # noqa: E402

from qwen2vl import Qwen2VL  # noqa: E402

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city"], "additionalProperties": False}}}
ADD = {"type": "function", "function": {
    "name": "add", "description": "a + sum(b)",
    "parameters": {"type": "object", "properties": {
        "a": {"type": "integer", "minimum": -100, "maximum": 100},
        "b": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "maxItems": 3}},
        "required": ["a", "b"], "additionalProperties": False}}}
TOOLS = [WEATHER, ADD]
SCHEMAS = {tool["function"]["name"]: tool["function"]["parameters"] for tool in TOOLS}
ASK = [{"role": "user", "content": "What is the weather in Paris, and 2 + 3?"}]
PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 10},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120},
                                           "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2}},
          "required": ["name", "age"], "additionalProperties": False}
MAX_TOKENS = 160


@pytest.fixture(scope="module")
def server(tiny_ckpt):
    llm = Qwen2VL.from_pretrained(tiny_ckpt, device="cpu", max_model_len=MAX_MODEL_LEN)
    running = RunningServer(llm)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def _create(client, **kwargs):
    return client.chat.completions.create(model="tiny-qwen2vl", messages=kwargs.pop("messages", ASK),
                                          max_tokens=kwargs.pop("max_tokens", MAX_TOKENS), **kwargs)


# The checkpoint's generation config has top_k=1 and top_p=0.001 (nearly greedy at any
# temperature): sample for real.
SAMPLED = {"temperature": 1.0, "top_p": 1.0, "extra_body": {"top_k": 0}}


def _assert_valid_calls(choice, names: set[str], max_calls: int | None = None) -> list[tuple[str, dict]]:
    assert choice.finish_reason == "tool_calls", choice
    assert choice.message.content is None
    calls = choice.message.tool_calls
    assert calls and (max_calls is None or len(calls) <= max_calls)
    parsed = []
    for call in calls:
        assert call.type == "function" and re.fullmatch(r"call_[0-9a-f]{24}", call.id)
        assert call.function.name in names
        arguments = json.loads(call.function.arguments)
        jsonschema.validate(arguments, SCHEMAS[call.function.name])
        parsed.append((call.function.name, arguments))
    assert len({call.id for call in calls}) == len(calls)
    return parsed


@pytest.mark.parametrize("parallel", [True, False])
def test_required_tool_calls_validate(client, parallel):
    reply = _create(client, tools=TOOLS, tool_choice="required", parallel_tool_calls=parallel, n=4, seed=7, **SAMPLED)
    replies = [_assert_valid_calls(choice, set(SCHEMAS), None if parallel else 1) for choice in reply.choices]
    assert len({json.dumps(calls) for calls in replies}) > 1  # sampled: the choices differ


def test_named_function_is_called_once(client):
    reply = _create(client, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "add"}}, n=3, seed=1, **SAMPLED)
    for choice in reply.choices:
        [(name, _)] = _assert_valid_calls(choice, {"add"}, 1)


def _assembled(stream) -> list[dict]:
    """Each choice's content, calls and finish reason, put together from the chunks as OpenAI's
    clients do (id, type and name come once, first; arguments are concatenated)."""
    choices: dict[int, dict] = {}
    for chunk in stream:
        for part in chunk.choices:
            choice = choices.setdefault(part.index, {"content": "", "calls": {}, "finish_reason": None})
            choice["content"] += part.delta.content or ""
            for delta in part.delta.tool_calls or []:
                call = choice["calls"].get(delta.index)
                if call is None:
                    assert delta.id and delta.type == "function" and delta.function.name
                    call = choice["calls"][delta.index] = {"id": delta.id, "name": delta.function.name,
                                                           "arguments": ""}
                else:
                    assert delta.id is None and delta.function.name is None
                call["arguments"] += delta.function.arguments or ""
            if part.finish_reason is not None:
                choice["finish_reason"] = part.finish_reason
    return [choices[index] for index in sorted(choices)]


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_streamed_tool_calls_equal_the_whole_reply(client, tool_choice):
    request = dict(tools=TOOLS, tool_choice=tool_choice, n=2, seed=3, **SAMPLED)
    whole = _create(client, **request)
    streamed = _assembled(_create(client, stream=True, **request))
    for choice, pieces in zip(whole.choices, streamed, strict=True):
        assert pieces["finish_reason"] == choice.finish_reason == "tool_calls"
        assert pieces["content"] == ""
        assert [(call["name"], call["arguments"]) for call in pieces["calls"].values()] == \
            [(call.function.name, call.function.arguments) for call in choice.message.tool_calls]


def test_tool_choice_none_and_auto_answer_in_text(client):
    for choice in ("none", "auto"):
        reply = _create(client, tools=TOOLS, tool_choice=choice, max_tokens=8, temperature=0)
        message = reply.choices[0].message
        # a random model does not write <tool_call> blocks: the text is the content, as without tools
        assert message.content and not message.tool_calls
        assert reply.choices[0].finish_reason in ("stop", "length")


def test_agent_loop_follow_up_turn(client, server):
    """A call, its result as a `tool` message, and the next turn: the history renders with the
    tool template (the call as a <tool_call> block, the result as a <tool_response>)."""
    first = _create(client, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_weather"}},
                    temperature=0)
    call = first.choices[0].message.tool_calls[0]
    messages = [*ASK, first.choices[0].message.model_dump(exclude_none=True),
                {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"}]
    reply = _create(client, messages=messages, tools=TOOLS, max_tokens=4, temperature=0)
    history = [*ASK, {"role": "assistant", "content": None, "tool_calls": [
        {"id": call.id, "type": "function", "function": {"name": call.function.name,
                                                          "arguments": call.function.arguments}}]},
               {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"}]
    text = server.llm.processor.template.render(history, tools=TOOLS)
    assert (f'<|im_start|>assistant\n<tool_call>\n{{"name": "get_weather", "arguments": {call.function.arguments}}}'
            "\n</tool_call><|im_end|>\n<|im_start|>user\n<tool_response>\nsunny, 21 C\n</tool_response><|im_end|>\n"
            "<|im_start|>assistant\n") in text
    assert reply.usage.prompt_tokens == len(server.llm.processor.tokenizer.encode(text))


# --- structured output ---------------------------------------------------------------------------

def test_response_format_json_object(client):
    reply = _create(client, response_format={"type": "json_object"}, n=2, seed=5, max_tokens=300, **SAMPLED)
    for choice in reply.choices:
        if choice.finish_reason == "stop":
            assert isinstance(json.loads(choice.message.content), dict)
        else:  # a random model may write a long object: then what it wrote must still be a JSON start
            assert choice.finish_reason == "length" and choice.message.content.startswith("{")


@pytest.mark.parametrize("stream", [False, True])
def test_response_format_json_schema(client, stream):
    request = dict(response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON,
                                                                          "strict": True}},
                   n=3, seed=11, **SAMPLED)
    if stream:
        outputs = [(choice["content"], choice["finish_reason"]) for choice in _assembled(_create(client, stream=True,
                                                                                                  **request))]
    else:
        outputs = [(choice.message.content, choice.finish_reason) for choice in _create(client, **request).choices]
    for text, finish_reason in outputs:
        assert finish_reason == "stop"
        jsonschema.validate(json.loads(text), PERSON)


CONSTRAINTS = {
    "structured_outputs regex": ({"structured_outputs": {"regex": r"[a-c]{2,4}-[0-9]{1,3}"}},
                                 lambda text: re.fullmatch(r"[a-c]{2,4}-[0-9]{1,3}", text)),
    "guided_regex": ({"guided_regex": r"(yes|no)\.?"}, lambda text: re.fullmatch(r"(yes|no)\.?", text)),
    "structured_outputs choice": ({"structured_outputs": {"choice": ["red", "green", "blue sky"]}},
                                  lambda text: text in ("red", "green", "blue sky")),
    "guided_choice": ({"guided_choice": ["A", "B"]}, lambda text: text in ("A", "B")),
    "structured_outputs json": ({"structured_outputs": {"json": PERSON}},
                                lambda text: jsonschema.validate(json.loads(text), PERSON) is None),
    "guided_json": ({"guided_json": PERSON}, lambda text: jsonschema.validate(json.loads(text), PERSON) is None),
    "guided_grammar": ({"guided_grammar": 'start: "move(" NUM ", " NUM ")"\nNUM: /[0-9]{1,2}/'},
                       lambda text: re.fullmatch(r"move\([0-9]{1,2}, [0-9]{1,2}\)", text)),
}


@pytest.mark.parametrize("case", list(CONSTRAINTS))
def test_vllm_constraints(client, case):
    extra, check = CONSTRAINTS[case]
    reply = _create(client, n=3, seed=2, **{**SAMPLED, "extra_body": {**extra, "top_k": 0}})
    for choice in reply.choices:
        assert choice.finish_reason == "stop" and check(choice.message.content), choice.message.content


def test_text_completions_take_the_constraints_too(client):
    reply = client.completions.create(model="tiny-qwen2vl", prompt="The colour is", max_tokens=16, n=3, seed=4,
                                      temperature=1.0, top_p=1.0,
                                      extra_body={"guided_choice": ["red", "green"], "top_k": 0})
    assert {choice.finish_reason for choice in reply.choices} == {"stop"}
    assert {choice.text for choice in reply.choices} <= {"red", "green"}


# --- bad requests --------------------------------------------------------------------------------

def _body(**fields) -> dict:
    return {"messages": ASK, "max_tokens": 4, **fields}


BAD = {
    "a schema with an unknown type": (_body(response_format={"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object", "properties": {"a": {"type": "strin"}}}}}), "response_format",
        "Invalid type: strin"),
    "a regex that does not parse": (_body(guided_regex="(ab"), "guided_regex", "unclosed group"),
    "tool parameters with an unknown type": (_body(tools=[{"type": "function", "function": {
        "name": "f", "parameters": {"type": "objekt"}}}], tool_choice="required"), "tools", "Invalid type: objekt"),
    "two constraints": (_body(guided_regex="a", structured_outputs={"choice": ["b"]}), "guided_regex",
                        "this request gives 2: structured_outputs.choice, guided_regex"),
    "forced calls and a response format": (_body(tools=TOOLS, tool_choice="required",
                                                 response_format={"type": "json_object"}), "response_format",
                                           "cannot be combined with response_format"),
    "tool_choice naming an unknown function": (_body(tools=TOOLS, tool_choice={"type": "function", "function": {
        "name": "fly"}}), "tool_choice.function.name", "'fly', which is not in tools"),
    "required without tools": (_body(tool_choice="required"), "tool_choice", "needs at least one tool"),
    "two tools of one name": (_body(tools=[WEATHER, WEATHER]), "tools[1].function.name", "two tools are named"),
    "a bad function name": (_body(tools=[{"type": "function", "function": {"name": "get weather"}}]),
                            "tools[0].function.name", "should match pattern"),
    "an unknown tool_choice": (_body(tools=TOOLS, tool_choice="always"), "tool_choice", None),
    # what killed the server (a segfault in llguidance) or answered 500
    "a grammar of 3,000 chained rules": (_body(structured_outputs={"grammar": chained_grammar(3000)}),
                                         "structured_outputs.grammar", "3001 rules, over the limit of 1000"),
    "a schema of 1,000 chained $defs": (_body(response_format={"type": "json_schema", "json_schema": {
        "name": "x", "schema": chained_defs(1000)}}), "response_format", "a chain of over 64 $refs"),
    "tool parameters of 1,000 chained $defs": (_body(tools=[{"type": "function", "function": {
        "name": "f", "parameters": chained_defs(1000)}}], tool_choice="required"), "tools[0].function.parameters",
        "a chain of over 64 $refs"),
    "a schema that is false": (_body(response_format={"type": "json_schema", "json_schema": {
        "name": "x", "schema": False}}), "response_format.json_schema", "false, which no output satisfies"),
    "a schema of 2,000 optional properties": (_body(guided_json=optional_properties(2000)), "guided_json",
                                              "an object of 2000 properties, over the limit of 400"),
    "a user message without content": (_body(messages=[{"role": "user"}]), "messages[0]",
                                         "only an assistant message with tool_calls may leave it out"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_constraints_are_400s_and_the_next_request_works(server, case):
    body, param, fragment = BAD[case]
    response = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    if param is not None:
        assert error["param"] == param, error
    if fragment is not None:
        assert fragment in error["message"], error
    normal = httpx.post(server.url + "/v1/chat/completions", json=_body(), timeout=60)
    assert normal.status_code == 200 and normal.json()["choices"][0]["message"]["content"]


def test_schema_true_is_any_json(client):
    reply = _create(client, response_format={"type": "json_schema", "json_schema": {"name": "any", "schema": True}},
                    frequency_penalty=2.0, max_tokens=MAX_TOKENS)
    json.loads(reply.choices[0].message.content)


def test_a_compile_in_progress_does_not_stall_other_streams(server, monkeypatch):
    """While a request's constraint compiles (a stand-in that blocks until released), another
    client's stream runs to its end; then the constrained request is answered."""
    stand_in = StandInCompile(monkeypatch, "[0-9]{6}")
    slow, slow_result = in_thread(lambda: httpx.post(server.url + "/v1/chat/completions", timeout=120,
                                                     json=_body(guided_regex="[0-9]{6}", max_tokens=20)))
    try:
        assert stand_in.started.wait(120)
        with httpx.stream("POST", server.url + "/v1/chat/completions", timeout=120,
                          json=_body(stream=True, max_tokens=6)) as stream:
            events = [line for line in stream.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "data: [DONE]" and '"finish_reason":"length"' in events[-2].replace(" ", "")
        assert slow.is_alive()
    finally:
        stand_in.release.set()
    slow.join(120)
    assert re.fullmatch("[0-9]{6}", slow_result[0].json()["choices"][0]["message"]["content"]), slow_result


def test_openapi_documents_the_new_fields(server):
    document = httpx.get(server.url + "/openapi.json", timeout=30).json()
    schemas = document["components"]["schemas"]
    request = schemas["ChatCompletionRequest"]["properties"]
    assert {"tools", "tool_choice", "parallel_tool_calls", "response_format", "structured_outputs", "guided_json",
            "guided_regex", "guided_choice", "guided_grammar"} <= set(request)
    assert {"tool_calls", "tool_call_id"} <= set(schemas["ChatMessage"]["properties"])
    assert "tool_calls" in schemas["AssistantMessage"]["properties"]
    assert "tool_calls" in schemas["ChatDelta"]["properties"]
    assert "response_format" in schemas["CompletionRequest"]["properties"]
