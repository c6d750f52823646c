"""The OpenAI-compatible HTTP server: FastAPI routes over an `AsyncEngine`.

    from qwen2vl import Qwen2VL
    from qwen2vl.server import create_app
    app = create_app(Qwen2VL.from_pretrained(DIR), model_name="qwen2-vl")   # then: uvicorn.run(app)

A request passes the gate first (`gate.py`: request id, API key, body size limit, metrics), then
its route here parses it (pydantic, strict, with our own messages) and checks what the schema
cannot. Its job (`jobs.py`) admits it under the in-flight limit, has its media checked, fetched
and decoded in a worker thread, and hands it to the engine thread; its outputs come back on its
own queue. A client that disconnects, or a request that runs out of time, is aborted in the
engine, which frees its KV blocks. `responses.py` writes the outputs as OpenAI's responses or
stream chunks; `errors.py` turns any exception into an answer in OpenAI's error shape.

The OpenAPI document (`/openapi.json`, `/docs`, `openapi.py`) declares the same pydantic models
as the bodies.
"""
from __future__ import annotations

import dataclasses
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, PlainTextResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from qwen2vl import __version__
from qwen2vl.engine.async_engine import AsyncEngine
from qwen2vl.errors import InputError, Qwen2VLError
from qwen2vl.processor.types import PreparedPrompt
from qwen2vl.sampling_params import SEED_RANGE, SamplingParams
from qwen2vl.server.errors import APIError, api_error
from qwen2vl.server.gate import RequestGate, parse_body
from qwen2vl.server.jobs import Job, event_stream
from qwen2vl.server.limits import Admission, MediaAccess, ServerLimits
from qwen2vl.server.media import check_media, server_processor
from qwen2vl.server.metrics import Metrics
from qwen2vl.server.openapi import openapi_document, request_body, responses
from qwen2vl.server.responses import ChatFormat, CompletionFormat, TokenTexts, json_response
from qwen2vl.server.schemas import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    CompletionRequest,
    HealthStatus,
    ModelCard,
    ModelList,
    TextCompletion,
)


PAGE_DIR = Path(__file__).with_name("static")


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
        self.token_texts = TokenTexts(self.tokenizer)

    # -- routes -----------------------------------------------------------------------------

    async def chat_completions(self, request: Request) -> Response:
        body = self._with_defaults(await parse_body(ChatCompletionRequest, request))
        self._check_common(body)
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        if body.max_tokens is not None and body.max_completion_tokens is not None and body.max_tokens != body.max_completion_tokens:
            raise APIError(400, "max_tokens and max_completion_tokens disagree; give one of them", param="max_tokens")
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        answer = ChatFormat(body, self.model_name, self.token_texts)
        params = self._choice_params(body, max_tokens, answer.top, num_prompts=1)
        messages, tools = body.processor_messages(), body.template_tools()
        job = Job(self, request, len(params))
        await _start(job, body, lambda: self._prepare_chat(messages, tools), params)
        return await _respond(answer, job)

    async def completions(self, request: Request) -> Response:
        body = self._with_defaults(await parse_body(CompletionRequest, request))
        self._check_common(body)
        if body.suffix is not None:
            raise APIError(400, "suffix is not supported by this server", param="suffix")
        if body.best_of not in (None, 1, body.n):
            raise APIError(400, "best_of is not supported by this server (only best_of = n)", param="best_of")
        prompts = [body.prompt] if isinstance(body.prompt, str) or _is_token_list(body.prompt) else body.prompt
        answer = CompletionFormat(body, self.model_name, self.token_texts)
        params = self._choice_params(body, body.max_tokens, answer.top, num_prompts=len(prompts))
        job = Job(self, request, len(prompts) * len(params))
        await _start(job, body, lambda: self._prepare_text(prompts), params)
        return await _respond(answer, job)

    async def models(self, request: Request) -> Response:
        return json_response(ModelList(data=[self._model_card()]))

    async def model(self, request: Request) -> Response:
        self._check_model(request.path_params["model"])
        return json_response(self._model_card())

    async def health(self, request: Request) -> Response:
        if not self.engine.is_running:
            raise APIError(503, "the engine is not running", "server_error")
        return json_response(HealthStatus())

    async def prometheus(self, request: Request) -> Response:
        text = self.metrics.render(running=self.engine.num_requests - self.engine.num_waiting,
                                   waiting=self.admission.in_flight - (self.engine.num_requests - self.engine.num_waiting),
                                   kv_cache_usage=self.engine.kv_cache_usage,
                                   caches=self.llm.engine.cache_counters)
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
        if getattr(body, "echo", False) and logprobs is not None:  # the echoed prompt's tokens get logprobs too
            base = dataclasses.replace(base, prompt_logprobs=logprobs)
        return [dataclasses.replace(base, seed=seed) for seed in seeds]

    def _prepare_chat(self, messages: list[dict], tools: list[dict] | None) -> list[PreparedPrompt]:
        """Runs in a media worker thread: media checks, fetch, decode, template, tokens."""
        check_media(messages, self.processor.media_policy, self.limits)
        return [self.processor.prepare(messages, context_len=self.max_model_len, tools=tools)]

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


async def _start(job: Job, body, prepare, params: list[SamplingParams]) -> None:
    """`job.start`, an input error the engine raises (compiling a constraint) named as the request
    names its field (`response_format`, `tools`, `max_completion_tokens`)."""
    try:
        await job.start(prepare, params)
    except InputError as error:
        raise body.located(error) from None


async def _respond(answer: ChatFormat | CompletionFormat, job: Job) -> Response:
    """The whole response once the job has finished, or with `stream: true` its chunks as they come."""
    if answer.body.stream:
        return event_stream(answer.chunks(job), job)
    return json_response(answer.response(job, await job.finals()))


def _is_token_list(prompt) -> bool:
    return isinstance(prompt, list) and all(isinstance(token, int) for token in prompt)


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
        llm.engine.grammars.load()  # before serving: it holds the GIL for a second or more
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
                      openapi_extra=request_body(ChatCompletionRequest),
                      responses=responses(ChatCompletion, ChatCompletionChunk))
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
    app.mount("/static", StaticFiles(directory=PAGE_DIR), name="static")
    app.openapi = lambda: openapi_document(app, with_api_key=server.api_key is not None)
    return app


def serve(llm, *, model_name: str, host: str = "127.0.0.1", port: int = 8000, limits: ServerLimits | None = None,
          media: MediaAccess | None = None, api_key: str | None = None, log_level: str = "info",
          default_params: SamplingParams | None = None) -> None:
    """Run the server until interrupted (blocking)."""
    import uvicorn

    app = create_app(llm, model_name=model_name, limits=limits, media=media, api_key=api_key,
                     default_params=default_params)
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
