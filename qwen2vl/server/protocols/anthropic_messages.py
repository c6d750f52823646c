"""Anthropic's Messages API (`POST /v1/messages`, `POST /v1/messages/count_tokens`) over the chat path.

A request is validated as strictly as the chat endpoint's (unknown fields refused; `cache_control`
and `metadata` accepted and ignored), translated into a `ChatCompletionRequest` (`system` becomes
the system message, `image` blocks image parts, `tool_use` blocks an assistant's `tool_calls`,
`tool_result` blocks tool messages, `thinking` blocks an assistant's `reasoning_content`,
`stop_sequences` `stop`, `tool_choice` any/tool the chat's required/named choice,
`output_config.format` a `response_format`) and run by `OpenAIServer.start_chat`, so media limits, constraints, tool
grammars, metrics and disconnects are the chat endpoint's. Its `ChatCompletion` (or its stream of
chunks) is then written as Anthropic's message (or event stream). Errors are answered in
Anthropic's shape (`errors.error_response`); an error in the prepared conversation is located in
the request's own `messages[i].content[j]`.
"""
from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal, Union

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from qwen2vl.errors import InputError
from qwen2vl.server.errors import APIError, anthropic_error_body
from qwen2vl.server.gate import parse_body
from qwen2vl.server.jobs import Job, event_stream
from qwen2vl.server.replies import ChatCompletion, ChatCompletionChunk
from qwen2vl.server.requests import ChatCompletionRequest, Integer, PositiveInteger
from qwen2vl.server.responses import ChatFormat
from qwen2vl.server.validation import describe_validation_error

if TYPE_CHECKING:
    from qwen2vl.engine.sequence import RequestOutput
    from qwen2vl.server.app import OpenAIServer

BLOCK_TYPES = ("text", "image", "tool_use", "tool_result", "thinking")
IMAGE_MEDIA_TYPES = ("image/jpeg", "image/png", "image/gif", "image/webp")
# the chat path's finish reasons as Anthropic's stop reasons ("stop" is "end_turn" or "stop_sequence")
STOP_REASONS = {"length": "max_tokens", "tool_calls": "tool_use"}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class _Cacheable(_Strict):
    cache_control: dict[str, Any] | None = None  # prompt caching is automatic here: accepted and ignored


class TextBlock(_Cacheable):
    type: Literal["text"]
    text: str
    citations: list[dict[str, Any]] | None = None  # accepted and ignored


class Base64Source(_Strict):
    type: Literal["base64"]
    media_type: Literal[IMAGE_MEDIA_TYPES]
    data: str


class URLSource(_Strict):
    type: Literal["url"]
    url: str


class ImageBlock(_Cacheable):
    type: Literal["image"]
    source: Base64Source | URLSource

    def to_chat(self) -> dict[str, Any]:
        source = self.source
        url = f"data:{source.media_type};base64,{source.data}" if isinstance(source, Base64Source) else source.url
        return {"type": "image_url", "image_url": {"url": url}}


class ToolUseBlock(_Cacheable):
    type: Literal["tool_use"]
    id: str
    name: str
    input: dict[str, Any]


class ThinkingBlock(_Cacheable):
    """An assistant's earlier reasoning, sent back (its `signature` is not checked)."""

    type: Literal["thinking"]
    thinking: str
    signature: str | None = None


ResultBlock = Annotated[Union[TextBlock, ImageBlock], Field(discriminator="type")]


class ToolResultBlock(_Cacheable):
    type: Literal["tool_result"]
    tool_use_id: str
    content: str | list[ResultBlock] | None = None
    is_error: bool | None = None  # the template has no place for it: the content says what happened

    def to_chat(self) -> str | list[dict[str, Any]]:
        if not isinstance(self.content, list):
            return self.content or ""
        return [_part(block) for block in self.content]


ContentBlock = Annotated[Union[TextBlock, ImageBlock, ToolUseBlock, ToolResultBlock, ThinkingBlock],
                         Field(discriminator="type")]


class Message(_Strict):
    role: Literal["user", "assistant"]
    content: str | list[ContentBlock]


class Tool(_Strict):
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
    description: str | None = None
    input_schema: dict[str, Any]
    type: Literal["custom"] | None = None  # Anthropic's server tools (bash, web search, ...) are not offered
    cache_control: dict[str, Any] | None = None


class ToolChoice(_Strict):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = Field(None, description='the tool to call, with type "tool"')
    disable_parallel_tool_use: bool | None = None

    def to_chat(self) -> str | dict[str, Any]:
        if self.type == "tool":
            if self.name is None:
                raise APIError(400, 'tool_choice.name: required with type "tool"', param="tool_choice.name")
            return {"type": "function", "function": {"name": self.name}}
        if self.name is not None:
            raise APIError(400, f'tool_choice.name: only allowed with type "tool", not {self.type!r}',
                           param="tool_choice.name")
        return {"auto": "auto", "any": "required", "none": "none"}[self.type]


class OutputFormat(_Strict):
    type: Literal["json_schema"]
    schema_: dict[str, Any] = Field(alias="schema")


class OutputConfig(_Strict):
    """Anthropic's structured output: the reply is JSON text following `format.schema`."""

    format: OutputFormat | None = None


class CountTokensRequest(_Strict):
    """The body of /v1/messages/count_tokens: a conversation, without its sampling."""

    CONTENT_TYPES: ClassVar[tuple[str, ...]] = BLOCK_TYPES

    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    system: str | list[TextBlock] | None = None
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    cache_control: dict[str, Any] | None = None  # accepted and ignored

    def to_chat(self) -> tuple[ChatCompletionRequest, list[tuple[int | None, list[int]]]]:
        """The chat request, and where each of its messages came from: (the request's message
        index, None for `system`; the block index of each content part)."""
        messages, origins = [], []
        if self.system:
            text = self.system if isinstance(self.system, str) else "\n".join(block.text for block in self.system)
            messages.append({"role": "system", "content": text})
            origins.append((None, []))
        for index, message in enumerate(self.messages):
            for chat_message, blocks in _chat_messages(index, message):
                messages.append(chat_message)
                origins.append((index, blocks))
        fields: dict[str, Any] = {"model": self.model, "messages": messages, **self._sampling()}
        if self.tools:
            fields["tools"] = [{"type": "function", "function": {
                "name": tool.name, "parameters": tool.input_schema,
                **({"description": tool.description} if tool.description is not None else {})}} for tool in self.tools]
        if self.tool_choice is not None:
            fields["tool_choice"] = self.tool_choice.to_chat()
            if self.tool_choice.disable_parallel_tool_use is not None:
                fields["parallel_tool_calls"] = not self.tool_choice.disable_parallel_tool_use
        try:
            return ChatCompletionRequest.model_validate({k: v for k, v in fields.items() if v is not None}), origins
        except ValidationError as error:  # nothing the schema above lets through should get here
            raise APIError(400, describe_validation_error(error)[0]) from None

    def _sampling(self) -> dict[str, Any]:
        return {}


class MessagesRequest(CountTokensRequest):
    max_tokens: PositiveInteger = Field(description="required, as in Anthropic's API")
    stop_sequences: list[str] | None = None
    output_config: OutputConfig | None = None
    stream: bool = False
    temperature: float | None = None
    top_p: float | None = None
    top_k: Integer | None = None
    # accepted and ignored
    metadata: dict[str, Any] | None = None
    service_tier: str | None = None

    def _sampling(self) -> dict[str, Any]:
        output = self.output_config.format if self.output_config is not None else None
        return {"max_completion_tokens": self.max_tokens, "stop": self.stop_sequences, "temperature": self.temperature,
                "top_p": self.top_p, "top_k": self.top_k, "stream": self.stream,
                "stream_options": {"include_usage": True} if self.stream else None,
                "response_format": None if output is None else {
                    "type": "json_schema", "json_schema": {"name": "output", "schema": output.schema_, "strict": True}}}


REQUEST_MODELS = (MessagesRequest, CountTokensRequest)


def _part(block: TextBlock | ImageBlock) -> dict[str, Any]:
    return {"type": "text", "text": block.text} if isinstance(block, TextBlock) else block.to_chat()


def _chat_messages(index: int, message: Message) -> list[tuple[dict[str, Any], list[int]]]:
    """The chat messages of one Anthropic message, each with the block index of its content parts:
    a user's `tool_result` blocks become tool messages (before the rest of its content), an
    assistant's `tool_use` blocks its `tool_calls`."""
    if isinstance(message.content, str):
        return [({"role": message.role, "content": message.content}, [])]
    allowed = {"user": (TextBlock, ImageBlock, ToolResultBlock),
               "assistant": (TextBlock, ToolUseBlock, ThinkingBlock)}[message.role]
    for position, block in enumerate(message.content):
        if not isinstance(block, allowed):
            kinds = ", ".join(repr(kind.model_fields["type"].annotation.__args__[0]) for kind in allowed)
            raise APIError(400, f"messages[{index}].content[{position}]: {block.type!r} blocks are not allowed in "
                                f"{message.role} messages (they take {kinds})",
                           param=f"messages[{index}].content[{position}]")
    if message.role == "assistant":
        text = "".join(block.text for block in message.content if isinstance(block, TextBlock))
        calls = [{"id": block.id, "type": "function",
                  "function": {"name": block.name, "arguments": json.dumps(block.input, ensure_ascii=False)}}
                 for block in message.content if isinstance(block, ToolUseBlock)]
        reasoning = "".join(block.thinking for block in message.content if isinstance(block, ThinkingBlock))
        return [({"role": "assistant", "content": text if text or not calls else None,
                  **({"tool_calls": calls} if calls else {}),
                  **({"reasoning_content": reasoning} if reasoning else {})}, [])]
    # a tool message's parts are its tool_result block's content: -1 - position marks them so
    results = [({"role": "tool", "tool_call_id": block.tool_use_id, "content": block.to_chat()}, [-1 - position])
               for position, block in enumerate(message.content) if isinstance(block, ToolResultBlock)]
    rest = [position for position, block in enumerate(message.content) if not isinstance(block, ToolResultBlock)]
    if rest or not results:
        results.append(({"role": "user", "content": [_part(message.content[position]) for position in rest]}, rest))
    return results


def _located(error: InputError, origins: list[tuple[int | None, list[int]]]) -> InputError:
    """`error`, located in the chat request's messages, located in the Anthropic request's."""
    if error.message_index is None or error.message_index >= len(origins):
        return error
    index, blocks = origins[error.message_index]
    if index is None:
        located = type(error)(error.cause, field=error.field)
        located.args = (f"system: {error.cause}",)
        return located
    content = error.content_index
    if content is None or not blocks:
        return type(error)(error.cause, index, None, error.field)
    if blocks[0] < 0:  # a part of a tool_result block's content
        located = type(error)(error.cause, index, -1 - blocks[0], error.field)
        located.args = (f"messages[{index}].content[{-1 - blocks[0]}].content[{content}]: {error.cause}",)
        return located
    return type(error)(error.cause, index, blocks[content], error.field)


# --- replies ------------------------------------------------------------------------------------

def _stop(finish_reason: str, output: RequestOutput, stops: list[str] | None, tokenizer) -> tuple[str, str | None]:
    """(Anthropic's stop reason, the stop sequence that ended the reply, if one did)."""
    if finish_reason != "stop":
        return STOP_REASONS.get(finish_reason, finish_reason), None
    if stops:  # the text is cut before the stop string; the tokens still hold it
        rest = tokenizer.decode(output.token_ids, skip_special_tokens=True)[len(output.text):]
        matched = next((stop for stop in stops if rest.startswith(stop)), None)
        if matched is not None:
            return "stop_sequence", matched
    return "end_turn", None


def _tool_input(arguments: str) -> dict[str, Any]:
    """A call's arguments as an object (`{}` for a call cut off by max_tokens before they closed)."""
    try:
        value = json.loads(arguments)
    except json.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


def _usage(prompt_tokens: int, cached: int, output_tokens: int) -> dict[str, int]:
    """Anthropic's usage: `input_tokens` are those not read from the cache."""
    return {"input_tokens": prompt_tokens - cached, "output_tokens": output_tokens,
            "cache_read_input_tokens": cached, "cache_creation_input_tokens": 0}


def _event(kind: str, data: dict[str, Any]) -> str:
    return f"event: {kind}\ndata: {json.dumps({'type': kind, **data}, ensure_ascii=False)}\n\n"


def _error_event(error: APIError) -> str:
    return f"event: error\ndata: {json.dumps(anthropic_error_body(error))}\n\n"


class MessagesAPI:
    """The routes of Anthropic's Messages API, over the chat server's `start_chat`."""

    def __init__(self, server: OpenAIServer):
        self.server = server

    async def messages(self, request: Request) -> Response:
        body = await parse_body(MessagesRequest, request)
        chat, origins = body.to_chat()
        try:
            answer, job = await self.server.start_chat(request, chat)
        except InputError as error:
            raise _located(error, origins) from None
        message_id = f"msg_{job.request_id}"
        if body.stream:
            return event_stream(self._events(body, message_id, answer, job), job, _error_event, end="")
        outputs = await job.finals()
        return JSONResponse(self._message(body, message_id, answer.response(job, outputs), outputs[0]))

    async def count_tokens(self, request: Request) -> Response:
        chat, origins = (await parse_body(CountTokensRequest, request)).to_chat()
        try:
            tokens = await self.server.chat_prompt_tokens(request, chat)
        except InputError as error:
            raise _located(error, origins) from None
        return JSONResponse({"input_tokens": tokens})

    def _message(self, body: MessagesRequest, message_id: str, completion: ChatCompletion,
                 output: RequestOutput) -> dict[str, Any]:
        choice, usage = completion.choices[0], completion.usage
        message, content = choice.message, []
        if message.reasoning_content:
            content.append({"type": "thinking", "thinking": message.reasoning_content, "signature": ""})
        if message.content:
            content.append({"type": "text", "text": message.content})
        content += [{"type": "tool_use", "id": call.id, "name": call.function.name,
                     "input": _tool_input(call.function.arguments)} for call in message.tool_calls]
        stop_reason, stop_sequence = _stop(choice.finish_reason, output, body.stop_sequences, self.server.state.tokenizer)
        return {"id": message_id, "type": "message", "role": "assistant", "model": completion.model,
                "content": content, "stop_reason": stop_reason, "stop_sequence": stop_sequence,
                "usage": _usage(usage.prompt_tokens, usage.prompt_tokens_details.cached_tokens,
                                usage.completion_tokens)}

    async def _events(self, body: MessagesRequest, message_id: str, answer: ChatFormat, job: Job) -> AsyncIterator[str]:
        """Anthropic's event sequence from the chat path's chunks: a content block per kind of
        delta (thinking, text, each tool call), opened when its first delta comes."""
        yield _event("message_start", {"message": {
            "id": message_id, "type": "message", "role": "assistant", "model": self.server.model_name, "content": [],
            "stop_reason": None, "stop_sequence": None, "usage": _usage(job.prompt_tokens, 0, 0)}})
        blocks = _Blocks()
        finish_reason, usage = None, None
        async for chunk in answer.chunks(job):
            chunk: ChatCompletionChunk
            if chunk.usage is not None:
                usage = chunk.usage
            for choice in chunk.choices:
                delta = choice.delta
                if delta.reasoning_content:
                    for event in blocks.delta("thinking", {"type": "thinking_delta", "thinking": delta.reasoning_content}):
                        yield event
                if delta.content:
                    for event in blocks.delta("text", {"type": "text_delta", "text": delta.content}):
                        yield event
                for call in delta.tool_calls or []:
                    if call.id is not None:
                        for event in blocks.open("tool_use", {"id": call.id, "name": call.function.name, "input": {}}):
                            yield event
                    if call.function.arguments:
                        for event in blocks.delta("tool_use", {"type": "input_json_delta",
                                                               "partial_json": call.function.arguments}):
                            yield event
                finish_reason = choice.finish_reason or finish_reason
        for event in blocks.close():
            yield event
        stop_reason, stop_sequence = _stop(finish_reason, answer.finals[0], body.stop_sequences,
                                           self.server.state.tokenizer)
        yield _event("message_delta", {"delta": {"stop_reason": stop_reason, "stop_sequence": stop_sequence},
                                       "usage": _usage(usage.prompt_tokens, usage.prompt_tokens_details.cached_tokens,
                                                       usage.completion_tokens)})
        yield _event("message_stop", {})


class _Blocks:
    """The content blocks of a streamed message: which one is open, and the events that open,
    fill and close them."""

    STARTS = {"thinking": {"type": "thinking", "thinking": "", "signature": ""}, "text": {"type": "text", "text": ""}}

    def __init__(self):
        self.index = -1
        self.kind: str | None = None

    def open(self, kind: str, fields: dict[str, Any] | None = None) -> list[str]:
        events = self.close()
        self.index, self.kind = self.index + 1, kind
        block = {"type": kind, **fields} if fields is not None else self.STARTS[kind]
        return [*events, _event("content_block_start", {"index": self.index, "content_block": block})]

    def delta(self, kind: str, delta: dict[str, Any]) -> list[str]:
        events = self.open(kind) if self.kind != kind else []
        return [*events, _event("content_block_delta", {"index": self.index, "delta": delta})]

    def close(self) -> list[str]:
        if self.kind is None:
            return []
        self.kind = None
        return [_event("content_block_stop", {"index": self.index})]
