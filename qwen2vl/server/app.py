"""The OpenAI-compatible HTTP server: FastAPI routes over an `AsyncEngine`.

    from qwen2vl import Qwen2VL
    from qwen2vl.server import create_app
    app = create_app(Qwen2VL.from_pretrained(DIR), model_name="qwen2-vl")   # then: uvicorn.run(app)

A request passes the gate first (`gate.py`: request id, API key, body size limit, metrics), then
its route here parses it (pydantic, strict, with our own messages) and checks what the schema
cannot, its prompt text bounded by bytes before any tokenizing. Its job (`jobs.py`) admits it
under the in-flight limit, checks its media against the server's rules, has it prepared in a
worker thread (media fetched, checked against the budget and decoded in the media pool; text alone, templated and tokenized, in starlette's thread pool, never queued
behind media), and hands it to the engine thread; its outputs come back on its
own queue. A client that disconnects, or a request that runs out of time, is aborted in the
engine, which frees its KV blocks. `responses.py` writes the outputs as OpenAI's responses or
stream chunks; `errors.py` turns any exception into an answer in OpenAI's error shape. What these
parts share (limits, admission, metrics, the engine loop, the media pool, the API keys) is one
`state.ServerState`, built here once and passed to each.

Anthropic's Messages API (`/v1/messages`, `protocols/anthropic_messages.py`) is a translation onto
the chat route's own step, `OpenAIServer.start_chat`: the same checks, job and chat answer underneath.

The OpenAPI document (`/openapi.json`, `openapi.py`; Swagger UI at `/docs` with `docs=True`)
declares the same pydantic models as the bodies.
"""
from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Sequence
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, PlainTextResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from qwen2vl import __version__
from qwen2vl.errors import InputError, Qwen2VLError
from qwen2vl.grounding import grounding_header
from qwen2vl.processor.fetch import MediaPolicy
from qwen2vl.processor.types import PreparedPrompt
from qwen2vl.sampling_params import SEED_RANGE, SamplingParams
from qwen2vl.server.errors import APIError, api_error, error_response
from qwen2vl.server.gate import RequestGate, parse_body
from qwen2vl.server.jobs import Job, event_stream
from qwen2vl.server.limits import SERVER_MEDIA, ServerLimits
from qwen2vl.server.media import check_media
from qwen2vl.server.openapi import (
    SWAGGER_UI_PREFIX,
    docs_page,
    openapi_document,
    request_body,
    responses,
    swagger_ui_files,
)
from qwen2vl.server.protocols.openai_responses import ResponsesRequest, responses_route
from qwen2vl.server.protocols.anthropic_messages import CountTokensRequest, MessagesAPI, MessagesRequest
from qwen2vl.server.replies import (
    ChatCompletion,
    ChatCompletionChunk,
    HealthStatus,
    ModelCard,
    ModelList,
    TextCompletion,
)
from qwen2vl.server.requests import ChatCompletionRequest, CompletionRequest
from qwen2vl.server.responses import ChatFormat, CompletionFormat, TokenTexts, json_response, sse_events
from qwen2vl.server.state import ServerState, Timer


PAGE_DIR = Path(__file__).with_name("static")


class OpenAIServer:
    """The routes of one app, over the state its parts share (`state.ServerState`): what a route
    adds is the model's name, the sampling defaults and the tokens' texts."""

    def __init__(self, state: ServerState, model_name: str, default_params: SamplingParams | None = None):
        self.state = state
        self.model_name = model_name
        self.default_params = default_params
        self.created = int(time.time())
        self.token_texts = TokenTexts(state.tokenizer)

    # -- routes -----------------------------------------------------------------------------

    async def chat_completions(self, request: Request) -> Response:
        answer, job = await self.start_chat(request, await parse_body(ChatCompletionRequest, request))
        response = await _respond(answer, job)
        response.headers["X-Grounding"] = self._grounding(job.prompts[0])
        return response

    async def start_chat(self, request: Request, body: ChatCompletionRequest) -> tuple[ChatFormat, Job]:
        """Check a chat request and start its generation: the chat path under every protocol. Its
        reply is `answer.response(job, await job.finals())` (a `ChatCompletion`), or with `stream`
        the `ChatCompletionChunk`s of `answer.chunks(job)`, sent through `event_stream(..., job)`
        (which closes the job however the stream ends)."""
        body = self._with_defaults(body)
        self._check_common(body)
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        if body.max_tokens is not None and body.max_completion_tokens is not None and body.max_tokens != body.max_completion_tokens:
            raise APIError(400, "max_tokens and max_completion_tokens disagree; give one of them", param="max_tokens")
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        answer = ChatFormat(body, self.model_name, self.token_texts, self.state.llm.engine.thinking)
        params = self._choice_params(body, max_tokens, answer.top, num_prompts=1)
        messages, tools = body.processor_messages(), body.template_tools()
        self.state.limits.check_prompt_bytes(_text_bytes(_template_text(messages, tools)), self.state.max_model_len,
                                             "messages")
        job = Job(self.state, request, len(params))
        await _start(job, body, lambda: self._prepare_chat(messages, tools), params, self._cache_salt(request, body))
        return answer, job

    async def chat_prompt_tokens(self, request: Request, body: ChatCompletionRequest) -> int:
        """The tokens of a chat request's prompt (images included), prepared as `start_chat`
        prepares it (admitted, media checked) but never generated from."""
        self._check_model(body.model)
        messages, tools = body.processor_messages(), body.template_tools()
        self.state.limits.check_prompt_bytes(_text_bytes(_template_text(messages, tools)), self.state.max_model_len,
                                             "messages")
        job = Job(self.state, request, 1)
        try:
            await _start(job, body, lambda: self._prepare_chat(messages, tools), [], None)
        finally:
            job.close()
        return job.prompt_tokens

    async def completions(self, request: Request) -> Response:
        body = self._with_defaults(await parse_body(CompletionRequest, request))
        self._check_common(body)
        if body.suffix is not None:
            raise APIError(400, "suffix is not supported by this server", param="suffix")
        if body.best_of not in (None, 1, body.n):
            raise APIError(400, "best_of is not supported by this server (only best_of = n)", param="best_of")
        prompts = [body.prompt] if isinstance(body.prompt, str) or _is_token_list(body.prompt) else body.prompt
        self.state.limits.check_prompt_bytes(_text_bytes(prompts), self.state.max_model_len, "prompt")
        answer = CompletionFormat(body, self.model_name, self.token_texts)
        params = self._choice_params(body, body.max_tokens, answer.top, num_prompts=len(prompts))
        job = Job(self.state, request, len(prompts) * len(params))
        await _start(job, body, lambda: self._prepare_text(prompts), params, self._cache_salt(request, body))
        return await _respond(answer, job)

    async def models(self, request: Request) -> Response:
        return json_response(ModelList(data=[self._model_card()]))

    async def model(self, request: Request) -> Response:
        self._check_model(request.path_params["model"])
        return json_response(self._model_card())

    async def health(self, request: Request) -> Response:
        if not self.state.engine.is_running:
            raise APIError(503, "the engine is not running", "server_error")
        return json_response(HealthStatus())

    async def prometheus(self, request: Request) -> Response:
        state, engine = self.state, self.state.engine
        running = engine.num_requests - engine.num_waiting
        text = state.metrics.render(running=running, waiting=state.admission.in_flight - running,
                                    kv_cache_usage=engine.kv_cache_usage, caches=state.llm.engine.cache_counters)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    # -- requests to engine inputs ------------------------------------------------------------

    def _model_card(self) -> ModelCard:
        return ModelCard(id=self.model_name, created=self.created, max_model_len=self.state.max_model_len)

    def _grounding(self, prompt: PreparedPrompt) -> str:
        """The `X-Grounding` header: how the answer's boxes are written and the images' sizes, so
        the chat page (or any client) places them as `Completion.boxes()` does."""
        images = [item for item in prompt.vision_items if item.kind == "image"]
        return grounding_header(self.state.llm.engine.config.model_type, [item.original_size for item in images],
                                [item.resized_size for item in images])

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

    def _cache_salt(self, request: Request, body) -> str | None:
        """The request's cache salt (the gate keeps the API key it was sent with, if one was needed)."""
        return self.state.cache_salt(getattr(request.state, "api_key", None), body.cache_salt)

    def _check_common(self, body) -> None:
        """The checks chat and text completions share beyond the schema."""
        self._check_model(body.model)
        if body.stream_options is not None and not body.stream:
            raise APIError(400, "stream_options is only allowed with stream: true", param="stream_options")

    def _choice_params(self, body, max_tokens: int | None, logprobs: int | None, num_prompts: int) -> list[SamplingParams]:
        try:
            self.state.limits.check_choices(body.n * num_prompts)
        except InputError as error:
            raise APIError(400, str(error), param="n") from None
        base = body.sampling_params(max_tokens, logprobs)
        base.validate(vocab_size=self.state.vocab_size, names=body.sampling_field_names())
        seeds = body.choice_seeds()
        if seeds[-1] is not None and seeds[-1] > SEED_RANGE[1]:
            raise APIError(400, f"seed={body.seed} with n={body.n} is invalid: choice i samples with seed + i, and "
                                f"{seeds[-1]} is over the int64 limit {SEED_RANGE[1]}", param="seed")
        if getattr(body, "echo", False) and logprobs is not None:  # the echoed prompt's tokens get logprobs too
            base = dataclasses.replace(base, prompt_logprobs=logprobs)
        return [dataclasses.replace(base, seed=seed) for seed in seeds]

    async def _prepare_chat(self, messages: list[dict], tools: list[dict] | None) -> list[PreparedPrompt]:
        """The server's media rules here (no I/O), then fetch, decode, template and tokens in a worker
        thread: a media worker where there are images or videos, else starlette's thread pool, so
        text never waits for media."""
        state = self.state

        def prepare():
            return [state.processor.prepare(messages, context_len=state.max_model_len, tools=tools)]

        if not check_media(messages, state.processor.media_policy, state.limits):
            return await run_in_threadpool(prepare)
        return await asyncio.get_running_loop().run_in_executor(state.media_pool, prepare)

    async def _prepare_text(self, prompts: list[str | list[int]]) -> list[PreparedPrompt]:
        return await run_in_threadpool(self._text_prompts, prompts)

    def _text_prompts(self, prompts: list[str | list[int]]) -> list[PreparedPrompt]:
        """Token ids and text of each prompt (a non-empty string always has tokens: the schema
        refuses empty prompts)."""
        prepared, tokenizer, vocab_size = [], self.state.tokenizer, self.state.vocab_size
        for index, prompt in enumerate(prompts):
            ids = tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
            bad = next((token for token in ids if not 0 <= token < vocab_size), None)
            if bad is not None:
                raise APIError(400, f"prompt {index} has token id {bad}, outside the vocabulary [0, {vocab_size})",
                               param=f"prompt[{index}]")
            text = prompt if isinstance(prompt, str) else tokenizer.decode(ids, skip_special_tokens=False)
            positions, rope_delta = self.state.processor.mrope(ids, [])
            prepared.append(PreparedPrompt(ids, positions, rope_delta, [], text))
        return prepared


async def _start(job: Job, body, prepare, params: list[SamplingParams], cache_salt: str | None) -> None:
    """`job.start`, an input error the engine raises (compiling a constraint) named as the request
    names its field (`response_format`, `tools`, `max_completion_tokens`)."""
    try:
        await job.start(prepare, params, cache_salt)
    except InputError as error:
        raise body.located(error) from None


async def _respond(answer: ChatFormat | CompletionFormat, job: Job) -> Response:
    """The whole response once the job has finished, or with `stream: true` its chunks as they come."""
    if answer.body.stream:
        return event_stream(sse_events(answer.chunks(job)), job)
    return json_response(answer.response(job, await job.finals()))


def _is_token_list(prompt) -> bool:
    return isinstance(prompt, list) and all(isinstance(token, int) for token in prompt)


def _template_text(messages: list[dict], tools: list[dict] | None) -> list:
    """What the chat template renders as text: the messages less their images and videos, and the tools."""
    return [[{**message, "content": [part for part in message["content"] if part.get("type") == "text"]}
             if isinstance(message.get("content"), list) else message for message in messages], tools]


def _text_bytes(value) -> int:
    """UTF-8 bytes of the strings in `value` (lists and dicts of them, keys included); walked without
    recursion, as a tool's schema may nest deep."""
    total, stack = 0, [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            total += len(item) if item.isascii() else len(item.encode())
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    return total


# --- the app -----------------------------------------------------------------------------------

def create_app(llm, *, model_name: str, limits: ServerLimits | None = None, media: MediaPolicy | None = None,
               api_key: str | Sequence[str] | None = None, default_params: SamplingParams | None = None,
               cache_salt_by_key: bool = False, docs: bool = False,
               timer: Timer = asyncio.sleep) -> FastAPI:
    """An ASGI app serving `llm` (a loaded `Qwen2VL`) under OpenAI's API as `model_name`.

    `media`: where images and videos may come from (default `limits.SERVER_MEDIA`: inline data
    only); remote hosts must be public whatever it says. `api_key`: one key or several, any of
    which a client may send. `default_params` (`serve
    --temperature ...`) fill the sampling fields a request leaves unset. `cache_salt_by_key`:
    each API key its own prefix and vision cache (requests share cached prompts only with
    requests sent with the same key). `docs` serves Swagger UI at /docs (see
    `openapi.docs_page`). `timer(seconds)` is awaited for each request's time limit
    (`limits.request_timeout_s`); a test passes one that ends when it says so.

    The engine thread starts with the app (lifespan) and stops with it. `app.state.server` is the
    state the server's parts share (`state.ServerState`).
    """
    state = ServerState.build(llm, limits or ServerLimits(), media or SERVER_MEDIA, api_key, cache_salt_by_key, timer)
    server = OpenAIServer(state, model_name, default_params)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state.start()
        try:
            yield
        finally:
            state.stop()

    app = FastAPI(title="qwen2vl", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url="/openapi.json", swagger_ui_oauth2_redirect_url=None)
    app.state.server = state
    app.add_middleware(RequestGate, state=state)

    async def on_error(request: Request, error: Exception) -> Response:
        return error_response(api_error(error, request.state.request_id), request.url.path)

    async def on_http_error(request: Request, error: StarletteHTTPException) -> Response:
        return error_response(APIError(error.status_code, str(error.detail), "not_found_error"
                                       if error.status_code == 404 else "invalid_request_error",
                                       headers=error.headers), request.url.path)  # a 405's Allow

    app.add_exception_handler(APIError, on_error)
    app.add_exception_handler(Qwen2VLError, on_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_api_route("/v1/chat/completions", server.chat_completions, methods=["POST"],
                      openapi_extra=request_body(ChatCompletionRequest),
                      responses=responses(ChatCompletion, ChatCompletionChunk))
    app.add_api_route("/v1/responses", responses_route(server), methods=["POST"],
                      openapi_extra=request_body(ResponsesRequest))
    messages_api = MessagesAPI(server)
    app.add_api_route("/v1/messages", messages_api.messages, methods=["POST"],
                      openapi_extra=request_body(MessagesRequest))
    app.add_api_route("/v1/messages/count_tokens", messages_api.count_tokens, methods=["POST"],
                      openapi_extra=request_body(CountTokensRequest))
    app.add_api_route("/v1/completions", server.completions, methods=["POST"],
                      openapi_extra=request_body(CompletionRequest), responses=responses(TextCompletion, TextCompletion))
    app.add_api_route("/v1/models", server.models, methods=["GET"], responses=responses(ModelList))
    app.add_api_route("/v1/models/{model:path}", server.model, methods=["GET"], responses=responses(ModelCard),
                      openapi_extra={"parameters": [{"name": "model", "in": "path", "required": True,
                                                     "schema": {"type": "string"}}]})
    app.add_api_route("/health", server.health, methods=["GET"], responses=responses(HealthStatus),
                      openapi_extra={"security": []})
    app.add_api_route("/metrics", server.prometheus, methods=["GET"],
                      responses={200: {"description": "Prometheus text format",
                                       "content": {"text/plain": {"schema": {"type": "string"}}}}})
    # the chat page (static/, package data): public, it asks for the API key itself
    app.add_api_route("/", lambda: FileResponse(PAGE_DIR / "index.html"), methods=["GET"], include_in_schema=False)
    if docs:
        app.add_api_route("/docs", lambda: docs_page(app), methods=["GET"], include_in_schema=False)
        app.mount(SWAGGER_UI_PREFIX, StaticFiles(directory=swagger_ui_files()), name="swagger-ui")
    app.mount("/static", StaticFiles(directory=PAGE_DIR), name="static")
    app.openapi = lambda: openapi_document(app, with_api_key=bool(state.api_keys))
    return app


def serve(llm, *, model_name: str, host: str = "127.0.0.1", port: int = 8000, limits: ServerLimits | None = None,
          media: MediaPolicy | None = None, api_key: str | Sequence[str] | None = None, log_level: str = "info",
          default_params: SamplingParams | None = None, cache_salt_by_key: bool = False, docs: bool = False) -> None:
    """Run the server until interrupted (blocking)."""
    import uvicorn

    from qwen2vl.server.connections import raise_open_file_limit, uvicorn_options

    limits = limits or ServerLimits()
    app = create_app(llm, model_name=model_name, limits=limits, media=media, api_key=api_key,
                     default_params=default_params, cache_salt_by_key=cache_salt_by_key, docs=docs)
    raise_open_file_limit(limits.max_connections)
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5, **uvicorn_options(limits))
