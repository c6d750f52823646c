"""What every HTTP request passes before a route runs: request id, API key, body size limit and
deadline, request metrics, the security headers of every response, a 500 in OpenAI's shape for
anything unexpected; then the body parsed as JSON."""
from __future__ import annotations

import asyncio
import hmac
import uuid

from fastapi import Request
from pydantic import BaseModel, ValidationError
from starlette.datastructures import Headers

from qwen2vl.server.errors import APIError, ClientGone, api_error, error_response
from qwen2vl.server.state import ServerState
from qwen2vl.server.validation import describe_validation_error

ENDPOINTS = ("/", "/v1/chat/completions", "/v1/responses", "/v1/completions", "/v1/messages", "/v1/messages/count_tokens",
             "/v1/models", "/health", "/metrics", "/openapi.json", "/docs")
PUBLIC_PATHS = ("/", "/health", "/openapi.json", "/docs")  # no API key needed; nor under PAGE_PREFIX
PAGE_PREFIX = "/static/"  # the chat page's script and style sheet
# the only routes that read a body; others take none
BODY_PATHS = ("/v1/chat/completions", "/v1/responses", "/v1/completions", "/v1/messages", "/v1/messages/count_tokens")
X_API_KEY_PATHS = ("/v1/messages", "/v1/messages/count_tokens")  # Anthropic's API: the key may come as x-api-key
CLIENT_CLOSED = 499  # nginx's status for "the client closed the connection"; only seen in metrics
# the chat page's needs (its own script, style sheet and fetches; images and videos as data: URIs), nothing
# else: no inline script, no other origin, no framing
CONTENT_SECURITY_POLICY = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                           "media-src 'self' data:; connect-src 'self'; form-action 'self'; base-uri 'none'; "
                           "frame-ancestors 'none'")
SECURITY_HEADERS = ((b"x-frame-options", b"DENY"), (b"x-content-type-options", b"nosniff"),
                    (b"referrer-policy", b"no-referrer"))


def _endpoint(path: str) -> str:
    """The metrics label of a path: one of ENDPOINTS, the model route, or "other"."""
    if path in ENDPOINTS:
        return path
    return "/v1/models/{model}" if path.startswith("/v1/models/") else "other"


class RequestGate:
    """ASGI middleware: request id, API key, body size limit and deadline, request metrics, the
    security headers, and a 500 in OpenAI's shape for anything unexpected. It checks the key, then
    reads the body (up to the limit, within the deadline) before the route sees it, so an
    oversized, slow or unauthenticated request costs nothing more; an answer given before the
    body was read in full closes the connection (the rest of the body is never read)."""

    def __init__(self, app, state: ServerState):
        self.app = app
        self.state = state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        request_id = uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        exchange = _Exchange()

        async def send_tagged(message):
            if message["type"] == "http.response.start":
                exchange.status = message["status"]
                message = {**message, "headers": exchange.response_headers(message.get("headers", []), request_id)}
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                exchange.complete = True
            await send(message)

        try:
            self._authorize(scope)
            body = await self._read_body(scope, receive)
            exchange.body_read = True
            await self.app(scope, exchange.replay(body, receive), send_tagged)
        except Exception as error:  # noqa: BLE001 - every failure must still get an answer
            if isinstance(error, ClientGone):
                return
            answer = api_error(error, request_id)
            if exchange.status is None:
                await error_response(answer, scope["path"])(scope, receive, send_tagged)
        finally:
            status = CLIENT_CLOSED if exchange.client_left or exchange.status is None else exchange.status
            self.state.metrics.requests.inc(_endpoint(scope["path"]), str(status))

    def _authorize(self, scope) -> None:
        """Any one of the server's keys opens the API; the request's state keeps which one (with
        `cache_salt_by_key`, the key decides the request's cache salt)."""
        keys = self.state.api_keys
        if not keys or scope["path"] in PUBLIC_PATHS or scope["path"].startswith(PAGE_PREFIX):
            return
        headers = Headers(scope=scope)
        scheme, _, token = headers.get("authorization", "").partition(" ")
        if scope["path"] in X_API_KEY_PATHS and "x-api-key" in headers:
            scheme, token = "bearer", headers["x-api-key"]
        if not token:
            how = "'x-api-key: <key>' or " if scope["path"] in X_API_KEY_PATHS else ""
            raise APIError(401, f"no API key: send it as {how}'Authorization: Bearer <key>'", code="invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})
        sent = token.strip().encode()
        matches = [key for key in keys if hmac.compare_digest(sent, key.encode())]  # every key compared: no timing hint
        if scheme.lower() != "bearer" or not matches:
            raise APIError(401, "incorrect API key", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        scope["state"]["api_key"] = matches[0]

    async def _read_body(self, scope, receive) -> bytes:
        timeout = self.state.limits.body_timeout_s
        try:
            return await asyncio.wait_for(self._receive_body(scope, receive), timeout)
        except asyncio.TimeoutError:
            raise APIError(408, f"the request body did not arrive within {timeout:g} s", code="request_timeout") from None

    async def _receive_body(self, scope, receive) -> bytes:
        path = scope["path"]
        limit = self.state.limits.max_body_bytes if path in BODY_PATHS else 0
        declared = Headers(scope=scope).get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise _too_large(int(declared), limit, path)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ClientGone()
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise _too_large(size, limit, path)
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


def _too_large(size: int, limit: int, path: str) -> APIError:
    if limit == 0:
        return APIError(413, f"{path} takes no request body (only POST {' and '.join(BODY_PATHS)} do); this one "
                             f"is {size} bytes or more", code="request_too_large")
    return APIError(413, f"the request body is {size} bytes or more, over the limit of {limit} bytes",
                    code="request_too_large")


class _Exchange:
    """One HTTP exchange as the gate sees it: the status sent (None: none yet), whether the
    response went out in full, and whether the client left before that (a stream cut short
    counts as 499, not as the 200 its headers said)."""

    def __init__(self):
        self.status: int | None = None
        self.body_read = False
        self.complete = False
        self.client_left = False

    def response_headers(self, headers, request_id: str) -> list[tuple[bytes, bytes]]:
        """`headers` with the request id and the security headers (a route may set its own
        Content-Security-Policy), and with `Connection: close` if the body was left unread."""
        added = [(b"x-request-id", request_id.encode()), *SECURITY_HEADERS]
        if not any(name.lower() == b"content-security-policy" for name, _ in headers):
            added.append((b"content-security-policy", CONTENT_SECURITY_POLICY.encode()))
        if not self.body_read:
            added.append((b"connection", b"close"))
        return [*headers, *added]

    def replay(self, body: bytes, receive):
        """A `receive` that hands over the already-read body once, then listens to the client
        again (which is how a disconnect is noticed)."""
        pending = [{"type": "http.request", "body": body, "more_body": False}]

        async def replayed():
            if pending:
                return pending.pop()
            message = await receive()
            if message["type"] == "http.disconnect" and not self.complete:
                self.client_left = True
            return message

        return replayed


async def parse_body(model: type[BaseModel], request: Request):
    """The request's JSON body (already read by the gate) as `model`. A body declared as anything
    but JSON is refused (one without a Content-Type is read as JSON). A model whose content parts
    are not OpenAI's names their types in `CONTENT_TYPES` (so errors are located as its client
    sees them)."""
    content_type = request.headers.get("content-type")
    if content_type is not None and not _is_json(content_type):
        raise APIError(415, f"the request body must be JSON sent with 'Content-Type: application/json', not "
                            f"{content_type!r} (curl -d sends 'application/x-www-form-urlencoded' unless given "
                            f"-H 'Content-Type: application/json')", code="unsupported_media_type")
    try:
        return model.model_validate_json(await request.body())
    except ValidationError as error:
        message, param = describe_validation_error(error, getattr(model, "CONTENT_TYPES", None))
        raise APIError(400, message, param=param) from None


def _is_json(content_type: str) -> bool:
    media_type = content_type.partition(";")[0].strip().lower()
    return media_type == "application/json" or (media_type.startswith("application/") and media_type.endswith("+json"))
