"""An `EngineDriver` for asyncio: each request's outputs arrive on its own asyncio queue.

The driver's background thread steps the engine and hands each output to the event loop with
`call_soon_threadsafe`; a step runs while the event loop keeps serving other clients (torch
releases the GIL in its kernels).
"""
from __future__ import annotations

import asyncio

from qwen2vl.engine.driver import EngineDriver, EngineFailure, NewRequest
from qwen2vl.engine.sequence import RequestOutput
from qwen2vl.errors import Qwen2VLError
from qwen2vl.processor.types import PreparedPrompt
from qwen2vl.sampling_params import SamplingParams

__all__ = ["AsyncEngine", "EngineFailure", "EngineStopped", "RequestCancelled", "RequestStream"]


class EngineStopped(EngineFailure):
    """The server's engine is not running (not started yet, or shut down)."""


class RequestCancelled(Qwen2VLError):
    """The request was aborted by its consumer (the client went away, or it timed out)."""


class RequestStream:
    """The outputs of one request, in order; iteration ends after the finished output.

    `abort()` stops the request in the engine (freeing its KV blocks) and wakes a consumer
    waiting on the stream with `RequestCancelled`.
    """

    def __init__(self, engine: AsyncEngine, request_id: str):
        self.request_id = request_id
        self.first_output = False  # whether any output has arrived yet
        self._engine = engine
        self._queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self._done = False

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self._done and self._queue.empty():
            raise StopAsyncIteration
        item = await self._queue.get()
        if isinstance(item, BaseException):
            self._close()
            raise item
        if item.finished:
            self._close()
        return item

    def abort(self) -> None:
        if self._done:
            return
        self._close()
        self._engine.driver.abort(self.request_id)
        self._queue.put_nowait(RequestCancelled(f"request {self.request_id} was aborted"))

    def _deliver(self, item: RequestOutput | BaseException) -> None:
        if not self._done:
            self.first_output = True
            self._queue.put_nowait(item)

    def _close(self) -> None:
        self._done = True
        self._engine._streams.pop(self.request_id, None)


class AsyncEngine:
    """Serves an `EngineDriver`'s engine to many asyncio tasks at once.

    `start()` (inside the running event loop) opens it; `add_request` returns a `RequestStream`;
    `stop()` fails the requests still in flight. The driver goes on serving its other consumers.
    """

    def __init__(self, driver: EngineDriver):
        self.driver = driver
        self._streams: dict[str, RequestStream] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def is_running(self) -> bool:
        return self._loop is not None

    @property
    def kv_cache_usage(self) -> float:
        return self.driver.kv_cache_usage

    @property
    def num_requests(self) -> int:
        return len(self._streams)

    @property
    def num_waiting(self) -> int:
        """Requests that have not produced their first output yet."""
        return sum(not stream.first_output for stream in self._streams.values())

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()

    def stop(self) -> None:
        self._loop = None
        for stream in list(self._streams.values()):
            stream._deliver(EngineStopped("the server is shutting down"))
            stream.abort()

    async def add_request(self, prompt: PreparedPrompt, params: SamplingParams, request_id: str,
                          cache_salt: str | None = None) -> RequestStream:
        """Hand a request to the engine; returns its stream once the engine took it.

        Raises what `LLMEngine.add_request` raised for it (`InputError` for a bad request).
        Call from the event loop thread.
        """
        if self._loop is None:
            raise EngineStopped("the engine is not running")
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in flight")
        stream = RequestStream(self, request_id)
        self._streams[request_id] = stream
        loop = self._loop

        def deliver(item: RequestOutput | BaseException) -> None:
            try:
                loop.call_soon_threadsafe(stream._deliver, item)
            except RuntimeError:  # the event loop is closed: nobody is left to read outputs
                pass

        accepted = self.driver.submit([NewRequest(prompt, params, request_id, cache_salt)], deliver, background=True)
        try:
            [result] = await asyncio.shield(asyncio.wrap_future(accepted))
        except asyncio.CancelledError:
            stream.abort()
            raise
        if isinstance(result, BaseException):
            stream._close()
            raise result
        return stream
