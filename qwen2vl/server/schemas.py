"""The OpenAI API shapes the server reads and writes (pydantic), and their translation into
`Processor` messages and `SamplingParams`.

Requests are validated strictly (no silent type coercion, unknown fields refused) so that a typo
in a parameter name is an error instead of a silently ignored setting. The one conversion: an
integral number such as `16.0` is accepted where an integer is asked (JSON Schema counts it as an
integer), `16.5` is not.
"""
from __future__ import annotations

import dataclasses
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from qwen2vl.sampling_params import SamplingParams

# Fields clients commonly send that change nothing here; accepted and ignored.
IGNORED_FIELDS = ("user", "metadata", "store", "service_tier", "parallel_tool_calls")
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


# --- requests ------------------------------------------------------------------------------

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


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart]
    name: str | None = None  # accepted for compatibility; the chat template has no use for it

    def to_processor(self) -> dict[str, Any]:
        role = "system" if self.role == "developer" else self.role
        if isinstance(self.content, str):
            return {"role": role, "content": self.content}
        return {"role": role, "content": [
            {"type": "text", "text": part.text} if isinstance(part, TextPart) else part.to_processor()
            for part in self.content
        ]}


class StreamOptions(_Strict):
    include_usage: bool = False


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
    # accepted and ignored
    user: str | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    parallel_tool_calls: bool | None = None

    def sampling_params(self, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        """Only the fields the client set: the rest come from the checkpoint's generation config,
        exactly as for `Qwen2VL.chat`."""
        values = {name: getattr(self, name) for name in SAMPLING_FIELDS_BY_NAME if getattr(self, name) is not None}
        return SamplingParams(max_tokens=max_tokens, logprobs=logprobs, **values)

    def sampling_field_names(self) -> dict[str, str]:
        """The request's names of `SamplingParams` fields where they differ, for error messages."""
        return {}

    def choice_seeds(self) -> list[int | None]:
        """Choice i samples with seed + i, so each choice is reproducible on its own."""
        return [None if self.seed is None else self.seed + i for i in range(self.n)]


# The `SamplingParams` fields a request sets under their own name; `max_tokens` and `logprobs`
# take the endpoint's own shape (max_completion_tokens, top_logprobs), the rest is not offered.
SAMPLING_FIELDS_BY_NAME = tuple(f.name for f in dataclasses.fields(SamplingParams)
                                if f.name in _SamplingRequest.model_fields and f.name not in ("max_tokens", "logprobs"))
SAMPLING_FIELDS_NOT_OFFERED = ("skip_special_tokens", "prompt_logprobs")  # the latter: set by echo + logprobs


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Integer | None = None
    logprobs: bool = False
    top_logprobs: Integer | None = None

    def processor_messages(self) -> list[dict[str, Any]]:
        return [message.to_processor() for message in self.messages]

    def sampling_field_names(self) -> dict[str, str]:
        names = {"logprobs": "top_logprobs"}
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


# --- responses -----------------------------------------------------------------------------

class _Envelope(BaseModel):
    """A top-level response object. Stream chunks are written with `exclude_unset` (keys a chunk
    sets, even to null, are sent; the others are left out); `object` always counts as set."""

    def model_post_init(self, context: Any) -> None:
        self.__pydantic_fields_set__.add("object")


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0  # prompt tokens whose keys and values came from the prefix cache


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails = Field(default_factory=PromptTokensDetails)


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob]


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str


class ChatCompletion(_Envelope):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(_Envelope):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]  # None for an echoed prompt's first token
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class TextCompletion(_Envelope):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "qwen2vl"
    max_model_len: int


class ModelList(_Envelope):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class HealthStatus(BaseModel):
    status: Literal["ok"] = "ok"


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """Every error, in OpenAI's shape."""

    error: ErrorInfo


REQUEST_MODELS = (ChatCompletionRequest, CompletionRequest)
RESPONSE_MODELS = (ChatCompletion, ChatCompletionChunk, TextCompletion, ModelCard, ModelList, HealthStatus, ErrorResponse)


# --- validation errors ---------------------------------------------------------------------

def describe_validation_error(error: ValidationError) -> tuple[str, str | None]:
    """(message, param) for the most specific problem pydantic found.

    pydantic reports one error per union branch; the deepest location is the one the client
    meant (a list of content parts with a bad part, rather than "not a string").
    """
    errors = error.errors(include_url=False)
    depth = max(len(err["loc"]) for err in errors)
    deepest = [err for err in errors if len(err["loc"]) == depth]
    # a union branch whose type matched but whose value did not is the one the client meant
    # (`"prompt": ""` is a string that is too short, rather than "not a list")
    meant = [err for err in deepest if not err["type"].endswith("_type")] or deepest
    param = _param(meant[0]["loc"])
    text = " or ".join(dict.fromkeys(_describe(err) for err in meant if _param(err["loc"]) == param))
    return (f"{param}: {text}" if param else text), param or None


def _describe(err: dict) -> str:
    kind, ctx = err["type"], err.get("ctx") or {}
    if kind == "json_invalid":
        return f"the request body is not valid JSON ({ctx.get('error', err['msg'])})"
    if kind == "union_tag_invalid":
        return (f"unknown content part type {ctx.get('tag')!r}; expected one of "
                f"{', '.join(repr(t) for t in CONTENT_PART_TYPES)}")
    if kind == "union_tag_not_found":
        return "a content part needs a 'type'"
    if kind == "extra_forbidden":
        return "unknown field (not part of the API, or not supported by this server)"
    if kind == "missing":
        return "required field is missing"
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        if err["loc"][-1] in ("image_url", "video_url") and isinstance(err.get("input"), str):
            return 'expected an object {"url": ...}, not a bare string'
        return "expected an object"
    if err["loc"][-1] == "[key]":
        return f"{err['input']!r} is not a token id (keys are token ids written as strings, such as \"50256\")"
    return err["msg"]


def _param(loc: tuple) -> str:
    """`('messages', 0, 'content', 'list[...]', 1, 'image_url', 'image_url', 'url')` ->
    `messages[0].content[1].image_url.url`: drops pydantic's union branch labels and the
    discriminator tag it inserts after a list index."""
    if loc[-1:] == ("[key]",):  # a bad key of a mapping: the mapping is the param
        loc = loc[:-2]
    out = ""
    previous = None
    for item in loc:
        if isinstance(item, int):
            out += f"[{item}]"
        elif "[" in item or item[:1].isupper() or item in ("str", "int", "float", "bool") or item.startswith("constrained-"):
            pass  # a union branch label
        elif isinstance(previous, int) and item in CONTENT_PART_TYPES and "content" in loc:
            pass  # the discriminator tag
        else:
            out += f".{item}" if out else item
        previous = item
    return out
