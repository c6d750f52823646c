"""The OpenAI-compatible server on a tiny random Qwen3-VL checkpoint with Qwen3-VL's published chat
templates, through the official `openai` client: an image and a video (its frames' timestamps in
the prompt) as data URIs, a JSON schema, a forced tool call in the template's `<tool_call>` format
and its result sent back, and a Thinking checkpoint's `reasoning_content`. Greedy replies equal
`Qwen2VL.chat` on the same conversation, streamed or not.

The live servers, clients and media come from tests/test_server.py's helpers; a tiny random model
never writes `</think>`, so the thinking model's output is scripted as in tests/test_reasoning.py.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
pytest.importorskip("uvicorn")
jsonschema = pytest.importorskip("jsonschema")

from checkpoints import write_tiny_checkpoint_3  # noqa: E402
from test_reasoning import END_THINK, THINK, THOUGHT, scripted  # noqa: E402, F401 (a fixture)
from test_server import RunningServer, _png_uri  # noqa: E402
from test_server_units import _video_uri  # noqa: E402

from qwen2vl import Qwen2VL  # noqa: E402
from qwen2vl.reasoning import ThinkingTags  # noqa: E402

ASSETS = Path(__file__).resolve().parent.parent / "qwen2vl" / "assets"
MODEL = "tiny-qwen3-vl"
MAX_MODEL_LEN = 1024
GREEDY = dict(temperature=0)
# An Instruct model may still open `<think>` itself (vLLM's qwen3 parser reads that too), so a
# constraint lets it: greedy, the tiny random model takes it and thinks until max_tokens. Banned
# where a test is about the answer's constraint.
NO_THINK = {str(THINK): -100}
PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 10},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120}},
          "required": ["name", "age"], "additionalProperties": False}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
VIDEO_OPTIONS = {"nframes": 4, "resized_height": 64, "resized_width": 64}


def _load(ckpt) -> Qwen2VL:
    return Qwen2VL.from_pretrained(ckpt, device="cpu", max_model_len=MAX_MODEL_LEN)


@pytest.fixture(scope="module")
def instruct_ckpt(tmp_path_factory):
    """Tiny Qwen3-VL (untied, so greedy outputs differ by prompt) with Qwen3-VL-Instruct's template."""
    return write_tiny_checkpoint_3(tmp_path_factory.mktemp("tiny-3-server"), "a")


@pytest.fixture(scope="module")
def thinking_ckpt(instruct_ckpt, tmp_path_factory):
    """The same weights with Qwen3-VL-Thinking's template (its generation prompt opens `<think>`)."""
    folder = tmp_path_factory.mktemp("tiny-3-thinking")
    for path in instruct_ckpt.iterdir():
        shutil.copy(path, folder / path.name)
    shutil.copy(ASSETS / "qwen3-vl-thinking.chat_template.jinja", folder / "chat_template.jinja")
    return folder


@pytest.fixture(scope="module")
def reference(instruct_ckpt):
    return _load(instruct_ckpt)


@pytest.fixture(scope="module")
def client(instruct_ckpt):
    running = RunningServer(_load(instruct_ckpt), model_name=MODEL)
    yield openai.OpenAI(base_url=running.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    running.stop()


@pytest.fixture(scope="module")
def thinking_llm(thinking_ckpt):
    return _load(thinking_ckpt)


@pytest.fixture(scope="module")
def thinking_client(thinking_llm):
    running = RunningServer(thinking_llm, model_name=MODEL)
    yield openai.OpenAI(base_url=running.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    running.stop()


def _create(client, messages, **kwargs):
    return client.chat.completions.create(model=MODEL, messages=messages, **kwargs)


def _streamed(client, messages, **kwargs) -> dict[str, str | list]:
    """The streamed deltas joined: content, reasoning_content, tool_calls, finish_reason."""
    joined = {"content": "", "reasoning_content": "", "tool_calls": [], "finish_reason": None}
    for chunk in _create(client, messages, stream=True, **kwargs):
        for choice in chunk.choices:
            delta = choice.delta.model_dump(exclude_none=True)
            joined["content"] += delta.get("content", "")
            joined["reasoning_content"] += delta.get("reasoning_content", "")
            joined["tool_calls"] += delta.get("tool_calls", [])
            joined["finish_reason"] = choice.finish_reason or joined["finish_reason"]
    return joined


def _image_turn(url: str, text: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": text}]}]


def test_the_checkpoints_carry_qwen3_vl_templates(reference, thinking_llm):
    """The Instruct template has no default system prompt (Qwen2-VL's has); the Thinking one
    opens the reasoning in the prompt, so only it is read as such."""
    prompt = reference.processor.template.render([{"role": "user", "content": "Hi"}])
    assert prompt == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert reference.engine.thinking == ThinkingTags(THINK, END_THINK, opened_by_prompt=False)
    assert thinking_llm.engine.thinking == ThinkingTags(THINK, END_THINK, opened_by_prompt=True)


def test_image_equals_python_api_streamed_or_not(client, reference):
    uri = _png_uri(96, 64)
    expected = reference.chat([{"role": "user", "content": [{"type": "image", "image": uri},
                                                             {"type": "text", "text": "What is in the image?"}]}],
                              max_tokens=12, **GREEDY)
    messages = _image_turn(uri, "What is in the image?")
    reply = _create(client, messages, max_tokens=12, **GREEDY)
    assert reply.choices[0].message.content == expected.text and expected.text
    assert reply.usage.prompt_tokens == expected.usage.prompt_tokens > 12  # the image's pads are in
    assert reply.choices[0].finish_reason == expected.finish_reason
    streamed = _streamed(client, messages, max_tokens=12, **GREEDY)
    assert (streamed["content"], streamed["finish_reason"]) == (expected.text, expected.finish_reason)
    other = _create(client, _image_turn(_png_uri(96, 64, (10, 10, 240)), "What is in the image?"),
                    max_tokens=12, **GREEDY)
    assert other.choices[0].message.content != expected.text  # the pixels reach the model


def test_video_with_timestamps_equals_python_api(client, reference):
    uri = _video_uri(frames=8, size=64)
    ours = [{"role": "user", "content": [{"type": "video", "video": uri, **VIDEO_OPTIONS},
                                         {"type": "text", "text": "What happens?"}]}]
    prompt = reference.processor.tokenizer.decode(reference.processor.prepare(ours).input_ids,
                                                  skip_special_tokens=False)
    assert prompt.count(" seconds>") == 2 and prompt.count("<|vision_start|>") == 2  # a group per 2 frames
    expected = reference.chat(ours, max_tokens=12, **GREEDY)
    messages = [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": uri}, **VIDEO_OPTIONS},
                                             {"type": "text", "text": "What happens?"}]}]
    reply = _create(client, messages, max_tokens=12, **GREEDY)
    assert reply.choices[0].message.content == expected.text and expected.text
    assert reply.usage.prompt_tokens == expected.usage.prompt_tokens
    assert _streamed(client, messages, max_tokens=12, **GREEDY)["content"] == expected.text


def test_json_schema_equals_python_api_and_validates(client, reference):
    uri = _png_uri()
    expected = reference.chat([{"role": "user", "content": [{"type": "image", "image": uri},
                                                             {"type": "text", "text": "Who is this? JSON."}]}],
                              max_tokens=64, json_schema=PERSON, logit_bias={THINK: -100}, **GREEDY)
    response_format = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    messages = _image_turn(uri, "Who is this? JSON.")
    request = dict(max_tokens=64, response_format=response_format, logit_bias=NO_THINK, **GREEDY)
    reply = _create(client, messages, **request)
    content = reply.choices[0].message.content
    assert content == expected.text and reply.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(content), PERSON)
    assert _streamed(client, messages, **request)["content"] == content


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_forced_tool_call_validates_and_streams_the_same(client, tool_choice):
    messages = _image_turn(_png_uri(), "What is the weather where this was taken?")
    request = dict(tools=[WEATHER], tool_choice=tool_choice, parallel_tool_calls=False, max_tokens=64,
                   logit_bias=NO_THINK, **GREEDY)
    choice = _create(client, messages, **request).choices[0]
    assert choice.finish_reason == "tool_calls" and not choice.message.content
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather"
    arguments = json.loads(call.function.arguments)
    jsonschema.validate(arguments, WEATHER["function"]["parameters"])

    streamed = _streamed(client, messages, **request)
    assert streamed["finish_reason"] == "tool_calls" and not streamed["content"]
    assert [c["function"]["name"] for c in streamed["tool_calls"] if c["function"].get("name")] == ["get_weather"]
    assert json.loads("".join(c["function"].get("arguments", "") for c in streamed["tool_calls"])) == arguments

    # the call and its result go back through Qwen3-VL's template (<tool_call> / <tool_response>)
    history = [*messages, choice.message.model_dump(exclude_none=True),
               {"role": "tool", "tool_call_id": call.id, "content": '{"sky": "clear", "degrees": 21}'}]
    reply = _create(client, history, tools=[WEATHER], max_tokens=8, **GREEDY)
    assert reply.usage.prompt_tokens > _create(client, messages, tools=[WEATHER], max_tokens=1).usage.prompt_tokens


def test_the_template_lists_the_tools_and_past_calls_as_our_parser_reads_them(reference):
    """Qwen3-VL's template writes a past call as `<tool_call>\\n{"name": ..., "arguments": ...}\\n</tool_call>`:
    the format `qwen2vl.tool_calls` parses."""
    from qwen2vl.tool_calls import parse_tool_calls

    call = {"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}}
    prompt = reference.processor.template.render(
        [{"role": "user", "content": "Weather?"}, {"role": "assistant", "content": None, "tool_calls": [call]}],
        add_generation_prompt=False, tools=[WEATHER])
    assert json.dumps(WEATHER, ensure_ascii=False) in prompt and "<tools>" in prompt
    turn = prompt.rsplit("<|im_start|>assistant\n", 1)[1].removesuffix("<|im_end|>\n")
    text, [parsed] = parse_tool_calls(turn)
    assert not text and parsed.name == "get_weather"
    assert json.loads(parsed.arguments) == {"city": "Paris", "unit": "celsius"}


ANSWER = "It is a red square."


def test_reasoning_content_streamed_or_not(thinking_client, thinking_llm, scripted):  # noqa: F811
    scripted(thinking_llm, f"{THOUGHT}\n</think>\n\n{ANSWER}")
    messages = _image_turn(_png_uri(), "What is in the image?")
    message = _create(thinking_client, messages, max_tokens=64).choices[0].message
    assert (message.reasoning_content, message.content) == (THOUGHT, ANSWER)
    streamed = _streamed(thinking_client, messages, max_tokens=64)
    assert (streamed["reasoning_content"], streamed["content"]) == (THOUGHT, ANSWER)
    completion = thinking_llm.chat([{"role": "user", "content": [{"type": "image", "image": _png_uri()},
                                                                  {"type": "text", "text": "What is in the image?"}]}],
                                   max_tokens=64)
    assert (completion.reasoning, completion.text) == (THOUGHT, ANSWER)


def test_json_schema_after_the_reasoning(thinking_client, thinking_llm, scripted):  # noqa: F811
    thought = 'Not JSON yet: {"age": -1'
    scripted(thinking_llm, f"{thought}\n</think>\n\n", end=False)
    response_format = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    message = _create(thinking_client, [{"role": "user", "content": "Who? JSON."}], max_tokens=96,
                      response_format=response_format, **GREEDY).choices[0].message
    assert message.reasoning_content == thought
    jsonschema.validate(json.loads(message.content), PERSON)


def test_instruct_model_splits_a_think_block_it_writes_itself(client, reference, scripted):  # noqa: F811
    """Qwen3-VL-Instruct does not think: a `<think>` it writes itself is still split off, as vLLM's
    qwen3 parser does; without one the whole output is the answer."""
    scripted(reference, "<think>\nhmm\n</think>\n\nYes.")
    completion = reference.chat([{"role": "user", "content": "Sure?"}], max_tokens=32)
    assert (completion.reasoning, completion.text) == ("hmm", "Yes.")
