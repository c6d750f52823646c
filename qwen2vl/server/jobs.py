"""One generation, from admission to close: admission, media preparation in a worker thread,
the engine streams of its choices merged into one, the disconnect and timeout watch, and the
server-sent-events response that closes it however it ends."""
from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing

from fastapi import Request
from fastapi.responses import StreamingResponse

from qwen2vl.engine.async_engine import RequestCancelled, RequestStream
from qwen2vl.engine.sequence import RequestOutput
from qwen2vl.processor.types import PreparedPrompt
from qwen2vl.sampling_params import SamplingParams
from qwen2vl.server.errors import APIError, ClientGone, api_error
from qwen2vl.server.state import ServerState


class Job:
    """The engine requests of one HTTP request (`n` choices per prompt), from admission to close."""

    def __init__(self, state: ServerState, request: Request, num_choices: int):
        self.state = state
        self.request = request
        self.request_id = request.state.request_id
        self.num_choices = num_choices
        self.arrival = time.monotonic()
        # Done when the request's time is up (the server's timer: asyncio.sleep, or a test's own).
        self.expired = asyncio.ensure_future(state.timer(state.limits.request_timeout_s))
        self.prompts: list[PreparedPrompt] = []
        self.streams: list[RequestStream] = []
        self._admitted = 0
        self._watcher: asyncio.Task | None = None
        self._timed_out = False
        self._num_finished = 0

    async def start(self, prepare: Callable[[], Awaitable[list[PreparedPrompt]]], params: list[SamplingParams],
                    cache_salt: str | None = None) -> None:
        """Admit, prepare the prompts (`prepare` does it in a worker thread) and hand
        `len(prompts) * len(params)` requests to the engine (choice `p * len(params) + i` is prompt p
        with params i), all under `cache_salt`."""
        state = self.state
        state.admission.acquire(self.num_choices)
        self._admitted = self.num_choices
        try:
            self.prompts = await self._in_time(prepare())
            for prompt in self.prompts:
                state.limits.check_prompt_length(len(prompt), state.max_model_len)
            requests = [(prompt, choice_params) for prompt in self.prompts for choice_params in params]
            added = await asyncio.gather(
                *(state.engine.add_request(prompt, choice_params, f"{self.request_id}-{index}", cache_salt)
                  for index, (prompt, choice_params) in enumerate(requests)),
                return_exceptions=True,
            )
            self.streams = [stream for stream in added if isinstance(stream, RequestStream)]
            failures = [error for error in added if isinstance(error, BaseException)]
            if failures:
                raise failures[0]
            state.metrics.prompt_tokens.inc(amount=sum(len(prompt) for prompt, _ in requests))
            self._watcher = asyncio.create_task(self._watch())
        except BaseException:
            self.close()
            raise

    @property
    def prompt_tokens(self) -> int:
        return sum(len(prompt) for prompt in self.prompts)

    def prompt_of(self, choice: int) -> PreparedPrompt:
        """The prompt choice `choice` answers (choices are grouped by prompt, `start`'s order)."""
        return self.prompts[choice // (len(self.streams) // len(self.prompts))]

    def cached_tokens(self, outputs: list[RequestOutput | None]) -> int:
        """Prompt tokens found in the prefix cache, each prompt counted once (by its first choice),
        as `prompt_tokens` counts them."""
        per_prompt = len(self.streams) // max(len(self.prompts), 1)
        firsts = outputs[::per_prompt] if per_prompt else []
        return sum(output.num_cached_tokens for output in firsts if output is not None)

    async def events(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        """(choice index, output) as the engine produces them, all choices interleaved."""
        try:
            async with aclosing(_merge(self.streams)) as merged:
                async for index, output in merged:
                    self._observe(output)
                    yield index, output
        except RequestCancelled:
            if self._timed_out:
                raise APIError(504, f"the request ran past the server's limit of {self.state.limits.request_timeout_s:g} s",
                               "timeout_error", code="request_timeout") from None
            raise ClientGone() from None

    def _observe(self, output: RequestOutput) -> None:
        metrics, now = self.state.metrics, time.monotonic()
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
        """Each choice's last output, once all have finished; the job is closed after."""
        try:
            last: list[RequestOutput | None] = [None] * len(self.streams)
            async for index, output in self.events():
                last[index] = output
            return last
        finally:
            self.close()

    def close(self) -> None:
        """Abort what is still running (freeing its KV blocks), count it under finish reason
        "abort" (the client left, or the request timed out), and give back the admission."""
        self.expired.cancel()
        if self._watcher is not None:
            self._watcher.cancel()
            self._watcher = None
            unfinished = len(self.streams) - self._num_finished
            if unfinished:
                self.state.metrics.finished.inc("abort", amount=unfinished)
        for stream in self.streams:
            stream.abort()
        self.state.admission.release(self._admitted)
        self._admitted = 0

    async def _in_time(self, awaitable):
        work = asyncio.ensure_future(awaitable)
        if not await _before(work, self.expired):
            raise APIError(504, f"preparing the request ran past the server's limit of "
                                f"{self.state.limits.request_timeout_s:g} s", "timeout_error",
                           code="request_timeout")
        return work.result()

    async def _watch(self) -> None:
        disconnected = asyncio.ensure_future(_until_disconnected(self.request.receive))
        if not await _before(disconnected, self.expired):
            self._timed_out = True
        for stream in self.streams:
            stream.abort()


async def _before(work: asyncio.Future, expired: asyncio.Future) -> bool:
    """Wait for `work` or `expired`, whichever comes first: True if `work` finished in time (it
    is cancelled otherwise, and if the waiting itself is cancelled)."""
    try:
        await asyncio.wait((work, expired), return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not work.done():
            work.cancel()
    return work.done() and not work.cancelled()


async def _until_disconnected(receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


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


def openai_error_event(error: APIError) -> str:
    return f"data: {json.dumps(error.body())}\n\n"


def event_stream(events: AsyncIterator[str], job: Job, error_event: Callable[[APIError], str] = openai_error_event,
                 end: str = "data: [DONE]\n\n") -> StreamingResponse:
    """Server-sent events, then `end`; an error after the headers went out becomes an error event
    (`error_event`: the protocol's)."""

    async def stream():
        try:
            async for event in events:
                yield event
            yield end
        except ClientGone:
            return
        except Exception as error:  # noqa: BLE001 - the status line is gone; report in the stream
            yield error_event(api_error(error, job.request_id))
            yield end

    return _EventStream(stream(), job)


class _EventStream(StreamingResponse):
    """Closes its job however the response ends, even if it never got to start streaming."""

    def __init__(self, events: AsyncIterator[str], job: Job):
        super().__init__(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache",
                                                                           "X-Accel-Buffering": "no"})
        self.job = job

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.job.close()
