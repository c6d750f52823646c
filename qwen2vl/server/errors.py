"""Errors answered in OpenAI's shape, and the mapping from any exception to its HTTP answer."""
from __future__ import annotations

import logging

from fastapi.responses import JSONResponse

from qwen2vl.engine.async_engine import EngineFailure, EngineStopped
from qwen2vl.errors import InputError
from qwen2vl.server.limits import Overloaded
from qwen2vl.server.replies import ErrorInfo, ErrorResponse

logger = logging.getLogger("qwen2vl.server")


class APIError(Exception):
    """An error answered in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return ErrorResponse(error=ErrorInfo(message=self.message, type=self.type, param=self.param,
                                             code=self.code)).model_dump()

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


# Anthropic's error types by HTTP status (its API's list); any other status is an "api_error"
ANTHROPIC_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                         404: "not_found_error", 408: "timeout_error", 413: "request_too_large",
                         415: "invalid_request_error", 429: "rate_limit_error", 503: "overloaded_error",
                         504: "timeout_error"}
ANTHROPIC_PATH = "/v1/messages"  # it and the paths under it answer errors in Anthropic's shape


def anthropic_error_body(error: APIError) -> dict:
    """`error` in Anthropic's shape: `{"type": "error", "error": {"type", "message"}}`."""
    return {"type": "error", "error": {"type": ANTHROPIC_ERROR_TYPES.get(error.status, "api_error"),
                                       "message": error.message}}


def error_response(error: APIError, path: str) -> JSONResponse:
    """The answer to `error` in the shape of the protocol `path` speaks."""
    if path == ANTHROPIC_PATH or path.startswith(ANTHROPIC_PATH + "/"):
        return JSONResponse(anthropic_error_body(error), status_code=error.status, headers=error.headers)
    return error.response()


class ClientGone(Exception):
    """The client disconnected: nobody is left to answer."""


def api_error(error: BaseException, request_id: str) -> APIError:
    """The HTTP answer to an exception; anything unexpected is a 500 that is logged with the request id."""
    if isinstance(error, APIError):
        return error
    if isinstance(error, InputError):
        return APIError(400, str(error), param=_param_of(error))
    if isinstance(error, Overloaded):
        return APIError(503, str(error), "server_overloaded", headers={"Retry-After": str(error.retry_after_s)})
    if isinstance(error, EngineStopped):
        return APIError(503, str(error), "server_error", headers={"Retry-After": "5"})
    if isinstance(error, EngineFailure):  # the engine thread logged the traceback
        return APIError(500, f"{error} (request id {request_id}); this is a bug, please report it", "server_error")
    logger.error("request %s: internal error", request_id, exc_info=error)
    return APIError(500, f"internal server error (request id {request_id}); this is a bug, please report it",
                    "server_error")


def _param_of(error: InputError) -> str | None:
    """OpenAI's `param` of an input error: `messages[i].content[j].field`, or the request field."""
    path = []
    if error.message_index is not None:
        path.append(f"messages[{error.message_index}]")
        if error.content_index is not None:
            path.append(f"content[{error.content_index}]")
    if error.field is not None:
        path.append(error.field)
    return ".".join(path) or None
