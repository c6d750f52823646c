"""The OpenAI API shapes the server reads and writes, in one import: the request models and their
translation (`requests.py`), the reply models (`replies.py`) and the wording of validation errors
(`validation.py`). The server's own modules import each from where it is defined.
"""
from __future__ import annotations

from qwen2vl.server.replies import (  # noqa: F401
    RESPONSE_MODELS,
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatDelta,
    ChoiceLogprobs,
    CompletionChoice,
    CompletionLogprobs,
    ErrorInfo,
    ErrorResponse,
    HealthStatus,
    ModelCard,
    ModelList,
    PromptTokensDetails,
    TextCompletion,
    TokenLogprob,
    ToolCall,
    ToolCallDelta,
    ToolCallFunction,
    ToolCallFunctionDelta,
    TopLogprob,
    Usage,
)
from qwen2vl.server.requests import (  # noqa: F401
    CONTENT_PART_TYPES,
    GUIDED_FIELDS,
    LOW_DETAIL_MAX_PIXELS,
    REQUEST_MODELS,
    SAMPLING_FIELDS_BY_NAME,
    SAMPLING_FIELDS_NOT_OFFERED,
    CalledFunction,
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    ContentPart,
    FunctionDefinition,
    FunctionName,
    ImagePart,
    ImageURL,
    Integer,
    MessageToolCall,
    NamedToolChoice,
    NonEmptyString,
    PositiveInteger,
    StreamOptions,
    StructuredOutputs,
    TextPart,
    TokenIds,
    ToolDefinition,
    VideoPart,
    VideoURL,
)
from qwen2vl.server.validation import (  # noqa: F401
    describe_validation_error,
)
