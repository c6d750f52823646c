"""The requests the server reads (pydantic models of OpenAI's API and vLLM's extensions), and
their translation: messages into `Processor` messages, sampling fields into `SamplingParams`,
and the reply's one constraint (`response_format`, `structured_outputs`, `guided_*`, or a forced
tool call's grammar) resolved into `SamplingParams` fields.

Requests are validated strictly (no silent type coercion, unknown fields refused) so that a typo
in a parameter name is an error instead of a silently ignored setting. The one conversion: an
integral number such as `16.0` is accepted where an integer is asked (JSON Schema counts it as an
integer), `16.5` is not. What a client is told when validation fails is `validation.py`'s; the
models the server answers with are `replies.py`'s.
"""
from __future__ import annotations

import dataclasses
import functools
import json
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from qwen2vl.engine.block_manager import MAX_CACHE_SALT_CHARS
from qwen2vl.errors import InputError
from qwen2vl.sampling_params import SamplingParams
from qwen2vl.structured import KINDS, response_format_fields
from qwen2vl.tool_calls import TOOL_CHOICES, check_tool_choice, tool_call_grammar

# Fields clients commonly send that change nothing here; accepted and ignored.
# A cap on the pixels of an image sent with OpenAI's `detail: "low"` (256 visual tokens).
LOW_DETAIL_MAX_PIXELS = 256 * 28 * 28


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


def _integral(value: Any) -> Any:
    """`16.0` -> `16`; anything else is left to strict integer validation (which refuses it)."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _token_id_key(value: Any) -> Any:
    """A JSON object key such as "50256" -> 50256 (OpenAI's logit_bias keys are token ids as strings)."""
    return int(value) if isinstance(value, str) and value.isascii() and value.isdigit() else value


Integer = Annotated[int, BeforeValidator(_integral)]
PositiveInteger = Annotated[int, Field(gt=0), BeforeValidator(_integral)]
NonEmptyString = Annotated[str, Field(min_length=1)]
TokenIds = Annotated[list[Integer], Field(min_length=1)]


class _MediaOptions(_Strict):
    """Our per-part extensions: the processor's per-item resize settings."""

    min_pixels: PositiveInteger | None = None
    max_pixels: PositiveInteger | None = None
    resized_height: PositiveInteger | None = None
    resized_width: PositiveInteger | None = None

    def _options(self) -> dict[str, Any]:
        return self.model_dump(exclude={"type", "image_url", "video_url"}, exclude_none=True)


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ImageURL(_Strict):
    url: str
    detail: Literal["auto", "low", "high"] | None = None


class ImagePart(_MediaOptions):
    type: Literal["image_url"]
    image_url: ImageURL

    def to_processor(self) -> dict[str, Any]:
        options = self._options()
        if self.image_url.detail == "low":
            options.setdefault("max_pixels", LOW_DETAIL_MAX_PIXELS)
        return {"type": "image", "image": self.image_url.url, **options}


class VideoURL(_Strict):
    url: str


class VideoPart(_MediaOptions):
    type: Literal["video_url"]
    video_url: VideoURL
    fps: float | None = Field(None, gt=0)
    nframes: PositiveInteger | None = None

    def to_processor(self) -> dict[str, Any]:
        return {"type": "video", "video": self.video_url.url, **self._options()}


ContentPart = Annotated[Union[TextPart, ImagePart, VideoPart], Field(discriminator="type")]
CONTENT_PART_TYPES = ("text", "image_url", "video_url")


class CalledFunction(_Strict):
    name: str
    arguments: str = Field(description="the arguments as JSON text")


class MessageToolCall(_Strict):
    """A call an earlier assistant turn made (as a response's `message.tool_calls` gave it)."""

    id: str
    type: Literal["function"] = "function"
    function: CalledFunction


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = Field(
        None, description="required but for an assistant message with tool_calls")
    name: str | None = None  # accepted for compatibility; the chat template has no use for it
    tool_calls: list[MessageToolCall] | None = Field(None, description="an assistant message's calls")
    tool_call_id: str | None = Field(None, description="a tool message: the call it answers")
    reasoning_content: str | None = Field(
        None, description="an assistant message's reasoning, as a thinking model answered it (the template decides "
                          "whether it is shown again)")

    def to_processor(self) -> dict[str, Any]:
        role = "system" if self.role == "developer" else self.role
        message: dict[str, Any] = {"role": role, "content": self.content}
        if isinstance(self.content, list):
            message["content"] = [{"type": "text", "text": part.text} if isinstance(part, TextPart)
                                  else part.to_processor() for part in self.content]
        if self.tool_calls:
            message["tool_calls"] = [call.model_dump() for call in self.tool_calls]
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        if self.reasoning_content is not None:
            message["reasoning_content"] = self.reasoning_content
        return message


class StreamOptions(_Strict):
    include_usage: bool = False


class FunctionDefinition(_Strict):
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
    description: str | None = None
    parameters: dict[str, Any] | None = Field(
        None, description="a JSON schema of the arguments object; left out: no arguments")
    strict: bool | None = None  # forced calls (tool_choice required or named) always follow `parameters`


class ToolDefinition(_Strict):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: FunctionName


class StructuredOutputs(_Strict):
    """vLLM's `structured_outputs`: one constraint on the reply."""

    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)

    json_schema: dict[str, Any] | str | None = Field(None, alias="json", description="a JSON schema")
    json_object: bool | None = None
    regex: str | None = None
    choice: Annotated[list[str], Field(min_length=1)] | None = None
    grammar: str | None = Field(None, description="a Lark grammar (llguidance's dialect)")


# A request gives at most one constraint (`structured.KINDS`), through `response_format`,
# `structured_outputs` or a `guided_*` field (vLLM's older names).
GUIDED_FIELDS = {"guided_json": "json_schema", "guided_regex": "regex", "guided_choice": "choice",
                 "guided_grammar": "grammar"}


class _SamplingRequest(_Strict):
    """Fields shared by chat and text completions."""

    model: str | None = None
    max_tokens: Integer | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: Integer | None = None
    stop: str | list[str] | None = None
    n: Integer = 1
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    logit_bias: dict[Annotated[int, BeforeValidator(_token_id_key)], float] | None = Field(
        None, description='token id (as a string, such as "50256") -> a bias in [-100, 100] added to its logit')
    # extensions (vLLM names)
    top_k: Integer | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    stop_token_ids: list[Integer] | None = None
    ignore_eos: bool = False
    min_tokens: Integer = 0
    cache_salt: Annotated[str, Field(min_length=1, max_length=MAX_CACHE_SALT_CHARS)] | None = Field(
        None, description="cached prompt blocks and image encodings are shared only with requests of the same salt "
                          "(a random string kept secret, such as 43 base64 characters: 256 bits)")
    # accepted and ignored
    user: str | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    # structured output
    response_format: dict[str, Any] | None = Field(
        None, description='OpenAI\'s: {"type": "text"}, {"type": "json_object"} or {"type": "json_schema", '
                          '"json_schema": {"name": ..., "schema": {...}, "strict": true}}')
    structured_outputs: StructuredOutputs | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: Annotated[list[str], Field(min_length=1)] | None = None
    guided_grammar: str | None = None

    def sampling_params(self, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        """Only the fields the client set: the rest come from the checkpoint's generation config,
        exactly as for `Qwen2VL.chat`."""
        values = {name: getattr(self, name) for name in SAMPLING_FIELDS_BY_NAME if getattr(self, name) is not None}
        _, constraint = self.reply_constraint
        return SamplingParams(max_tokens=max_tokens, logprobs=logprobs, **values, **constraint)

    def sampling_field_names(self) -> dict[str, str]:
        """The request's names of `SamplingParams` fields where they differ, for error messages."""
        param, constraint = self.reply_constraint
        return {name: param for name in constraint}

    @functools.cached_property
    def reply_constraint(self) -> tuple[str | None, dict[str, Any]]:
        """`constraint()`, worked out once per request (a forced tool call's grammar is built there)."""
        return self.constraint()

    def located(self, error: InputError) -> InputError:
        """`error` with a `SamplingParams` field renamed to the request field that set it."""
        param = self.sampling_field_names().get(error.field) if error.message_index is None else None
        return error if param is None else type(error)(error.cause, field=param)

    def constraint(self) -> tuple[str | None, dict[str, Any]]:
        """(the request field, its `SamplingParams` field values) of the reply's constraint, if any:
        at most one of `response_format`, `structured_outputs` and the `guided_*` fields."""
        given = []
        if self.response_format is not None:
            fields = response_format_fields(self.response_format)
            if fields:
                given.append(("response_format", fields))
        if self.structured_outputs is not None:
            for name, value in self.structured_outputs.model_dump(exclude_none=True).items():
                if value is not False:  # json_object: false constrains nothing
                    alias = StructuredOutputs.model_fields[name].alias or name
                    given.append((f"structured_outputs.{alias}", {name: value}))
        given += [(name, {field: getattr(self, name)}) for name, field in GUIDED_FIELDS.items()
                  if getattr(self, name) is not None]
        if len(given) > 1:
            raise InputError(f"the reply can follow one constraint; this request gives {len(given)}: "
                             f"{', '.join(param for param, _ in given)}", field=given[1][0])
        return given[0] if given else (None, {})

    def choice_seeds(self) -> list[int | None]:
        """Choice i samples with seed + i, so each choice is reproducible on its own."""
        return [None if self.seed is None else self.seed + i for i in range(self.n)]


# The `SamplingParams` fields a request sets under their own name; `max_tokens` and `logprobs`
# take the endpoint's own shape (max_completion_tokens, top_logprobs), the rest is not offered.
SAMPLING_FIELDS_BY_NAME = tuple(f.name for f in dataclasses.fields(SamplingParams)
                                if f.name in _SamplingRequest.model_fields and f.name not in ("max_tokens", "logprobs")
                                and f.name not in KINDS)
SAMPLING_FIELDS_NOT_OFFERED = ("skip_special_tokens", "prompt_logprobs")  # the latter: set by echo + logprobs


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Integer | None = None
    logprobs: bool = False
    top_logprobs: Integer | None = None
    tools: list[ToolDefinition] | None = None
    tool_choice: Literal[TOOL_CHOICES] | NamedToolChoice | None = Field(
        None, description='"auto" (the default with tools), "none" (the default without), "required", or '
                          '{"type": "function", "function": {"name": ...}}')
    parallel_tool_calls: bool = Field(True, description="whether a forced reply may make several calls")

    def processor_messages(self) -> list[dict[str, Any]]:
        return [message.to_processor() for message in self.messages]

    def template_tools(self) -> list[dict[str, Any]] | None:
        """The tools as the chat template lists them (as sent, unset fields left out)."""
        return [tool.model_dump(exclude_none=True) for tool in self.tools] if self.tools else None

    @property
    def effective_tool_choice(self) -> str | dict:
        if self.tool_choice is None:
            return "auto" if self.tools else "none"
        return self.tool_choice if isinstance(self.tool_choice, str) else self.tool_choice.model_dump()

    @property
    def parses_tool_calls(self) -> bool:
        """Whether `<tool_call>` blocks in the reply are answered as `tool_calls`."""
        return bool(self.tools) and self.effective_tool_choice != "none"

    def constraint(self) -> tuple[str | None, dict[str, Any]]:
        """Also the grammar of the tool calls (`tool_choice` "required", a named function, or
        "auto" unless a structured-output field constrains the reply)."""
        param, constraint = super().constraint()
        tools, choice = self.template_tools() or [], self.effective_tool_choice
        check_tool_choice(tools, choice)
        grammar = tool_call_grammar(tools, choice, self.parallel_tool_calls)
        if grammar is None or (choice == "auto" and param is not None):
            return param, constraint
        if param is not None:
            raise InputError(f"tool_choice {json.dumps(choice)} constrains the reply to tool calls; it cannot be "
                             f"combined with {param}", field=param)
        return "tools", {"grammar": grammar}

    def sampling_field_names(self) -> dict[str, str]:
        names = {"logprobs": "top_logprobs", **super().sampling_field_names()}
        if self.max_completion_tokens is not None:
            names["max_tokens"] = "max_completion_tokens"
        return names


class CompletionRequest(_SamplingRequest):
    # never empty: a prompt of no tokens gives the model nothing to continue
    prompt: NonEmptyString | Annotated[list[NonEmptyString], Field(min_length=1)] | TokenIds \
        | Annotated[list[TokenIds], Field(min_length=1)]
    max_tokens: Integer | None = 16  # OpenAI's default for this endpoint
    logprobs: Integer | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: Integer | None = None


REQUEST_MODELS = (ChatCompletionRequest, CompletionRequest)
