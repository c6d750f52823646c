"""The one driver of an `LLMEngine`'s steps, shared by every consumer of that engine.

The engine is not thread-safe, and a step returns the outputs of every request in it: if two
loops stepped one engine, each would consume the other's outputs. So one thread steps it, while
it has requests, and hands each output to the consumer of its request: a blocking `chat`, a
stream being iterated, the server's asyncio streams, from any thread, in any mix. Requests and
aborts reach the thread through a command queue and are applied between steps.
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass

from qwen2vl.engine.sequence import RequestOutput
from qwen2vl.errors import Qwen2VLError
from qwen2vl.processor.types import PreparedPrompt
from qwen2vl.sampling_params import SamplingParams

logger = logging.getLogger("qwen2vl.engine")

# What a consumer is handed, on the driver thread: each output of its request in order (the last
# one `finished`), or the error that ended it. It must not block.
Sink = Callable[[RequestOutput | BaseException], None]


class EngineFailure(Qwen2VLError):
    """The engine failed on its own (a bug, or it was shut down): not the request's fault."""


@dataclass(frozen=True)
class NewRequest:
    prompt: PreparedPrompt
    params: SamplingParams | None
    request_id: str | None = None


@dataclass(frozen=True)
class _Add:
    requests: list[NewRequest]
    sink: Sink
    accepted: Future  # -> one request id or exception per request


@dataclass(frozen=True)
class _Abort:
    request_id: str
    done: Future


class EngineDriver:
    """Steps `engine` on a thread of its own while it has requests (the thread ends when the
    engine is idle and starts again with the next request).

    `submit` hands requests over and returns a future of their ids (or of the `InputError` that
    refused each); their outputs then go to `sink`. `abort` stops a request, freeing its blocks,
    once the current step is done. If a step raises, every request in the engine ends with an
    `EngineFailure` and the driver goes on with the next ones.
    """

    def __init__(self, engine):
        self.engine = engine
        self._lock = threading.Lock()
        self._commands: list[_Add | _Abort] = []
        self._thread: threading.Thread | None = None
        self._sinks: dict[str, Sink] = {}  # the requests in the engine; touched by the driver thread only

    @property
    def kv_cache_usage(self) -> float:
        """The fraction of KV blocks in use."""
        return 1.0 - self.engine.num_free_blocks / max(self.engine.num_total_blocks, 1)

    def submit(self, requests: list[NewRequest], sink: Sink) -> Future:
        accepted: Future = Future()
        self._command(_Add(list(requests), sink, accepted))
        return accepted

    def abort(self, request_id: str) -> Future:
        """A future that is done when the request was aborted (or had already ended)."""
        done: Future = Future()
        self._command(_Abort(request_id, done))
        return done

    def _command(self, command: _Add | _Abort) -> None:
        with self._lock:
            self._commands.append(command)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="qwen2vl-engine", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        engine = self.engine
        while True:
            with self._lock:
                commands, self._commands = self._commands, []
                if not commands and not engine.has_unfinished():
                    self._thread = None
                    return
            for command in commands:
                self._apply(command)
            if not engine.has_unfinished():
                continue
            try:
                outputs = engine.step()
            except Exception as error:  # a bug in the engine: fail what it holds, keep serving
                logger.exception("engine step failed; failing the requests in flight")
                self._fail_all(error)
                continue
            for output in outputs:
                sink = self._sinks.pop(output.request_id) if output.finished else self._sinks.get(output.request_id)
                if sink is not None:
                    _hand(sink, output)

    def _apply(self, command: _Add | _Abort) -> None:
        if isinstance(command, _Abort):
            sink = self._sinks.pop(command.request_id, None)
            if sink is not None:
                try:
                    output = self.engine.abort(command.request_id)
                    if output is not None:
                        _hand(sink, output)
                except Exception:
                    logger.exception("abort of %s failed", command.request_id)
            command.done.set_result(None)
            return
        results = []
        for request in command.requests:
            try:
                request_id = self.engine.add_request(request.prompt, request.params, request.request_id)
                self._sinks[request_id] = command.sink
                results.append(request_id)
            except Exception as error:  # InputError for a bad request; anything else is ours
                if not isinstance(error, ValueError):
                    logger.exception("add_request failed")
                results.append(error)
        command.accepted.set_result(results)

    def _fail_all(self, error: Exception) -> None:
        failure = EngineFailure(f"the engine failed: {type(error).__name__}: {error}")
        failure.__cause__ = error
        sinks, self._sinks = self._sinks, {}
        for request_id, sink in sinks.items():
            try:
                self.engine.abort(request_id)
            except Exception:
                logger.exception("abort of %s failed after an engine failure", request_id)
            _hand(sink, failure)


def _hand(sink: Sink, item: RequestOutput | BaseException) -> None:
    """A consumer's failure is its own: the driver goes on."""
    try:
        sink(item)
    except Exception:
        logger.exception("a consumer of engine outputs failed")
