"""OpenAI's Responses API (`POST /v1/responses`), stateless, over the chat path.

A request becomes a `ChatCompletionRequest` (`ResponsesRequest.chat_request`): `instructions`
a system message, `input` messages with `input_text` / `input_image` parts (an image's `detail`
as the chat endpoint reads it: "low" at most 256 visual tokens, "auto" and "high" the model's
own bounds), `function_call` items an assistant turn's tool calls, `function_call_output` items
tool messages, `reasoning` items the next assistant turn's `reasoning_content`; `text.format` the
chat's `response_format`, function tools the chat's tools. The chat path runs it (media limits,
constraints, tool grammars, metrics, disconnects), and its `ChatCompletion` becomes a Response
(`response_object`), its chunks the Responses events (`ResponseEvents`). Nothing is stored:
`store: true` and `previous_response_id` are refused.
"""
from __future__ import annotations

import json
import re
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal, Union

from fastapi import Request
from fastapi.responses import Response
from pydantic import Discriminator, Field, Tag, ValidationError

from qwen2vl.errors import InputError
from qwen2vl.server.errors import APIError, api_error
from qwen2vl.server.gate import parse_body
from qwen2vl.server.jobs import event_stream
from qwen2vl.server.replies import ChatCompletion, ChatCompletionChunk
from qwen2vl.server.requests import ChatCompletionRequest, Integer, _Strict
from qwen2vl.server.validation import describe_validation_error


# -- the request ----------------------------------------------------------------------------------

class InputText(_Strict):
    type: Literal["input_text"]
    text: str


class InputImage(_Strict):
    type: Literal["input_image"]
    image_url: str = Field(description="an http(s) URL or a data: URI")
    detail: Literal["low", "high", "auto"] = Field(
        "auto", description='"low": at most 256 visual tokens; "auto" and "high": the model\'s own pixel bounds')


class OutputText(_Strict):
    """An earlier reply's text, as a client sends a Response's output back."""
    type: Literal["output_text"]
    text: str
    annotations: list[dict[str, Any]] = []
    logprobs: list[dict[str, Any]] | None = None


Content = Annotated[Union[InputText, InputImage, OutputText], Field(discriminator="type")]


class Message(_Strict):
    type: Literal["message"] = "message"
    role: Literal["user", "system", "developer", "assistant"]
    content: str | list[Content]
    id: str | None = None
    status: str | None = None


class FunctionCall(_Strict):
    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str
    id: str | None = None
    status: str | None = None


class FunctionCallOutput(_Strict):
    type: Literal["function_call_output"]
    call_id: str
    output: str | list[Annotated[Union[InputText, InputImage], Field(discriminator="type")]]
    id: str | None = None
    status: str | None = None


class ReasoningText(_Strict):
    type: Literal["reasoning_text", "summary_text"]
    text: str


class Reasoning(_Strict):
    type: Literal["reasoning"]
    id: str | None = None
    summary: list[ReasoningText] = []
    content: list[ReasoningText] | None = None
    status: str | None = None


def _item_type(item: Any) -> str:
    """An input item's type: a message may leave it out."""
    return item.get("type", "message") if isinstance(item, dict) else getattr(item, "type", "message")


Item = Annotated[Union[Annotated[Message, Tag("message")], Annotated[FunctionCall, Tag("function_call")],
                       Annotated[FunctionCallOutput, Tag("function_call_output")],
                       Annotated[Reasoning, Tag("reasoning")]], Discriminator(_item_type)]
ITEM_TYPES = ("message", "function_call", "function_call_output", "reasoning")


class FunctionTool(_Strict):
    type: Literal["function"]
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class NamedFunction(_Strict):
    type: Literal["function"]
    name: str


class TextFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    description: str | None = None
    strict: bool | None = None


class TextConfig(_Strict):
    format: TextFormat | None = None
    verbosity: str | None = None  # accepted and ignored


class ReasoningConfig(_Strict):
    """Accepted and ignored: a thinking model reasons as its chat template says."""
    effort: str | None = None
    summary: str | None = None


class ResponsesRequest(_Strict):
    model: str | None = None
    input: str | Annotated[list[Item], Field(min_length=1)]
    instructions: str | None = None
    max_output_tokens: Integer | None = None
    temperature: float | None = None
    top_p: float | None = None
    text: TextConfig | None = None
    tools: list[FunctionTool] | None = None
    tool_choice: Literal["auto", "none", "required"] | NamedFunction | None = None
    parallel_tool_calls: bool = True
    stream: bool = False
    store: bool | None = Field(None, description="only false: nothing is stored")
    previous_response_id: str | None = Field(None, description="not supported: send the whole conversation")
    # accepted and ignored
    reasoning: ReasoningConfig | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None
    service_tier: str | None = None
    truncation: Literal["disabled"] | None = None

    def chat_request(self) -> tuple[ChatCompletionRequest, list[str]]:
        """The chat request, and each of its messages' param here (`instructions`, `input[i]`)."""
        if self.store:
            raise APIError(400, "store: true is not supported: this server keeps no responses (send store: false, "
                                "or leave it out)", param="store")
        if self.previous_response_id is not None:
            raise APIError(400, "previous_response_id is not supported: this server keeps no responses; send the "
                                "whole conversation as input", param="previous_response_id")
        messages, where = _messages(self)
        fields: dict[str, Any] = {"model": self.model, "messages": messages, "stream": self.stream,
                                  "parallel_tool_calls": self.parallel_tool_calls}
        if self.stream:
            fields["stream_options"] = {"include_usage": True}
        for ours, theirs in (("max_output_tokens", "max_completion_tokens"), ("temperature", "temperature"),
                             ("top_p", "top_p")):
            if getattr(self, ours) is not None:
                fields[theirs] = getattr(self, ours)
        if self.tools:
            fields["tools"] = [{"type": "function", "function": tool.model_dump(exclude={"type"}, exclude_none=True)}
                               for tool in self.tools]
        if self.tool_choice is not None:
            fields["tool_choice"] = self.tool_choice if isinstance(self.tool_choice, str) else \
                {"type": "function", "function": {"name": self.tool_choice.name}}
        if self.text is not None and self.text.format is not None:
            fields["response_format"] = _response_format(self.text.format)
        try:
            return ChatCompletionRequest.model_validate(fields), where
        except ValidationError as error:
            message, param = describe_validation_error(error)
            raise _in_our_terms(APIError(400, message, param=param), where) from None

    def echo(self) -> dict[str, Any]:
        """The request's settings as a Response repeats them."""
        return {"instructions": self.instructions, "max_output_tokens": self.max_output_tokens,
                "temperature": self.temperature, "top_p": self.top_p,
                "parallel_tool_calls": self.parallel_tool_calls,
                "tool_choice": self.tool_choice.model_dump() if isinstance(self.tool_choice, NamedFunction)
                else self.tool_choice or ("auto" if self.tools else "none"),
                "tools": [tool.model_dump() for tool in self.tools or []],
                "text": {"format": (self.text.format.model_dump(by_alias=True, exclude_none=True)
                                    if self.text is not None and self.text.format is not None else {"type": "text"})},
                "metadata": self.metadata or {}, "store": False, "previous_response_id": None,
                "reasoning": self.reasoning.model_dump() if self.reasoning is not None else None,
                "truncation": "disabled", "user": self.user}


def _response_format(text_format: TextFormat) -> dict[str, Any]:
    if text_format.type != "json_schema":
        return {"type": text_format.type}
    if text_format.schema_ is None:
        raise APIError(400, 'text.format of type "json_schema" needs a schema', param="text.format.schema")
    spec = {"name": text_format.name or "response", "schema": text_format.schema_}
    if text_format.strict is not None:
        spec["strict"] = text_format.strict
    return {"type": "json_schema", "json_schema": spec}


def _messages(body: ResponsesRequest) -> tuple[list[dict[str, Any]], list[str]]:
    """The chat messages of `instructions` and `input`, and each one's param here. Consecutive
    `function_call` items (and the assistant message before them) are one assistant turn; a
    `reasoning` item goes with the assistant turn after it."""
    messages: list[dict[str, Any]] = []
    where: list[str] = []
    if body.instructions is not None:
        messages.append({"role": "system", "content": body.instructions})
        where.append("instructions")
    items = [Message(role="user", content=body.input)] if isinstance(body.input, str) else body.input
    reasoning: str | None = None
    for index, item in enumerate(items):
        last = messages[-1] if messages else None
        if isinstance(item, Reasoning):
            reasoning = "".join(part.text for part in (item.content or item.summary))
            continue
        if isinstance(item, FunctionCall):
            call = {"id": item.call_id, "type": "function", "function": {"name": item.name, "arguments": item.arguments}}
            if last is not None and last["role"] == "assistant" and reasoning is None:
                last.setdefault("tool_calls", []).append(call)
                continue
            message = {"role": "assistant", "content": None, "tool_calls": [call]}
        elif isinstance(item, FunctionCallOutput):
            message = {"role": "tool", "tool_call_id": item.call_id, "content": item.output if isinstance(item.output, str)
                       else [_part(part) for part in item.output]}
        else:
            message = {"role": item.role, "content": item.content if isinstance(item.content, str)
                       else [_part(part) for part in item.content]}
        if message["role"] == "assistant" and reasoning is not None:
            message["reasoning_content"], reasoning = reasoning, None
        messages.append(message)
        where.append(f"input[{index}]" if not isinstance(body.input, str) else "input")
    return messages, where


def _part(part: InputText | InputImage | OutputText) -> dict[str, Any]:
    if isinstance(part, InputImage):
        return {"type": "image_url", "image_url": {"url": part.image_url, "detail": part.detail}}
    return {"type": "text", "text": part.text}


def _in_our_terms(error: APIError, where: list[str] = ()) -> APIError:
    """`error` with its param, and the message's mention of it, in this API's terms: a chat
    request's `messages[2].content[1]` -> `input[1].content[1]` (`where`: each message's param
    here), `tools[0].function.name` -> `tools[0].name`, `max_completion_tokens` -> `max_output_tokens`,
    `response_format` -> `text.format`; and
    pydantic's `input[0].message.content[1]` (the item type it tried) -> `input[0].content[1]`."""
    if error.param is None:
        return error
    param = re.sub(rf"^(input\[\d+\])\.(?:{'|'.join(ITEM_TYPES)})\b", r"\1", error.param)
    param = re.sub(r"^(tools\[\d+\])\.function\b", r"\1", param)
    found = re.match(r"messages\[(\d+)\]", param)
    if found:
        index = int(found.group(1))
        param = (where[index] if index < len(where) else "input") + param[found.end():]
    for chat, ours in (("max_completion_tokens", "max_output_tokens"), ("max_tokens", "max_output_tokens"),
                       ("response_format", "text.format")):
        if param == chat or param.startswith(chat + "."):
            param = ours + param[len(chat):]
    return APIError(error.status, error.message.replace(error.param, param), error.type, param, error.code,
                    error.headers)


# -- the reply ------------------------------------------------------------------------------------

def _ids(request_id: str) -> tuple[str, str, str]:
    """The response's id and those of its reasoning and message items (one of each at most)."""
    return f"resp_{request_id}", f"rs_{request_id}", f"msg_{request_id}"


def _call_item_id(call_id: str) -> str:
    return "fc_" + call_id.removeprefix("call_")


def response_object(body: ResponsesRequest, request_id: str, model: str, created: int, *,
                    output: list[dict[str, Any]], status: str, usage: dict[str, Any] | None) -> dict[str, Any]:
    incomplete = {"reason": "max_output_tokens"} if status == "incomplete" else None
    return {"id": _ids(request_id)[0], "object": "response", "created_at": created, "model": model,
            "status": status, "output": output, "error": None, "incomplete_details": incomplete, "usage": usage,
            **body.echo()}


def _usage(usage) -> dict[str, Any] | None:
    if usage is None:
        return None
    cached = usage.prompt_tokens_details.cached_tokens if usage.prompt_tokens_details is not None else 0
    return {"input_tokens": usage.prompt_tokens, "input_tokens_details": {"cached_tokens": cached, "cache_write_tokens": 0},
            "output_tokens": usage.completion_tokens, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": usage.total_tokens}


def _reasoning_item(item_id: str, text: str, status: str) -> dict[str, Any]:
    return {"id": item_id, "type": "reasoning", "summary": [], "status": status,
            "content": [{"type": "reasoning_text", "text": text}]}


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _message_item(item_id: str, text: str | None, status: str) -> dict[str, Any]:
    return {"id": item_id, "type": "message", "role": "assistant", "status": status,
            "content": [] if text is None else [_text_part(text)]}


def _call_item(call_id: str, name: str, arguments: str, status: str) -> dict[str, Any]:
    return {"id": _call_item_id(call_id), "type": "function_call", "call_id": call_id, "name": name,
            "arguments": arguments, "status": status}


def _status(finish_reason: str | None) -> str:
    return "incomplete" if finish_reason == "length" else "completed"


def from_chat_completion(body: ResponsesRequest, completion: ChatCompletion, request_id: str) -> dict[str, Any]:
    """The Response of a whole chat completion (one choice)."""
    [choice] = completion.choices
    message, status = choice.message, _status(choice.finish_reason)
    _, reasoning_id, message_id = _ids(request_id)
    output = []
    if message.reasoning_content is not None:
        output.append(_reasoning_item(reasoning_id, message.reasoning_content, status))
    if message.content:
        output.append(_message_item(message_id, message.content, status))
    output += [_call_item(call.id, call.function.name, call.function.arguments, "completed")
               for call in message.tool_calls or []]
    return response_object(body, request_id, completion.model, completion.created, output=output, status=status,
                           usage=_usage(completion.usage))


class ResponseEvents:
    """The Responses events of one streamed chat completion: `response.created`, then each output
    item opened (`output_item.added`), its text or arguments as they come, closed
    (`output_item.done`), and `response.completed` (or `response.incomplete`, cut off at
    `max_output_tokens`) with the whole Response; each event numbered (`sequence_number`)."""

    def __init__(self, body: ResponsesRequest, request_id: str, model: str):
        self.body, self.request_id, self.model = body, request_id, model
        self.created = int(time.time())
        self.sequence = 0
        self.output: list[dict[str, Any]] = []  # the items so far, the last one perhaps still open
        self.open: str | None = None  # the kind of the open item: "reasoning", "message" or "call"

    def _event(self, kind: str, **fields) -> str:
        event = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return f"event: {kind}\ndata: {json.dumps(event)}\n\n"

    def error(self, error: APIError) -> str:
        """A failure after the stream began: the Responses API's own `error` event."""
        info = error.body()["error"]
        return self._event("error", code=info["code"], message=info["message"], param=info["param"])

    def _response(self, status: str, usage: dict[str, Any] | None = None) -> dict[str, Any]:
        return response_object(self.body, self.request_id, self.model, self.created, output=self.output,
                               status=status, usage=usage)

    async def events(self, chunks: AsyncIterator[ChatCompletionChunk]) -> AsyncIterator[str]:
        yield self._event("response.created", response=self._response("in_progress"))
        yield self._event("response.in_progress", response=self._response("in_progress"))
        finish_reason, usage = None, None
        async for chunk in chunks:
            if chunk.usage is not None:
                usage = _usage(chunk.usage)
            for choice in chunk.choices:
                delta = choice.delta
                if delta.reasoning_content:
                    for event in self._add_reasoning(delta.reasoning_content):
                        yield event
                if delta.content:
                    for event in self._add_text(delta.content):
                        yield event
                for call in delta.tool_calls or []:
                    for event in self._add_call(call):
                        yield event
                if choice.finish_reason is not None:
                    finish_reason = choice.finish_reason
        status = _status(finish_reason)
        for event in self._close(status):
            yield event
        kind = "response.incomplete" if status == "incomplete" else "response.completed"
        yield self._event(kind, response=self._response(status, usage))

    def _open(self, kind: str, item: dict[str, Any]):
        yield from self._close("completed")
        self.open = kind
        self.output.append(item)
        yield self._event("response.output_item.added", output_index=len(self.output) - 1,
                          item=json.loads(json.dumps(item)))

    def _add_reasoning(self, text: str):
        if self.open != "reasoning":
            yield from self._open("reasoning", _reasoning_item(_ids(self.request_id)[1], "", "in_progress"))
        item = self.output[-1]
        item["content"][0]["text"] += text
        yield self._event("response.reasoning_text.delta", item_id=item["id"], output_index=len(self.output) - 1,
                          content_index=0, delta=text)

    def _add_text(self, text: str):
        if self.open != "message":
            yield from self._open("message", _message_item(_ids(self.request_id)[2], None, "in_progress"))
            item = self.output[-1]
            item["content"].append(_text_part(""))
            yield self._event("response.content_part.added", item_id=item["id"], output_index=len(self.output) - 1,
                              content_index=0, part=_text_part(""))
        item = self.output[-1]
        item["content"][0]["text"] += text
        yield self._event("response.output_text.delta", item_id=item["id"], output_index=len(self.output) - 1,
                          content_index=0, delta=text, logprobs=[])

    def _add_call(self, delta):
        if delta.id is not None:
            yield from self._open("call", _call_item(delta.id, delta.function.name, "", "in_progress"))
        item = self.output[-1]
        arguments = delta.function.arguments or ""
        if arguments:
            item["arguments"] += arguments
            yield self._event("response.function_call_arguments.delta", item_id=item["id"],
                              output_index=len(self.output) - 1, delta=arguments)

    def _close(self, status: str):
        """Close the open item, if any."""
        if self.open is None:
            return
        item, index, kind = self.output[-1], len(self.output) - 1, self.open
        self.open = None
        if kind == "reasoning":
            yield self._event("response.reasoning_text.done", item_id=item["id"], output_index=index, content_index=0,
                              text=item["content"][0]["text"])
        elif kind == "message":
            part = item["content"][0]
            yield self._event("response.output_text.done", item_id=item["id"], output_index=index, content_index=0,
                              text=part["text"], logprobs=[])
            yield self._event("response.content_part.done", item_id=item["id"], output_index=index, content_index=0,
                              part=part)
        else:
            status = "completed"  # a call is whole once its arguments end (the grammar closes them)
            yield self._event("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                              name=item["name"], arguments=item["arguments"])
        item["status"] = status
        yield self._event("response.output_item.done", output_index=index, item=item)


# -- the route ------------------------------------------------------------------------------------

def responses_route(server):
    """`POST /v1/responses` over `server` (an `app.OpenAIServer`): its chat path, this API's shapes."""

    async def create_response(request: Request) -> Response:
        try:
            body = await parse_body(ResponsesRequest, request)
        except APIError as error:
            raise _in_our_terms(error) from None
        chat, where = body.chat_request()
        try:
            answer, job = await server.start_chat(request, chat)
        except (APIError, InputError) as error:
            raise _in_our_terms(api_error(error, request.state.request_id), where) from None
        request_id = job.request_id
        if chat.stream:
            events = ResponseEvents(body, request_id, server.model_name)
            # no `data: [DONE]`: a Responses stream ends with its last event
            return event_stream(events.events(answer.chunks(job)), job, events.error, end="")
        completion = answer.response(job, await job.finals())
        return Response(json.dumps(from_chat_completion(body, completion, request_id)), media_type="application/json")

    return create_response
