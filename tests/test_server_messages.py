"""Anthropic's Messages API (`/v1/messages`) with the official `anthropic` client against a live
server on a tiny random checkpoint: replies parse in the client's types, greedy text equals the
chat endpoint's for the same conversation (images and a tool round trip included), the stream
assembles to the whole reply, forced tool calls follow their schema, and bad requests get
Anthropic's error shape with a clear message."""
from __future__ import annotations

import base64
import io
import json
import shutil
from pathlib import Path

import pytest

anthropic = pytest.importorskip("anthropic")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("llguidance")

from checkpoints import write_tiny_checkpoint_3  # noqa: E402
from test_reasoning import THOUGHT, scripted  # noqa: E402, F401 (a fixture)
from test_server import API_KEY, MAX_MODEL_LEN, MODEL, RunningServer, _png_uri, fail_engine_step  # noqa: E402
from test_server_qwen3_vl import ASSETS, _load  # noqa: E402

from qwen2vl import Qwen2VL  # noqa: E402
from qwen2vl.evals.shapes import make_samples  # noqa: E402

DEMO_MODEL = Path(__file__).resolve().parent.parent / "models" / "qwen2-vl-shapes-demo"

GREEDY = {"extra_body": {"temperature": 0}}  # the client no longer offers temperature as an argument
WEATHER = {"name": "get_weather", "description": "The current weather in a city",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                                             "unit": {"enum": ["celsius", "fahrenheit"]}},
                            "required": ["city"], "additionalProperties": False}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def server(tiny_ckpt):
    llm = Qwen2VL.from_pretrained(tiny_ckpt, device="cpu", max_model_len=MAX_MODEL_LEN)
    running = RunningServer(llm, api_key=API_KEY)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def claude(server):
    return anthropic.Anthropic(base_url=server.url, api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def chat(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)


def _chat_text(chat, messages, **extra) -> tuple[str, str, object]:
    reply = chat.chat.completions.create(model=MODEL, messages=messages, temperature=0, **extra)
    return reply.choices[0].message.content, reply.choices[0].finish_reason, reply.usage


def _input_tokens(usage) -> int:
    return usage.input_tokens + usage.cache_read_input_tokens


def test_text_with_a_system_prompt_equals_the_chat_endpoint(claude, chat):
    reply = claude.messages.create(model=MODEL, max_tokens=8, system="Answer briefly.", messages=ASK, **GREEDY)
    text, finish, usage = _chat_text(chat, [{"role": "system", "content": "Answer briefly."}, *ASK], max_tokens=8)
    assert isinstance(reply, anthropic.types.Message) and reply.role == "assistant" and reply.model == MODEL
    assert [block.type for block in reply.content] == ["text"] and reply.content[0].text == text
    assert (reply.stop_reason, finish) == ("max_tokens", "length") and reply.stop_sequence is None
    assert (_input_tokens(reply.usage), reply.usage.output_tokens) == (usage.prompt_tokens, usage.completion_tokens)
    assert reply.id.startswith("msg_")


def test_base64_and_url_images_equal_the_chat_endpoint(claude, chat):
    uri = _png_uri()
    data = uri.split(",", 1)[1]
    text, _, usage = _chat_text(chat, [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": uri}}, {"type": "text", "text": "What is in the image?"}]}],
        max_tokens=6)
    for source in ({"type": "base64", "media_type": "image/png", "data": data}, {"type": "url", "url": uri}):
        reply = claude.messages.create(model=MODEL, max_tokens=6, messages=[{"role": "user", "content": [
            {"type": "image", "source": source}, {"type": "text", "text": "What is in the image?"}]}], **GREEDY)
        assert reply.content[0].text == text
        assert _input_tokens(reply.usage) == usage.prompt_tokens > 20  # the image's pad tokens are in
    count = claude.messages.count_tokens(model=MODEL, messages=[{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": data}},
        {"type": "text", "text": "What is in the image?"}]}])
    assert count.input_tokens == usage.prompt_tokens


def test_stream_assembles_to_the_whole_reply(claude):
    whole = claude.messages.create(model=MODEL, max_tokens=10, messages=ASK, **GREEDY)
    with claude.messages.stream(model=MODEL, max_tokens=10, messages=ASK, **GREEDY) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_message()
    assert kinds[0] == "message_start" and kinds[-2:] == ["message_delta", "message_stop"]
    assert kinds[1] == "content_block_start" and kinds[-3] == "content_block_stop"
    assert final.content[0].text == whole.content[0].text and final.stop_reason == whole.stop_reason
    assert final.usage.output_tokens == whole.usage.output_tokens == 10
    assert _input_tokens(final.usage) == _input_tokens(whole.usage)


def test_a_stop_sequence_ends_the_reply_and_is_named(claude):
    full = claude.messages.create(model=MODEL, max_tokens=12, messages=ASK, **GREEDY).content[0].text
    stop = full[4:7]
    cut = full.index(stop)
    reply = claude.messages.create(model=MODEL, max_tokens=12, messages=ASK, stop_sequences=["never here", stop],
                                   **GREEDY)
    assert reply.content[0].text == full[:cut]
    assert (reply.stop_reason, reply.stop_sequence) == ("stop_sequence", stop)
    with claude.messages.stream(model=MODEL, max_tokens=12, messages=ASK, stop_sequences=[stop], **GREEDY) as stream:
        final = stream.get_final_message()
    assert (final.stop_reason, final.stop_sequence) == ("stop_sequence", stop)


def test_tool_round_trip_with_tool_result(claude, chat):
    forced = {"type": "tool", "name": "get_weather"}
    reply = claude.messages.create(model=MODEL, max_tokens=120, messages=ASK, tools=[WEATHER], tool_choice=forced)
    assert reply.stop_reason == "tool_use"
    [call] = [block for block in reply.content if block.type == "tool_use"]
    assert call.name == "get_weather"
    jsonschema.validate(call.input, WEATHER["input_schema"])
    with claude.messages.stream(model=MODEL, max_tokens=120, messages=ASK, tools=[WEATHER],
                                tool_choice=forced) as stream:
        kinds = {event.type for event in stream}
        streamed = stream.get_final_message()
    assert "input_json" in kinds  # the arguments came as input_json_delta events
    assert [(block.name, block.input) for block in streamed.content if block.type == "tool_use"] == [
        (call.name, call.input)]

    history = [*ASK, {"role": "assistant", "content": [{"type": "tool_use", "id": call.id, "name": call.name,
                                                        "input": call.input}]},
               {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id,
                                             "content": [{"type": "text", "text": "sunny, 21 C"}]},
                                            {"type": "text", "text": "And tomorrow?"}]}]
    follow_up = claude.messages.create(model=MODEL, max_tokens=8, messages=history, tools=[WEATHER],
                                       tool_choice={"type": "none"}, **GREEDY)
    text, _, usage = _chat_text(chat, [*ASK, {"role": "assistant", "content": None, "tool_calls": [
        {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": json.dumps(call.input, ensure_ascii=False)}}]},
        {"role": "tool", "tool_call_id": call.id, "content": [{"type": "text", "text": "sunny, 21 C"}]},
        {"role": "user", "content": [{"type": "text", "text": "And tomorrow?"}]}],
        max_tokens=8, tools=[{"type": "function", "function": {"name": WEATHER["name"], "description":
                                                               WEATHER["description"],
                                                               "parameters": WEATHER["input_schema"]}}],
        tool_choice="none")
    assert follow_up.content[0].text == text
    assert _input_tokens(follow_up.usage) == usage.prompt_tokens


def test_tool_choice_any_calls_a_tool(claude):
    reply = claude.messages.create(model=MODEL, max_tokens=120, messages=ASK, tools=[WEATHER],
                                   tool_choice={"type": "any", "disable_parallel_tool_use": True})
    assert reply.stop_reason == "tool_use" and [block.type for block in reply.content] == ["tool_use"]
    jsonschema.validate(reply.content[0].input, WEATHER["input_schema"])


def _post(server, body, path="/v1/messages", **headers) -> httpx.Response:
    return httpx.post(server.url + path, json=body, headers={"x-api-key": API_KEY, **headers}, timeout=60)


@pytest.mark.parametrize("body, message", [
    ({"messages": ASK}, "max_tokens: required field is missing"),
    ({"max_tokens": 4, "messages": [{"role": "user", "content": [{"type": "document", "source": {}}]}]},
     "messages[0].content[0]: unknown content part type 'document'; expected one of 'text', 'image', 'tool_use', "
     "'tool_result', 'thinking'"),
    ({"max_tokens": 4, "system": "hi", "messages": [*ASK, {"role": "assistant", "content": "ok"}, {
        "role": "user", "content": [{"type": "text", "text": "and this?"}, {"type": "image", "source": {
            "type": "base64", "media_type": "image/png", "data": "AAAAAAAA"}}]}]},
     "messages[2].content[1]: data URI is not an image PIL can read"),
    ({"max_tokens": 4, "messages": [*ASK, {"role": "assistant", "content": [
        {"type": "tool_use", "id": "t1", "name": "get_weather", "input": {"city": "Paris"}}]}, {
        "role": "user", "content": [{"type": "text", "text": "also"}, {"type": "tool_result", "tool_use_id": "t1",
                                     "content": [{"type": "text", "text": "a photo:"}, {"type": "image", "source": {
                                         "type": "base64", "media_type": "image/png", "data": "AAAAAAAA"}}]}]}]},
     "messages[2].content[1].content[1]: data URI is not an image PIL can read"),
    ({"max_tokens": 4, "messages": [{"role": "assistant", "content": [{"type": "tool_result", "tool_use_id": "x"}]}]},
     "messages[0].content[0]: 'tool_result' blocks are not allowed in assistant messages (they take 'text', "
     "'tool_use', 'thinking')"),
    ({"max_tokens": 4, "messages": ASK, "tools": [WEATHER], "tool_choice": {"type": "tool"}},
     'tool_choice.name: required with type "tool"'),
    ({"max_tokens": 4, "messages": ASK, "temprature": 0}, "temprature: unknown field"),
])
def test_bad_requests_get_anthropics_error_shape(server, claude, body, message):
    response = _post(server, body)
    assert response.status_code == 400
    error = response.json()
    assert error["type"] == "error" and error["error"]["type"] == "invalid_request_error"
    assert error["error"]["message"].startswith(message), error
    server.wait_idle()


def test_the_client_raises_its_own_errors(claude):
    with pytest.raises(anthropic.BadRequestError) as raised:
        claude.messages.create(model=MODEL, max_tokens=4, messages=[{"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "bm90IGFuIGltYWdl"}}]}])
    assert raised.value.body["error"]["type"] == "invalid_request_error"
    with pytest.raises(anthropic.NotFoundError):
        claude.messages.create(model="another-model", max_tokens=4, messages=ASK)


def test_the_key_as_x_api_key_or_bearer(server):
    assert _post(server, {"max_tokens": 2, "messages": ASK}).status_code == 200
    bearer = httpx.post(server.url + "/v1/messages", json={"max_tokens": 2, "messages": ASK},
                        headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60)
    assert bearer.status_code == 200
    for headers in ({}, {"x-api-key": "wrong"}):
        response = httpx.post(server.url + "/v1/messages/count_tokens", json={"messages": ASK}, headers=headers)
        assert response.status_code == 401
        assert response.json()["error"]["type"] == "authentication_error"
    # elsewhere the key is OpenAI's Authorization header only, and errors keep OpenAI's shape
    response = httpx.post(server.url + "/v1/chat/completions", json={"messages": ASK, "max_tokens": 2},
                          headers={"x-api-key": API_KEY})
    assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"


def test_the_demo_model_answers_a_shapes_question_as_the_chat_endpoint():
    """The committed demo model through the three protocols (chat, Anthropic's Messages, OpenAI's
    Responses): a base64 image, the same right answer."""
    sample = next(s for s in make_samples(1, seed=777, tasks=("shape", "color", "count")) if s.task == "color")
    [turn] = sample.messages
    image = next(part["image"] for part in turn["content"] if part["type"] == "image")
    question = next(part["text"] for part in turn["content"] if part["type"] == "text")
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    data = base64.b64encode(buffer.getvalue()).decode()
    running = RunningServer(Qwen2VL.from_pretrained(DEMO_MODEL, device="cpu"), model_name="demo")
    try:
        claude = anthropic.Anthropic(base_url=running.url, api_key="unused", max_retries=0, timeout=120)
        chat = openai.OpenAI(base_url=running.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        reply = claude.messages.create(model="demo", max_tokens=16, messages=[{"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": data}},
            {"type": "text", "text": question}]}], **GREEDY)
        expected = chat.chat.completions.create(model="demo", max_tokens=16, temperature=0, messages=[
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": f"data:image/png;base64,{data}"}},
                                         {"type": "text", "text": question}]}])
        response = chat.responses.create(model="demo", max_output_tokens=16, temperature=0, input=[
            {"role": "user", "content": [{"type": "input_image", "image_url": f"data:image/png;base64,{data}"},
                                         {"type": "input_text", "text": question}]}])
    finally:
        running.stop()
    assert reply.content[0].text == expected.choices[0].message.content == response.output_text == sample.answer
    assert reply.stop_reason == "end_turn"


def test_a_thinking_models_reasoning_is_a_thinking_block(tmp_path_factory, scripted):  # noqa: F811
    """A Qwen3-VL Thinking checkpoint (its output scripted: a tiny random model never closes its
    reasoning): a thinking block, then the answer's text block, streamed or not and sent back."""
    folder = write_tiny_checkpoint_3(tmp_path_factory.mktemp("tiny-3-thinking-messages"), "a")
    shutil.copy(ASSETS / "qwen3-vl-thinking.chat_template.jinja", folder / "chat_template.jinja")
    llm = _load(folder)
    answer = "Hello! How can I help?"
    scripted(llm, f"{THOUGHT}\n</think>\n\n{answer}")
    running = RunningServer(llm)
    try:
        claude = anthropic.Anthropic(base_url=running.url, api_key="unused", max_retries=0, timeout=120)
        reply = claude.messages.create(model=MODEL, max_tokens=64, messages=ASK)
        with claude.messages.stream(model=MODEL, max_tokens=64, messages=ASK) as stream:
            deltas = [event.delta.type for event in stream if event.type == "content_block_delta"]
            streamed = stream.get_final_message()
        history = [*ASK, {"role": "assistant", "content": [block.model_dump() for block in reply.content]},
                   {"role": "user", "content": "Thanks."}]
        again = claude.messages.create(model=MODEL, max_tokens=64, messages=history)
    finally:
        running.stop()
    for message in (reply, streamed, again):
        assert [(block.type, getattr(block, "thinking", None) or getattr(block, "text", None))
                for block in message.content] == [("thinking", THOUGHT), ("text", answer)]
        assert message.stop_reason == "end_turn"
    assert deltas[0] == "thinking_delta" and deltas[-1] == "text_delta"


def test_a_failure_after_the_headers_is_an_error_event(server, monkeypatch):
    """An engine failure mid-stream: Anthropic's `error` event (no `[DONE]`); before the headers,
    a 500 in Anthropic's shape naming the request id."""
    calls = fail_engine_step(monkeypatch, server.llm.engine, at=3)
    with httpx.stream("POST", server.url + "/v1/messages", json={"max_tokens": 8, "messages": ASK, "stream": True},
                      headers={"x-api-key": API_KEY}, timeout=60) as response:
        assert response.status_code == 200
        text = response.read().decode()
    events = [block.split("\n") for block in text.strip().split("\n\n")]
    assert [lines[0] for lines in events[:1]] == ["event: message_start"] and "[DONE]" not in text
    kind, data = events[-1]
    error = json.loads(data.removeprefix("data: "))
    assert kind == "event: error" and error["type"] == "error" and error["error"]["type"] == "api_error"
    assert "a bug in the engine" in error["error"]["message"]
    server.wait_idle()
    calls.clear()
    response = _post(server, {"max_tokens": 8, "messages": ASK})
    assert response.status_code == 500 and response.json()["error"]["type"] == "api_error"
    assert response.headers["x-request-id"] in response.json()["error"]["message"]
    server.wait_idle()


def test_openapi_declares_the_bodies(server):
    schema = httpx.get(server.url + "/openapi.json").json()
    for path, model in (("/v1/messages", "MessagesRequest"), ("/v1/messages/count_tokens", "CountTokensRequest")):
        assert schema["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"] == {
            "$ref": f"#/components/schemas/{model}"}
        assert "messages" in schema["components"]["schemas"][model]["properties"]


def test_output_config_json_schema_validates_and_equals_the_chat_endpoint(claude, chat):
    person = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 10},
                                               "age": {"type": "integer", "minimum": 0, "maximum": 120}},
              "required": ["name", "age"], "additionalProperties": False}
    reply = claude.messages.create(model=MODEL, max_tokens=80, messages=ASK, **GREEDY,
                                   output_config={"format": {"type": "json_schema", "schema": person}})
    jsonschema.validate(json.loads(reply.content[0].text), person)
    text, _, _ = _chat_text(chat, ASK, max_tokens=80, response_format={
        "type": "json_schema", "json_schema": {"name": "output", "schema": person, "strict": True}})
    assert reply.content[0].text == text and reply.stop_reason == "end_turn"
