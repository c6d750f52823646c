"""Drive an `LLMEngine` from asyncio: one thread steps the engine, each request reads its
outputs from its own asyncio queue.

The engine is not thread-safe, so only the engine thread touches it: the event loop hands it
requests and aborts through a command queue, and the thread hands back each step's outputs with
one `call_soon_threadsafe`. A step runs while the event loop keeps serving other clients
(torch releases the GIL in its kernels).
"""
from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from dataclasses import dataclass

from qwen2vl.engine.sequence import RequestOutput
from qwen2vl.errors import Qwen2VLError
from qwen2vl.processor.types import PreparedPrompt
from qwen2vl.sampling_params import SamplingParams

logger = logging.getLogger("qwen2vl.engine")


class EngineFailure(Qwen2VLError):
    """The engine failed on its own (a bug, or it was shut down): not the request's fault."""


class EngineStopped(EngineFailure):
    """The engine thread is not running (not started yet, or shut down)."""


class RequestCancelled(Qwen2VLError):
    """The request was aborted by its consumer (the client went away, or it timed out)."""


_ACCEPTED = object()  # marks "the engine took this request" in a batch of deliveries


@dataclass(frozen=True)
class _Add:
    request_id: str
    prompt: PreparedPrompt
    params: SamplingParams


@dataclass(frozen=True)
class _Abort:
    request_id: str


class RequestStream:
    """The outputs of one request, in order; iteration ends after the finished output.

    `abort()` stops the request in the engine (freeing its KV blocks) and wakes a consumer
    waiting on the stream with `RequestCancelled`.
    """

    def __init__(self, engine: AsyncEngine, request_id: str):
        self.request_id = request_id
        self.first_output = False  # whether any output has arrived yet
        self._engine = engine
        self._accepted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
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
        self._engine._submit(_Abort(self.request_id))
        self._queue.put_nowait(RequestCancelled(f"request {self.request_id} was aborted"))

    def _deliver(self, item: RequestOutput | BaseException) -> None:
        if isinstance(item, BaseException) and not self._accepted.done():
            self._accepted.set_exception(item)
            self._close()
            return
        if not self._done:
            self.first_output = True
            self._queue.put_nowait(item)

    def _close(self) -> None:
        self._done = True
        self._engine._streams.pop(self.request_id, None)


class AsyncEngine:
    """Serves an `LLMEngine` to many asyncio tasks at once.

    `start()` (inside the running event loop) starts the engine thread; `add_request` returns a
    `RequestStream`; `stop()` fails the requests still in flight and joins the thread.
    """

    def __init__(self, engine):
        self.engine = engine
        self.kv_cache_usage = 0.0  # fraction of KV blocks in use after the latest step
        self._streams: dict[str, RequestStream] = {}
        self._commands: deque[_Add | _Abort] = deque()
        self._wakeup = threading.Condition()
        self._stopping = False
        self._live: set[str] = set()  # requests the engine holds; touched by the engine thread only
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def num_requests(self) -> int:
        return len(self._streams)

    @property
    def num_waiting(self) -> int:
        """Requests that have not produced their first output yet."""
        return sum(not stream.first_output for stream in self._streams.values())

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="qwen2vl-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._wakeup:
            self._stopping = True
            self._wakeup.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        for stream in list(self._streams.values()):
            stream._deliver(EngineStopped("the server is shutting down"))

    async def add_request(self, prompt: PreparedPrompt, params: SamplingParams, request_id: str) -> RequestStream:
        """Hand a request to the engine thread; returns its stream once the engine took it.

        Raises what `LLMEngine.add_request` raised for it (`InputError` for a bad request).
        Call from the event loop thread.
        """
        if self._thread is None or not self._thread.is_alive():
            raise EngineStopped("the engine is not running")
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in flight")
        stream = RequestStream(self, request_id)
        self._streams[request_id] = stream
        self._submit(_Add(request_id, prompt, params))
        try:
            await asyncio.shield(stream._accepted)
        except asyncio.CancelledError:
            stream.abort()
            raise
        return stream

    def _submit(self, command: _Add | _Abort) -> None:
        with self._wakeup:
            self._commands.append(command)
            self._wakeup.notify()

    # --- the engine thread -----------------------------------------------------------------

    def _run(self) -> None:
        engine = self.engine
        while True:
            with self._wakeup:
                while not (self._commands or self._stopping or engine.has_unfinished()):
                    self._wakeup.wait()
                if self._stopping:
                    return
                commands = list(self._commands)
                self._commands.clear()
            delivered: list[tuple[str, RequestOutput | BaseException]] = []
            for command in commands:
                self._apply(command, delivered)
            if engine.has_unfinished():
                try:
                    for output in engine.step():
                        delivered.append((output.request_id, output))
                        if output.finished:
                            self._live.discard(output.request_id)
                except Exception as error:  # a bug in the engine: fail what it holds, keep serving
                    logger.exception("engine step failed; failing the requests in flight")
                    self._fail_all(error, delivered)
            self.kv_cache_usage = 1.0 - engine.num_free_blocks / max(engine.num_total_blocks, 1)
            if delivered:
                try:
                    self._loop.call_soon_threadsafe(self._dispatch, delivered)
                except RuntimeError:  # the event loop is closed: nobody is left to read outputs
                    return

    def _apply(self, command: _Add | _Abort, delivered: list) -> None:
        if isinstance(command, _Abort):
            if command.request_id in self._live:
                self._live.discard(command.request_id)
                try:
                    self.engine.abort(command.request_id)
                except Exception:
                    logger.exception("abort of %s failed", command.request_id)
            return
        try:
            self.engine.add_request(command.prompt, command.params, command.request_id)
            self._live.add(command.request_id)
            delivered.append((command.request_id, _ACCEPTED))
        except Exception as error:  # InputError for a bad request; anything else is ours
            if not isinstance(error, ValueError):
                logger.exception("add_request failed for %s", command.request_id)
            delivered.append((command.request_id, error))

    def _fail_all(self, error: Exception, delivered: list) -> None:
        failure = EngineFailure(f"the engine failed: {type(error).__name__}: {error}")
        for request_id in self._live:
            try:
                self.engine.abort(request_id)
            except Exception:
                logger.exception("abort of %s failed after an engine failure", request_id)
            delivered.append((request_id, failure))
        self._live.clear()

    def _dispatch(self, delivered: list[tuple[str, RequestOutput | BaseException | object]]) -> None:
        for request_id, item in delivered:
            stream = self._streams.get(request_id)
            if stream is None:
                continue
            if item is _ACCEPTED:
                if not stream._accepted.done():
                    stream._accepted.set_result(None)
            else:
                stream._deliver(item)
