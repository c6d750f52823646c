"""OpenAI's Responses API (`/v1/responses`) with the official `openai` client against a live
server on a tiny random checkpoint: every reply parses in the client's own types, greedy text
equals the chat endpoint's for the same conversation (streamed too), forced calls and JSON
schemas validate, a function call's output goes back as the next turn, and bad requests get
OpenAI's error shape naming this API's field."""
from __future__ import annotations

import json
import time

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("llguidance")

from openai.types.responses import Response  # noqa: E402

from test_reasoning import ANSWER, THOUGHT, scripted, thinking_ckpt, thinking_llm  # noqa: E402,F401 (fixtures)
from test_server import API_KEY, HEADERS, MAX_MODEL_LEN, MODEL, RunningServer, _png_uri, fail_engine_step  # noqa: E402

from qwen2vl import Qwen2VL  # noqa: E402
from qwen2vl.server.limits import ServerLimits  # noqa: E402

WEATHER = {"type": "function", "name": "get_weather", "description": "The current weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                                           "unit": {"enum": ["celsius", "fahrenheit"]}},
                          "required": ["city"], "additionalProperties": False}}
PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 10},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120}},
          "required": ["name", "age"], "additionalProperties": False}
GREEDY = {"temperature": 0.0}


@pytest.fixture(scope="module")
def server(tiny_ckpt):
    llm = Qwen2VL.from_pretrained(tiny_ckpt, device="cpu", max_model_len=MAX_MODEL_LEN)
    running = RunningServer(llm, api_key=API_KEY, limits=ServerLimits(max_body_bytes=2 << 20))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)


def _raw(server, **body) -> httpx.Response:
    return httpx.post(server.url + "/v1/responses", json={"model": MODEL, **body}, headers=HEADERS, timeout=120)


def _parses(server, **body) -> Response:
    """The reply validated strictly in the client's type (the client itself builds it unvalidated)."""
    reply = _raw(server, **body)
    assert reply.status_code == 200, reply.text
    return Response.model_validate(reply.json())


def _chat_text(client, messages, max_tokens) -> str:
    reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=max_tokens, **GREEDY)
    return reply.choices[0].message.content


def test_text_equals_the_chat_endpoint(server, client):
    reply = client.responses.create(model=MODEL, instructions="Be brief.", input="Hello there",
                                    max_output_tokens=12, **GREEDY)
    assert reply.object == "response" and reply.id.startswith("resp_")
    assert reply.status == "incomplete" and reply.incomplete_details.reason == "max_output_tokens"
    [message] = reply.output
    assert message.type == "message" and message.role == "assistant"
    expected = _chat_text(client, [{"role": "system", "content": "Be brief."},
                                   {"role": "user", "content": "Hello there"}], 12)
    assert reply.output_text == expected and expected
    assert reply.usage.output_tokens == 12 and reply.usage.input_tokens > 0
    assert reply.usage.total_tokens == reply.usage.input_tokens + 12
    again = _parses(server, instructions="Be brief.", input="Hello there", max_output_tokens=12, **GREEDY)
    assert again.output_text == expected
    assert again.usage.input_tokens_details.cached_tokens > 0  # the same prompt again: from the prefix cache


def test_image_equals_the_chat_endpoint(server, client):
    image = _png_uri(56, 84)
    for detail in ("auto", "low"):
        reply = client.responses.create(model=MODEL, max_output_tokens=8, **GREEDY, input=[
            {"role": "user", "content": [{"type": "input_image", "image_url": image, "detail": detail},
                                         {"type": "input_text", "text": "What is in the image?"}]}])
        expected = _chat_text(client, [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": image, "detail": detail}},
            {"type": "text", "text": "What is in the image?"}]}], 8)
        assert reply.output_text == expected and expected


def test_streamed_events_assemble_to_the_whole_reply(server, client):
    whole = client.responses.create(model=MODEL, input="Tell me a story", max_output_tokens=10, **GREEDY)
    with client.responses.stream(model=MODEL, input="Tell me a story", max_output_tokens=10, **GREEDY) as stream:
        events = list(stream)
    kinds = [event.type for event in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.incomplete"]
    assert [event.sequence_number for event in events] == list(range(len(events)))
    final = events[-1].response  # cut off: the client's get_final_response wants response.completed
    deltas = "".join(event.delta for event in events if event.type == "response.output_text.delta")
    assert deltas == whole.output_text == final.output_text
    assert final.status == "incomplete" and final.usage.output_tokens == 10 and final.usage.input_tokens == whole.usage.input_tokens
    Response.model_validate(final.model_dump())
    # stream=True without the helper: the same events
    raw = client.responses.create(model=MODEL, input="Tell me a story", max_output_tokens=10, stream=True, **GREEDY)
    assert [event.type for event in raw] == kinds


def test_json_schema(server, client):
    reply = _parses(server, input="Invent a person", max_output_tokens=60, **GREEDY,
                    text={"format": {"type": "json_schema", "name": "person", "schema": PERSON, "strict": True}})
    assert reply.status == "completed"
    jsonschema.validate(json.loads(reply.output_text), PERSON)
    assert reply.text.format.type == "json_schema"
    loose = _parses(server, input="Invent a person", max_output_tokens=60, text={"format": {"type": "json_object"}},
                    **GREEDY)
    assert loose.output_text.startswith("{")  # a random model may write one string until cut off
    if loose.status == "completed":
        assert isinstance(json.loads(loose.output_text), dict)


def test_forced_function_call_round_trip(server, client):
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    reply = client.responses.create(model=MODEL, input=ask, tools=[WEATHER], max_output_tokens=80,
                                    tool_choice={"type": "function", "name": "get_weather"}, **GREEDY)
    Response.model_validate(reply.model_dump())
    [call] = reply.output
    assert call.type == "function_call" and call.name == "get_weather" and call.call_id.startswith("call_")
    jsonschema.validate(json.loads(call.arguments), WEATHER["parameters"])
    # the client's next turn: the call as it came back, and its output
    turn = [*ask, *reply.output, {"type": "function_call_output", "call_id": call.call_id,
                                  "output": '{"temperature": 21}'}]
    answer = client.responses.create(model=MODEL, input=turn, tools=[WEATHER], tool_choice="none",
                                     max_output_tokens=8, **GREEDY)
    expected = client.chat.completions.create(model=MODEL, max_tokens=8, tool_choice="none", **GREEDY, tools=[
        {"type": "function", "function": {key: value for key, value in WEATHER.items() if key != "type"}}], messages=[
        *ask, {"role": "assistant", "content": None, "tool_calls": [
            {"id": call.call_id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}]},
        {"role": "tool", "tool_call_id": call.call_id, "content": '{"temperature": 21}'}])
    assert answer.output_text == expected.choices[0].message.content
    # streamed, the call's arguments come as deltas
    with client.responses.stream(model=MODEL, input=ask, tools=[WEATHER], tool_choice="required",
                                 max_output_tokens=80, **GREEDY) as stream:
        events = list(stream)
        final = stream.get_final_response()
    assert events[-1].type == "response.completed" and final.status == "completed"
    assert [item.type for item in final.output] == ["function_call"]
    arguments = "".join(event.delta for event in events if event.type == "response.function_call_arguments.delta")
    [done] = [event for event in events if event.type == "response.function_call_arguments.done"]
    assert arguments == done.arguments == final.output[0].arguments and done.name == "get_weather"
    jsonschema.validate(json.loads(arguments), WEATHER["parameters"])


@pytest.mark.parametrize("body, param, words", [
    ({"input": "hi", "store": True}, "store", "store: true is not supported"),
    ({"input": "hi", "previous_response_id": "resp_1"}, "previous_response_id", "previous_response_id is not"),
    ({"input": [{"role": "user", "content": [{"type": "input_audio", "text": "x"}]}]}, "input[0].content[0]",
     "input_audio"),
    ({"input": [{"type": "web_search_call"}]}, "input[0]", "unknown item type 'web_search_call'"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "data:image/png;base64,AAAA"}]}]},
     "input[0].content[0]", "image"),
    ({"input": "hi", "max_output_tokens": 0}, "max_output_tokens", "max_output_tokens"),
    ({"input": "hi", "text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format.schema", "schema"),
    ({"input": "hi", "tool_choice": "required"}, "tool_choice", "needs at least one tool"),
    ({"input": "hi", "tools": [{**WEATHER, "name": "get weather"}]}, "tools[0].name", "should match pattern"),
    ({"input": "hi", "text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "nonsense"}}}},
     "text.format", "json_schema is invalid"),
    ({"input": "hi", "text": {"format": {"type": "json_object"}}, "tool_choice": "required", "tools": [WEATHER]},
     "text.format", "cannot be combined with text.format"),
])
def test_bad_requests_get_openai_errors(server, body, param, words):
    reply = _raw(server, **body)
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["type"] == "invalid_request_error" and words in error["message"]
    assert error["param"] == param
    server.wait_idle()


def test_needs_the_api_key(server):
    reply = httpx.post(server.url + "/v1/responses", json={"input": "hi"})
    assert reply.status_code == 401 and reply.json()["error"]["code"] == "invalid_api_key"


def test_openapi_declares_the_body(server):
    schema = httpx.get(server.url + "/openapi.json").json()
    body = schema["paths"]["/v1/responses"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": "#/components/schemas/ResponsesRequest"}
    assert {"input", "instructions", "text", "tools"} <= set(schema["components"]["schemas"]["ResponsesRequest"]["properties"])


def test_input_items_become_the_chat_conversation():
    from qwen2vl.server.protocols.openai_responses import ResponsesRequest

    image = _png_uri(28, 28)
    body = ResponsesRequest.model_validate({"instructions": "Be brief.", "tools": [WEATHER], "input": [
        {"role": "developer", "content": "Use tools."},
        {"role": "user", "content": [{"type": "input_text", "text": "Weather here?"},
                                     {"type": "input_image", "image_url": image, "detail": "low"}]},
        {"type": "reasoning", "id": "rs_1", "summary": [], "content": [{"type": "reasoning_text", "text": "Look."}]},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Checking.",
                                                              "annotations": []}]},
        {"type": "function_call", "call_id": "call_a", "name": "get_weather", "arguments": '{"city": "Oslo"}'},
        {"type": "function_call", "call_id": "call_b", "name": "get_weather", "arguments": '{"city": "Rome"}'},
        {"type": "function_call_output", "call_id": "call_a", "output": "cold"},
        {"type": "function_call_output", "call_id": "call_b", "output": [{"type": "input_text", "text": "warm"}]},
    ]})
    chat, where = body.chat_request()
    assert chat.processor_messages() == [
        {"role": "system", "content": "Be brief."},
        {"role": "system", "content": "Use tools."},
        {"role": "user", "content": [{"type": "text", "text": "Weather here?"},
                                     {"type": "image", "image": image, "max_pixels": 256 * 28 * 28}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Checking."}], "reasoning_content": "Look.",
         "tool_calls": [{"id": "call_a", "type": "function",
                         "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}},
                        {"id": "call_b", "type": "function",
                         "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}]},
        {"role": "tool", "content": "cold", "tool_call_id": "call_a"},
        {"role": "tool", "content": [{"type": "text", "text": "warm"}], "tool_call_id": "call_b"}]
    assert where == ["instructions", "input[0]", "input[1]", "input[3]", "input[6]", "input[7]"]
    assert chat.template_tools() == [{"type": "function", "function": {
        key: value for key, value in WEATHER.items() if key != "type"}}]


@pytest.fixture(scope="module")
def thinking_client(thinking_llm):
    running = RunningServer(thinking_llm)
    yield openai.OpenAI(base_url=running.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    running.stop()


def test_a_thinking_model_gives_a_reasoning_item(thinking_client, thinking_llm, scripted):
    scripted(thinking_llm, f"{THOUGHT}\n</think>\n\n{ANSWER}")
    reply = thinking_client.responses.create(model=MODEL, input="Hello there", max_output_tokens=96)
    Response.model_validate(reply.model_dump())
    reasoning, message = reply.output
    assert reasoning.type == "reasoning" and reasoning.content[0].text == THOUGHT
    assert message.type == "message" and reply.output_text == ANSWER
    with thinking_client.responses.stream(model=MODEL, input="Hello there", max_output_tokens=96) as stream:
        events = list(stream)
        final = stream.get_final_response()
    assert "".join(event.delta for event in events if event.type == "response.reasoning_text.delta") == THOUGHT
    assert "".join(event.delta for event in events if event.type == "response.output_text.delta") == ANSWER
    assert [item.type for item in final.output] == ["reasoning", "message"]
    assert final.output[0].content[0].text == THOUGHT and final.output_text == ANSWER
    # the output sent back as it came (the client's own objects) is accepted as the next turn's history
    history = [{"role": "user", "content": "Hello there"}, *reply.output, {"role": "user", "content": "And now?"}]
    assert thinking_client.responses.create(model=MODEL, input=history, max_output_tokens=96).output_text == ANSWER


def test_a_client_leaving_mid_stream_aborts_and_frees_the_cache(server):
    closed = 'qwen2vl_http_requests_total{endpoint="/v1/responses",status="499"}'

    def metric() -> float:
        text = httpx.get(server.url + "/metrics", headers=HEADERS).text
        return next((float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(closed + " ")), 0.0)

    before = metric()
    body = {"model": MODEL, "input": "Tell me a story", "max_output_tokens": 400, "stream": True, **GREEDY}
    with httpx.Client(base_url=server.url, headers=HEADERS, timeout=30) as http:
        with http.stream("POST", "/v1/responses", json=body) as response:
            lines = response.iter_lines()
            assert next(lines) == "event: response.created"
            assert next(line for line in lines if line == "event: response.output_text.delta")
            assert server.state.engine.num_requests == 1
    server.wait_idle()
    engine = server.llm.engine
    assert engine.num_free_blocks == engine.num_total_blocks
    deadline = time.monotonic() + 10
    while metric() < before + 1:
        assert time.monotonic() < deadline
        time.sleep(0.02)


def test_the_stream_ends_with_its_last_event_not_done(server):
    """A Responses stream ends with `response.completed`, without the chat endpoint's `data: [DONE]`."""
    body = _raw(server, input="Hi", max_output_tokens=4, temperature=0, stream=True).text
    data = [line for line in body.splitlines() if line.startswith("data: ")]
    assert "[DONE]" not in body and json.loads(data[-1][len("data: "):])["type"] in ("response.completed",
                                                                                      "response.incomplete")


def test_a_failure_mid_stream_is_the_responses_error_event(server, client, monkeypatch):
    """An engine failure after the stream began: the Responses API's `error` event, numbered after
    the events before it (the client reads it as its own `ResponseErrorEvent`); the next request works."""
    fail_engine_step(monkeypatch, server.llm.engine, at=3)
    events = list(client.responses.create(model=MODEL, input="Tell me a story", max_output_tokens=8, stream=True,
                                          **GREEDY))
    assert events[0].type == "response.created" and events[-1].type == "error"
    assert "a bug in the engine" in events[-1].message
    assert [event.sequence_number for event in events] == list(range(len(events)))
    server.wait_idle()
    monkeypatch.undo()
    assert client.responses.create(model=MODEL, input="Hi", max_output_tokens=2, **GREEDY).status in ("completed",
                                                                                                      "incomplete")
