"""The OpenAI-compatible HTTP server: FastAPI routes over an `AsyncEngine`.

    from qwen2vl import Qwen2VL
    from qwen2vl.server import create_app
    app = create_app(Qwen2VL.from_pretrained(DIR), model_name="qwen2-vl")   # then: uvicorn.run(app)

Each request is validated (pydantic, strict), admitted under the in-flight limit, has its media
checked, fetched and decoded in a worker thread, and is then handed to the engine thread; its
outputs come back on its own queue. A client that disconnects, or a request that runs out of
time, is aborted in the engine, which frees its KV blocks.

The handlers parse the raw body themselves (strict JSON validation with our own messages); the
OpenAPI document (`/openapi.json`, `/docs`) declares the same pydantic models as the bodies.
"""
from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import aclosing, asynccontextmanager
from functools import lru_cache

from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from pydantic.json_schema import models_json_schema
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException

from qwen2vl import __version__
from qwen2vl.engine.async_engine import AsyncEngine, EngineFailure, EngineStopped, RequestCancelled, RequestStream
from qwen2vl.engine.sequence import RequestOutput
from qwen2vl.errors import InputError, Qwen2VLError
from qwen2vl.processor.types import PreparedPrompt
from qwen2vl.sampling_params import SEED_RANGE, SamplingParams
from qwen2vl.server.limits import Admission, MediaAccess, Overloaded, ServerLimits
from qwen2vl.server.media import check_media, server_processor
from qwen2vl.server.metrics import Metrics
from qwen2vl.server.schemas import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatDelta,
    ChoiceLogprobs,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    ErrorInfo,
    ErrorResponse,
    HealthStatus,
    ModelCard,
    ModelList,
    REQUEST_MODELS,
    RESPONSE_MODELS,
    TextCompletion,
    TokenLogprob,
    TopLogprob,
    Usage,
    describe_validation_error,
)

logger = logging.getLogger("qwen2vl.server")

ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics", "/openapi.json", "/docs")
PUBLIC_PATHS = ("/health", "/openapi.json", "/docs")  # no API key needed
CLIENT_CLOSED = 499  # nginx's status for "the client closed the connection"; only seen in metrics


def _endpoint(path: str) -> str:
    """The metrics label of a path: one of ENDPOINTS, the model route, or "other"."""
    if path in ENDPOINTS:
        return path
    return "/v1/models/{model}" if path.startswith("/v1/models/") else "other"


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


# --- the gate every HTTP request passes --------------------------------------------------------

class RequestGate:
    """ASGI middleware: request id, API key, body size limit, request metrics, and a 500 in
    OpenAI's shape for anything unexpected. It reads the body (up to the limit) before the route
    sees it, so an oversized or unauthenticated request costs nothing more."""

    def __init__(self, app, server: OpenAIServer):
        self.app = app
        self.server = server

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        request_id = uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        exchange = _Exchange()

        async def send_tagged(message):
            if message["type"] == "http.response.start":
                exchange.status = message["status"]
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", request_id.encode())]}
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                exchange.complete = True
            await send(message)

        try:
            self._authorize(scope)
            body = await self._read_body(scope, receive)
            await self.app(scope, exchange.replay(body, receive), send_tagged)
        except Exception as error:  # noqa: BLE001 - every failure must still get an answer
            if isinstance(error, _ClientGone):
                return
            answer = api_error(error, request_id)
            if exchange.status is None:
                await answer.response()(scope, receive, send_tagged)
        finally:
            status = CLIENT_CLOSED if exchange.client_left or exchange.status is None else exchange.status
            self.server.metrics.requests.inc(_endpoint(scope["path"]), str(status))

    def _authorize(self, scope) -> None:
        key = self.server.api_key
        if key is None or scope["path"] in PUBLIC_PATHS:
            return
        scheme, _, token = Headers(scope=scope).get("authorization", "").partition(" ")
        if not token:
            raise APIError(401, "no API key: send it as 'Authorization: Bearer <key>'", code="invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
            raise APIError(401, "incorrect API key", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    async def _read_body(self, scope, receive) -> bytes:
        limit = self.server.limits.max_body_bytes
        declared = Headers(scope=scope).get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise _too_large(int(declared), limit)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _ClientGone()
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise _too_large(size, limit)
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


class _ClientGone(Exception):
    """The client disconnected: nobody is left to answer."""


def _too_large(size: int, limit: int) -> APIError:
    return APIError(413, f"the request body is {size} bytes or more, over the limit of {limit} bytes",
                    code="request_too_large")


class _Exchange:
    """One HTTP exchange as the gate sees it: the status sent (None: none yet), whether the
    response went out in full, and whether the client left before that (a stream cut short
    counts as 499, not as the 200 its headers said)."""

    def __init__(self):
        self.status: int | None = None
        self.complete = False
        self.client_left = False

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


async def _until_disconnected(receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


# --- one generation: admission, media, engine streams, disconnect and timeout watch -------------

class _Job:
    """The engine requests of one HTTP request (`n` choices per prompt), from admission to close."""

    def __init__(self, server: OpenAIServer, request: Request, num_choices: int):
        self.server = server
        self.request = request
        self.request_id = request.state.request_id
        self.num_choices = num_choices
        self.arrival = time.monotonic()
        self.deadline = self.arrival + server.limits.request_timeout_s
        self.prompts: list[PreparedPrompt] = []
        self.streams: list[RequestStream] = []
        self._admitted = 0
        self._watcher: asyncio.Task | None = None
        self._timed_out = False
        self._num_finished = 0

    async def start(self, prepare: Callable[[], list[PreparedPrompt]], params: list[SamplingParams]) -> None:
        """Admit, prepare the prompts in a worker thread and hand `len(prompts) * len(params)`
        requests to the engine (choice `p * len(params) + i` is prompt p with params i)."""
        server = self.server
        server.admission.acquire(self.num_choices)
        self._admitted = self.num_choices
        try:
            loop = asyncio.get_running_loop()
            self.prompts = await self._in_time(loop.run_in_executor(server.media_pool, prepare))
            for prompt in self.prompts:
                server.limits.check_prompt_length(len(prompt), server.max_model_len)
            requests = [(prompt, choice_params) for prompt in self.prompts for choice_params in params]
            added = await asyncio.gather(
                *(server.engine.add_request(prompt, choice_params, f"{self.request_id}-{index}")
                  for index, (prompt, choice_params) in enumerate(requests)),
                return_exceptions=True,
            )
            self.streams = [stream for stream in added if isinstance(stream, RequestStream)]
            failures = [error for error in added if isinstance(error, BaseException)]
            if failures:
                raise failures[0]
            server.metrics.prompt_tokens.inc(amount=sum(len(prompt) for prompt, _ in requests))
            self._watcher = asyncio.create_task(self._watch())
        except BaseException:
            self.close()
            raise

    @property
    def prompt_tokens(self) -> int:
        return sum(len(prompt) for prompt in self.prompts)

    async def events(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        """(choice index, output) as the engine produces them, all choices interleaved."""
        try:
            async with aclosing(_merge(self.streams)) as merged:
                async for index, output in merged:
                    self._observe(output)
                    yield index, output
        except RequestCancelled:
            if self._timed_out:
                raise APIError(504, f"the request ran past the server's limit of {self.server.limits.request_timeout_s:g} s",
                               "timeout_error", code="request_timeout") from None
            raise _ClientGone() from None

    def _observe(self, output: RequestOutput) -> None:
        metrics, now = self.server.metrics, time.monotonic()
        if output.new_token_ids and len(output.token_ids) == len(output.new_token_ids):
            metrics.time_to_first_token.observe(now - self.arrival)
        metrics.generation_tokens.inc(amount=len(output.new_token_ids))
        if output.finished:
            self._num_finished += 1
            metrics.request_latency.observe(now - self.arrival)
            metrics.finished.inc(output.finish_reason or "unknown")
            if output.finish_reason == "error":
                raise APIError(500, f"generation failed: {output.error} (request id {self.request_id})", "server_error")

    async def finals(self) -> list[RequestOutput]:
        last: list[RequestOutput | None] = [None] * len(self.streams)
        async for index, output in self.events():
            last[index] = output
        return last

    def close(self) -> None:
        """Abort what is still running (freeing its KV blocks), count it under finish reason
        "abort" (the client left, or the request timed out), and give back the admission."""
        if self._watcher is not None:
            self._watcher.cancel()
            self._watcher = None
            unfinished = len(self.streams) - self._num_finished
            if unfinished:
                self.server.metrics.finished.inc("abort", amount=unfinished)
        for stream in self.streams:
            stream.abort()
        self.server.admission.release(self._admitted)
        self._admitted = 0

    async def _in_time(self, awaitable):
        try:
            return await asyncio.wait_for(awaitable, max(self.deadline - time.monotonic(), 0))
        except asyncio.TimeoutError:
            raise APIError(504, f"preparing the request ran past the server's limit of "
                                f"{self.server.limits.request_timeout_s:g} s", "timeout_error",
                           code="request_timeout") from None

    async def _watch(self) -> None:
        try:
            await asyncio.wait_for(_until_disconnected(self.request.receive), max(self.deadline - time.monotonic(), 0))
        except asyncio.TimeoutError:
            self._timed_out = True
        for stream in self.streams:
            stream.abort()


async def _merge(streams: list[RequestStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
    pending = {asyncio.ensure_future(stream.__anext__()): index for index, stream in enumerate(streams)}
    try:
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for future in sorted(done, key=pending.get):
                index = pending.pop(future)
                try:
                    output = future.result()
                except StopAsyncIteration:
                    continue
                pending[asyncio.ensure_future(streams[index].__anext__())] = index
                yield index, output
    finally:
        for future in pending:
            future.cancel()


# --- the server --------------------------------------------------------------------------------

class OpenAIServer:
    """Routes and shared state of one app: engine loop, processor, limits, metrics."""

    def __init__(self, llm, model_name: str, limits: ServerLimits, media: MediaAccess, api_key: str | None,
                 default_params: SamplingParams | None = None):
        self.llm = llm
        self.model_name = model_name
        self.default_params = default_params
        self.limits = limits
        self.api_key = api_key or None
        self.engine = AsyncEngine(llm.driver)
        self.processor = server_processor(llm.processor, media, limits)
        self.tokenizer = self.processor.tokenizer
        self.vocab_size = self.tokenizer.vocab_size
        self.max_model_len = llm.engine.max_model_len
        self.admission = Admission(limits.max_requests_in_flight)
        self.metrics = Metrics()
        self.media_pool = ThreadPoolExecutor(limits.media_workers, thread_name_prefix="qwen2vl-media")
        self.created = int(time.time())
        self._token_strings = lru_cache(maxsize=1 << 16)(self._token_string)

    # -- routes -----------------------------------------------------------------------------

    async def chat_completions(self, request: Request) -> Response:
        body = self._with_defaults(await _parse(ChatCompletionRequest, request))
        self._check_common(body)
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        if body.max_tokens is not None and body.max_completion_tokens is not None and body.max_tokens != body.max_completion_tokens:
            raise APIError(400, "max_tokens and max_completion_tokens disagree; give one of them", param="max_tokens")
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        params = self._choice_params(body, max_tokens, logprobs, num_prompts=1)
        messages = body.processor_messages()
        job = _Job(self, request, len(params))
        await job.start(lambda: self._prepare_chat(messages), params)
        if body.stream:
            return _sse(self._chat_chunks(body, job), job)
        try:
            outputs = await job.finals()
        finally:
            job.close()
        choices = [ChatChoice(index=index, message=AssistantMessage(content=output.text),
                              logprobs=self._chat_logprobs(output.token_ids, output.logprobs, logprobs),
                              finish_reason=output.finish_reason) for index, output in enumerate(outputs)]
        return _json(ChatCompletion(id=f"chatcmpl-{job.request_id}", created=int(time.time()), model=self.model_name,
                                    choices=choices, usage=self._usage(job, outputs)))

    async def completions(self, request: Request) -> Response:
        body = self._with_defaults(await _parse(CompletionRequest, request))
        self._check_common(body)
        if body.suffix is not None:
            raise APIError(400, "suffix is not supported by this server", param="suffix")
        if body.echo and body.logprobs is not None:
            # the prompt's logprobs would need the model's logits at every prompt position
            raise APIError(400, "echo together with logprobs is not supported by this server (it has no logprobs "
                                "for prompt tokens); leave out one of them", param="echo")
        if body.best_of not in (None, 1, body.n):
            raise APIError(400, "best_of is not supported by this server (only best_of = n)", param="best_of")
        prompts = [body.prompt] if isinstance(body.prompt, str) or _is_token_list(body.prompt) else body.prompt
        params = self._choice_params(body, body.max_tokens, body.logprobs, num_prompts=len(prompts))
        job = _Job(self, request, len(prompts) * len(params))
        await job.start(lambda: self._prepare_text(prompts), params)
        if body.stream:
            return _sse(self._completion_chunks(body, job), job)
        try:
            outputs = await job.finals()
        finally:
            job.close()
        choices = [CompletionChoice(index=index, text=self._echo(body, job, index) + output.text,
                                    finish_reason=output.finish_reason,
                                    logprobs=self._completion_logprobs(output.token_ids, output.logprobs, body.logprobs, 0))
                   for index, output in enumerate(outputs)]
        return _json(TextCompletion(id=f"cmpl-{job.request_id}", created=int(time.time()), model=self.model_name,
                                    choices=choices, usage=self._usage(job, outputs)))

    async def models(self, request: Request) -> Response:
        return _json(ModelList(data=[self._model_card()]))

    async def model(self, request: Request) -> Response:
        self._check_model(request.path_params["model"])
        return _json(self._model_card())

    async def health(self, request: Request) -> Response:
        if not self.engine.is_running:
            raise APIError(503, "the engine is not running", "server_error")
        return _json(HealthStatus())

    async def prometheus(self, request: Request) -> Response:
        text = self.metrics.render(running=self.engine.num_requests - self.engine.num_waiting,
                                   waiting=self.admission.in_flight - (self.engine.num_requests - self.engine.num_waiting),
                                   kv_cache_usage=self.engine.kv_cache_usage)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    # -- requests to engine inputs ------------------------------------------------------------

    def _model_card(self) -> ModelCard:
        return ModelCard(id=self.model_name, created=self.created, max_model_len=self.max_model_len)

    def _check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise APIError(404, f"model {model!r} does not exist; this server serves {self.model_name!r}",
                           param="model", code="model_not_found")

    def _with_defaults(self, body):
        """`body` with the sampling fields its client left unset taken from `default_params`."""
        if self.default_params is None:
            return body
        given = body.model_fields_set | ({"max_tokens"} if "max_completion_tokens" in body.model_fields_set else set())
        defaults = {name: value for name, value in dataclasses.asdict(self.default_params).items()
                    if value is not None and name in type(body).model_fields and name not in given}
        return body.model_copy(update=defaults)

    def _check_common(self, body) -> None:
        """The checks chat and text completions share beyond the schema."""
        self._check_model(body.model)
        if body.stream_options is not None and not body.stream:
            raise APIError(400, "stream_options is only allowed with stream: true", param="stream_options")

    def _choice_params(self, body, max_tokens: int | None, logprobs: int | None, num_prompts: int) -> list[SamplingParams]:
        try:
            self.limits.check_choices(body.n * num_prompts)
        except InputError as error:
            raise APIError(400, str(error), param="n") from None
        base = body.sampling_params(max_tokens, logprobs)
        base.validate(vocab_size=self.vocab_size, names=body.sampling_field_names())
        seeds = body.choice_seeds()
        if seeds[-1] is not None and seeds[-1] > SEED_RANGE[1]:
            raise APIError(400, f"seed={body.seed} with n={body.n} is invalid: choice i samples with seed + i, and "
                                f"{seeds[-1]} is over the int64 limit {SEED_RANGE[1]}", param="seed")
        return [dataclasses.replace(base, seed=seed) for seed in seeds]

    def _prepare_chat(self, messages: list[dict]) -> list[PreparedPrompt]:
        """Runs in a media worker thread: media checks, fetch, decode, template, tokens."""
        check_media(messages, self.processor.media_policy, self.limits)
        return [self.processor.prepare(messages)]

    def _prepare_text(self, prompts: list[str | list[int]]) -> list[PreparedPrompt]:
        """Token ids and text of each prompt (a non-empty string always has tokens: the schema
        refuses empty prompts)."""
        prepared = []
        for index, prompt in enumerate(prompts):
            ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
            bad = next((token for token in ids if not 0 <= token < self.vocab_size), None)
            if bad is not None:
                raise APIError(400, f"prompt {index} has token id {bad}, outside the vocabulary [0, {self.vocab_size})",
                               param=f"prompt[{index}]")
            text = prompt if isinstance(prompt, str) else self.tokenizer.decode(ids, skip_special_tokens=False)
            positions, rope_delta = self.processor.mrope(ids, [])
            prepared.append(PreparedPrompt(ids, positions, rope_delta, [], text))
        return prepared

    @staticmethod
    def _echo(body: CompletionRequest, job: _Job, choice: int) -> str:
        """The prompt text choice `choice` continues with `echo`, else "" (choices are grouped by prompt)."""
        if not body.echo:
            return ""
        return job.prompts[choice // (len(job.streams) // len(job.prompts))].text

    # -- engine outputs to responses ----------------------------------------------------------

    def _usage(self, job: _Job, outputs: list[RequestOutput]) -> Usage:
        completion = sum(len(output.token_ids) for output in outputs)
        return Usage(prompt_tokens=job.prompt_tokens, completion_tokens=completion,
                     total_tokens=job.prompt_tokens + completion)

    def _token_string(self, token_id: int) -> tuple[str, list[int]]:
        """A token's text and exact bytes (a token may hold part of a UTF-8 character)."""
        piece = self.tokenizer.id_to_token(token_id) or ""
        data = bytes(_BYTE_DECODER[ch] for ch in piece) if all(ch in _BYTE_DECODER for ch in piece) else piece.encode()
        return data.decode("utf-8", errors="replace"), list(data)

    def _chat_logprobs(self, token_ids: list[int], logprobs: list[dict[int, float]] | None, top: int | None):
        if top is None or logprobs is None:
            return None
        content = []
        for token_id, distribution in zip(token_ids, logprobs):
            text, data = self._token_strings(token_id)
            best = sorted(distribution.items(), key=lambda item: -item[1])[:top]
            content.append(TokenLogprob(
                token=text, logprob=distribution[token_id], bytes=data,
                top_logprobs=[TopLogprob(token=self._token_strings(other)[0], logprob=value,
                                         bytes=self._token_strings(other)[1]) for other, value in best],
            ))
        return ChoiceLogprobs(content=content)

    def _completion_logprobs(self, token_ids: list[int], logprobs: list[dict[int, float]] | None, top: int | None,
                             offset: int) -> CompletionLogprobs | None:
        if top is None or logprobs is None:
            return None
        result = CompletionLogprobs(tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[])
        for token_id, distribution in zip(token_ids, logprobs):
            text = self._token_strings(token_id)[0]
            # OpenAI's legacy shape: the `top` most likely tokens and the sampled one (so up to top + 1)
            best = sorted(distribution.items(), key=lambda item: -item[1])[:top]
            chosen = sorted({**dict(best), token_id: distribution[token_id]}.items(), key=lambda item: -item[1])
            result.tokens.append(text)
            result.token_logprobs.append(distribution[token_id])
            result.top_logprobs.append({self._token_strings(other)[0]: value for other, value in chosen})
            result.text_offset.append(offset)
            offset += len(text)
        return result

    async def _chat_chunks(self, body: ChatCompletionRequest, job: _Job) -> AsyncIterator[str]:
        created, chunk_id = int(time.time()), f"chatcmpl-{job.request_id}"
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        top = (body.top_logprobs or 0) if body.logprobs else None

        def chunk(choices: list[ChatChunkChoice], **usage) -> str:
            if include_usage:
                usage.setdefault("usage", None)
            return _event(ChatCompletionChunk(id=chunk_id, created=created, model=self.model_name, choices=choices, **usage))

        for index in range(len(job.streams)):
            yield chunk([ChatChunkChoice(index=index, delta=ChatDelta(role="assistant", content=""),
                                         logprobs=None, finish_reason=None)])
        finals: list[RequestOutput | None] = [None] * len(job.streams)
        async for index, output in job.events():
            new_logprobs = output.logprobs[len(output.logprobs) - len(output.new_token_ids):] if output.logprobs else None
            logprobs = self._chat_logprobs(output.new_token_ids, new_logprobs, top)
            if output.text_delta or output.finished or logprobs:
                yield chunk([ChatChunkChoice(
                    index=index, delta=ChatDelta(content=output.text_delta) if output.text_delta else ChatDelta(),
                    logprobs=logprobs, finish_reason=output.finish_reason if output.finished else None)])
            finals[index] = output
        if include_usage:
            yield chunk([], usage=self._usage(job, finals))

    async def _completion_chunks(self, body: CompletionRequest, job: _Job) -> AsyncIterator[str]:
        created, chunk_id = int(time.time()), f"cmpl-{job.request_id}"
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        def chunk(choices: list[CompletionChoice], **usage) -> str:
            if include_usage:
                usage.setdefault("usage", None)
            return _event(TextCompletion(id=chunk_id, created=created, model=self.model_name, choices=choices, **usage))

        finals: list[RequestOutput | None] = [None] * len(job.streams)
        offsets = [0] * len(job.streams)
        if body.echo:
            for index in range(len(job.streams)):
                yield chunk([CompletionChoice(index=index, text=self._echo(body, job, index), logprobs=None,
                                              finish_reason=None)])
        async for index, output in job.events():
            new_logprobs = output.logprobs[len(output.logprobs) - len(output.new_token_ids):] if output.logprobs else None
            logprobs = self._completion_logprobs(output.new_token_ids, new_logprobs, body.logprobs, offsets[index])
            if logprobs is not None and logprobs.text_offset:
                offsets[index] = logprobs.text_offset[-1] + len(logprobs.tokens[-1])
            if output.text_delta or output.finished or logprobs:
                yield chunk([CompletionChoice(index=index, text=output.text_delta, logprobs=logprobs,
                                              finish_reason=output.finish_reason if output.finished else None)])
            finals[index] = output
        if include_usage:
            yield chunk([], usage=self._usage(job, finals))


def _is_token_list(prompt) -> bool:
    return isinstance(prompt, list) and all(isinstance(token, int) for token in prompt)


async def _parse(model: type[BaseModel], request: Request):
    """The request's JSON body as `model`. A body declared as anything but JSON is refused (one
    without a Content-Type is read as JSON)."""
    content_type = request.headers.get("content-type")
    if content_type is not None and not _is_json(content_type):
        raise APIError(415, f"the request body must be JSON sent with 'Content-Type: application/json', not "
                            f"{content_type!r} (curl -d sends 'application/x-www-form-urlencoded' unless given "
                            f"-H 'Content-Type: application/json')", code="unsupported_media_type")
    try:
        return model.model_validate_json(await request.body())
    except ValidationError as error:
        message, param = describe_validation_error(error)
        raise APIError(400, message, param=param) from None


def _is_json(content_type: str) -> bool:
    media_type = content_type.partition(";")[0].strip().lower()
    return media_type == "application/json" or (media_type.startswith("application/") and media_type.endswith("+json"))


def _json(model: BaseModel) -> Response:
    return Response(model.model_dump_json(), media_type="application/json")


def _event(model: BaseModel) -> str:
    # exclude_unset: keys a chunk sets explicitly (even to null) are sent, the others are left out
    return f"data: {model.model_dump_json(exclude_unset=True)}\n\n"


def _sse(events: AsyncIterator[str], job: _Job) -> StreamingResponse:
    """Server-sent events; an error after the headers went out becomes an error event."""

    async def stream():
        try:
            async for event in events:
                yield event
            yield "data: [DONE]\n\n"
        except _ClientGone:
            return
        except Exception as error:  # noqa: BLE001 - the status line is gone; report in the stream
            yield f"data: {json.dumps(api_error(error, job.request_id).body())}\n\n"
            yield "data: [DONE]\n\n"

    return _EventStream(stream(), job)


class _EventStream(StreamingResponse):
    """Closes its job however the response ends, even if it never got to start streaming."""

    def __init__(self, events: AsyncIterator[str], job: _Job):
        super().__init__(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache",
                                                                           "X-Accel-Buffering": "no"})
        self.job = job

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.job.close()


def _byte_decoder() -> dict[str, int]:
    """The byte-level BPE alphabet (GPT-2's): each byte is one printable character in token strings."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    characters = {byte: byte for byte in printable}
    extra = 0
    for byte in range(256):
        if byte not in characters:
            characters[byte] = 256 + extra
            extra += 1
    return {chr(code): byte for byte, code in characters.items()}


_BYTE_DECODER = _byte_decoder()


# --- the app -----------------------------------------------------------------------------------

def create_app(llm, *, model_name: str, limits: ServerLimits | None = None, media: MediaAccess | None = None,
               api_key: str | None = None, default_params: SamplingParams | None = None) -> FastAPI:
    """An ASGI app serving `llm` (a loaded `Qwen2VL`) under OpenAI's API as `model_name`.

    `default_params` (`serve --temperature ...`) fill the sampling fields a request leaves unset.

    The engine thread starts with the app (lifespan) and stops with it.
    """
    server = OpenAIServer(llm, model_name, limits or ServerLimits(), media or MediaAccess(), api_key, default_params)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        server.engine.start()
        try:
            yield
        finally:
            server.engine.stop()
            server.media_pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="qwen2vl", version=__version__, lifespan=lifespan, docs_url="/docs", redoc_url=None,
                  openapi_url="/openapi.json", swagger_ui_oauth2_redirect_url=None)
    app.state.server = server
    app.add_middleware(RequestGate, server=server)

    async def on_error(request: Request, error: Exception) -> Response:
        return api_error(error, request.state.request_id).response()

    async def on_http_error(request: Request, error: StarletteHTTPException) -> Response:
        return APIError(error.status_code, str(error.detail), "not_found_error" if error.status_code == 404
                        else "invalid_request_error", headers=error.headers).response()  # a 405's Allow

    app.add_exception_handler(APIError, on_error)
    app.add_exception_handler(Qwen2VLError, on_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_api_route("/v1/chat/completions", server.chat_completions, methods=["POST"],
                      openapi_extra=_request_body(ChatCompletionRequest),
                      responses=_responses(ChatCompletion, ChatCompletionChunk))
    app.add_api_route("/v1/completions", server.completions, methods=["POST"],
                      openapi_extra=_request_body(CompletionRequest), responses=_responses(TextCompletion, TextCompletion))
    app.add_api_route("/v1/models", server.models, methods=["GET"], responses=_responses(ModelList))
    app.add_api_route("/v1/models/{model:path}", server.model, methods=["GET"], responses=_responses(ModelCard),
                      openapi_extra={"parameters": [{"name": "model", "in": "path", "required": True,
                                                     "schema": {"type": "string"}}]})
    app.add_api_route("/health", server.health, methods=["GET"], responses=_responses(HealthStatus),
                      openapi_extra={"security": []})
    app.add_api_route("/metrics", server.prometheus, methods=["GET"],
                      responses={200: {"description": "Prometheus text format",
                                       "content": {"text/plain": {"schema": {"type": "string"}}}}})
    app.openapi = lambda: _openapi(app, with_api_key=server.api_key is not None)
    return app


# --- the OpenAPI document: the request and response models above, declared by reference -------

def _ref(model: type[BaseModel]) -> dict:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def _request_body(model: type[BaseModel]) -> dict:
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": _ref(model)}}}}


_ERRORS = {400: "invalid request", 401: "missing or wrong API key", 404: "unknown model or path",
           413: "body over the limit", 415: "body not sent as JSON", 500: "a bug of the server",
           503: "overloaded or shutting down", 504: "over the request timeout"}


def _responses(model: type[BaseModel], chunk: type[BaseModel] | None = None) -> dict:
    content = {"application/json": {"schema": _ref(model)}}
    description = "OK"
    if chunk is not None:
        content["text/event-stream"] = {"schema": _ref(chunk)}
        description = "the response, or with `stream: true` server-sent events, each `data: <chunk>`, then `data: [DONE]`"
    errors = {status: {"description": text, "content": {"application/json": {"schema": _ref(ErrorResponse)}}}
              for status, text in _ERRORS.items()}
    return {200: {"description": description, "content": content}, **errors}


def _openapi(app: FastAPI, with_api_key: bool) -> dict:
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
        models = [(model, "validation") for model in REQUEST_MODELS] + [(model, "serialization") for model in RESPONSE_MODELS]
        _, definitions = models_json_schema(models, ref_template="#/components/schemas/{model}")
        components = schema.setdefault("components", {})
        components.setdefault("schemas", {}).update(definitions["$defs"])
        if with_api_key:
            components["securitySchemes"] = {"apiKey": {"type": "http", "scheme": "bearer"}}
            schema["security"] = [{"apiKey": []}]
        app.openapi_schema = schema
    return app.openapi_schema


def serve(llm, *, model_name: str, host: str = "127.0.0.1", port: int = 8000, limits: ServerLimits | None = None,
          media: MediaAccess | None = None, api_key: str | None = None, log_level: str = "info",
          default_params: SamplingParams | None = None) -> None:
    """Run the server until interrupted (blocking)."""
    import uvicorn

    app = create_app(llm, model_name=model_name, limits=limits, media=media, api_key=api_key,
                     default_params=default_params)
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
