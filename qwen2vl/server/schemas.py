"""The OpenAI API shapes the server reads and writes (pydantic), and their translation into
`Processor` messages and `SamplingParams`.

Requests are validated strictly (no silent type coercion, unknown fields refused) so that a typo
in a parameter name is an error instead of a silently ignored setting.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from qwen2vl.sampling_params import SamplingParams

# Fields clients commonly send that change nothing here; accepted and ignored.
IGNORED_FIELDS = ("user", "metadata", "store", "service_tier", "parallel_tool_calls")
# A cap on the pixels of an image sent with OpenAI's `detail: "low"` (256 visual tokens).
LOW_DETAIL_MAX_PIXELS = 256 * 28 * 28


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


# --- requests ------------------------------------------------------------------------------

class _MediaOptions(_Strict):
    """Our per-part extensions: the processor's per-item resize settings."""

    min_pixels: int | None = Field(None, gt=0)
    max_pixels: int | None = Field(None, gt=0)
    resized_height: int | None = Field(None, gt=0)
    resized_width: int | None = Field(None, gt=0)

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
    image_url: ImageURL | str

    def to_processor(self) -> dict[str, Any]:
        image_url = self.image_url if isinstance(self.image_url, ImageURL) else ImageURL(url=self.image_url)
        options = self._options()
        if image_url.detail == "low":
            options.setdefault("max_pixels", LOW_DETAIL_MAX_PIXELS)
        return {"type": "image", "image": image_url.url, **options}


class VideoURL(_Strict):
    url: str


class VideoPart(_MediaOptions):
    type: Literal["video_url"]
    video_url: VideoURL | str
    fps: float | None = Field(None, gt=0)
    nframes: int | None = Field(None, gt=0)

    def to_processor(self) -> dict[str, Any]:
        url = self.video_url.url if isinstance(self.video_url, VideoURL) else self.video_url
        return {"type": "video", "video": url, **self._options()}


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
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = 1
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    # extensions (vLLM names)
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    # accepted and ignored
    user: str | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    parallel_tool_calls: bool | None = None

    def sampling_params(self, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        """Only the fields the client set: the rest come from the checkpoint's generation config,
        exactly as for `Qwen2VL.chat`."""
        fields = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty",
                  "frequency_penalty", "seed", "stop", "stop_token_ids")
        values = {name: getattr(self, name) for name in fields if getattr(self, name) is not None}
        return SamplingParams(max_tokens=max_tokens, logprobs=logprobs, ignore_eos=self.ignore_eos, **values)

    def choice_seeds(self) -> list[int | None]:
        """Choice i samples with seed + i, so each choice is reproducible on its own."""
        return [None if self.seed is None else self.seed + i for i in range(self.n)]


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None

    def processor_messages(self) -> list[dict[str, Any]]:
        return [message.to_processor() for message in self.messages]


class CompletionRequest(_SamplingRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16  # OpenAI's default for this endpoint
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None


# --- responses -----------------------------------------------------------------------------

class _Envelope(BaseModel):
    """A top-level response object. Stream chunks are written with `exclude_unset` (keys a chunk
    sets, even to null, are sent; the others are left out); `object` always counts as set."""

    def model_post_init(self, context: Any) -> None:
        self.__pydantic_fields_set__.add("object")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


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
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
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


# --- validation errors ---------------------------------------------------------------------

def describe_validation_error(error: ValidationError) -> tuple[str, str | None]:
    """(message, param) for the most specific problem pydantic found.

    pydantic reports one error per union branch; the deepest location is the one the client
    meant (a list of content parts with a bad part, rather than "not a string").
    """
    errors = error.errors(include_url=False)
    located = [(_param(err["loc"]), err) for err in errors]
    depth = max(len(err["loc"]) for _, err in located)
    param, first = next((param, err) for param, err in located if len(err["loc"]) == depth)
    messages = [_describe(err) for p, err in located if p == param and len(err["loc"]) == depth]
    text = " or ".join(dict.fromkeys(messages))
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
        return "expected an object"
    return err["msg"]


def _param(loc: tuple) -> str:
    """`('messages', 0, 'content', 'list[...]', 1, 'image_url', 'image_url', 'url')` ->
    `messages[0].content[1].image_url.url`: drops pydantic's union branch labels and the
    discriminator tag it inserts after a list index."""
    out = ""
    previous = None
    for item in loc:
        if isinstance(item, int):
            out += f"[{item}]"
        elif "[" in item or item[:1].isupper() or item in ("str", "int", "float", "bool"):
            pass  # a union branch label
        elif isinstance(previous, int) and item in CONTENT_PART_TYPES and "content" in loc:
            pass  # the discriminator tag
        else:
            out += f".{item}" if out else item
        previous = item
    return out
