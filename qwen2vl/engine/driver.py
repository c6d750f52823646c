"""The one driver of an `LLMEngine`'s steps, shared by every consumer of that engine.

The engine is not thread-safe, and a step returns the outputs of every request in it: if two
loops stepped one engine, each would consume the other's outputs. So the driver steps it for
everyone and hands each output to the consumer of its request (its `Sink`): a blocking `chat`, a
stream being iterated, the server's asyncio streams, from any thread, in any mix. Requests and
aborts are queued as commands and applied between steps.

Who steps: a thread that waits for an output `pump`s, stepping the engine itself while no other
thread does (so the CPU path runs its kernels on the caller's thread, as a plain loop would:
glibc gives a new thread its own malloc arena, whose trimming costs ~35% of a CPU decode step);
consumers that cannot wait (asyncio) have a background thread step while they have requests.

Aborts are only marked (`abort` never steps and never waits), so they are safe from a finalizer
that the garbage collector runs in the middle of a step, on the stepping thread itself: an
abandoned stream's cleanup. The thread that holds the engine applies them between steps.
"""
from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass

from qwen2vl.engine.sequence import RequestOutput
from qwen2vl.errors import Qwen2VLError
from qwen2vl.processor.types import PreparedPrompt
from qwen2vl.sampling_params import SamplingParams

logger = logging.getLogger("qwen2vl.engine")

# What a consumer is handed, on the stepping thread: each output of its request in order (the last
# one `finished`), or the error that ended it. It must not block.
Sink = Callable[[RequestOutput | BaseException], None]


class EngineFailure(Qwen2VLError):
    """The engine failed on its own (a bug, or it was shut down): not the request's fault."""


@dataclass(frozen=True)
class NewRequest:
    prompt: PreparedPrompt
    params: SamplingParams | None
    request_id: str | None = None
    cache_salt: str | None = None


@dataclass(frozen=True)
class _Add:
    requests: list[NewRequest]
    sink: Sink
    background: bool  # its consumer does not pump: the background thread steps for it
    accepted: Future  # -> one request id or exception per request
    compiles: list[Future | None]  # per request, its constraint's compile (done when this is applied)


@dataclass(frozen=True)
class _Abort:
    request_id: str


class EngineDriver:
    """Steps `engine` for all its consumers.

    `submit` queues requests and returns a future of their ids (or of the `InputError` that
    refused each); their outputs then go to `sink`. `abort` stops a request, freeing its blocks,
    before the next step. Consumers that wait call `pump(done)`; with `background=True` a thread
    of the driver's steps while those requests live. If a step raises, every request in the
    engine ends with an `EngineFailure` and the driver goes on with the next ones. If a step is
    interrupted (KeyboardInterrupt), the interrupt reaches the thread that stepped, the engine
    restarts its requests, and those it lost on the way end with an `EngineFailure`.
    """

    def __init__(self, engine):
        self.engine = engine
        self._cond = threading.Condition()  # guards the fields below; notified after each step
        self._commands: list[_Add | _Abort] = []
        self._marked: queue.SimpleQueue[str] = queue.SimpleQueue()  # aborts not queued as commands yet
        self._stepping = False  # a thread holds the engine
        self._background: threading.Thread | None = None
        self._background_requests: set[str] = set()
        self._compiling: set[str] = set()  # ids of requests held back until their constraint compiles
        # Touched by the stepping thread only.
        self._sinks: dict[str, Sink] = {}
        self._aborted_early: set[str] = set()

    @property
    def kv_cache_usage(self) -> float:
        """The fraction of KV blocks in use."""
        return 1.0 - self.engine.num_free_blocks / max(self.engine.num_total_blocks, 1)

    def submit(self, requests: list[NewRequest], sink: Sink, background: bool = False) -> Future:
        """Their constraints are compiled first, off the stepping thread: the other requests'
        steps go on meanwhile."""
        accepted: Future = Future()
        compiles = [self.engine.compile_constraint(request.params) for request in requests]
        add = _Add(list(requests), sink, background, accepted, compiles)
        with self._cond:
            self._compiling |= {request.request_id for request in requests if request.request_id is not None}
        _when_all_done([future for future in compiles if future is not None], lambda: self._command(add))
        return accepted

    def abort(self, request_id: str) -> None:
        """Mark the request aborted (if it has not ended). Safe from any thread, a finalizer
        included: it never waits. It is applied at once if no thread holds the engine, else by
        the thread that does, before its next step."""
        self._marked.put(request_id)  # SimpleQueue.put is reentrant: safe inside a step's garbage collection
        if self._cond.acquire(blocking=False):
            try:
                self._abort_marked_if_idle()
            finally:
                self._cond.release()

    def _abort_marked_if_idle(self) -> None:
        """(With the lock held.) Apply the marked aborts now if no thread holds the engine and
        no command queued before them waits (an abort must not pass its request's add)."""
        if self._stepping or self._commands:
            return
        self._stepping = True  # a finalizer run while applying them only marks its abort
        try:
            while (command := self._next_command()) is not None:
                self._apply(command)
        finally:
            self._stepping = False

    def _command(self, command: _Add | _Abort) -> None:
        with self._cond:
            self._commands.append(command)
            wants_background = isinstance(command, _Add) and command.background
            if self._background is None and (self._background_requests or wants_background):
                self._background = threading.Thread(target=self.pump, args=(self._background_done,),
                                                    name="qwen2vl-engine", daemon=True)
                self._background.start()
            self._cond.notify_all()

    def _background_done(self) -> bool:
        """(With the lock held.) The background thread ends when no request needs it."""
        if self._commands or self._background_requests:
            return False
        if self._background is threading.current_thread():
            self._background = None
        return True

    def pump(self, done: Callable[[], bool]) -> None:
        """Step the engine on this thread until `done()` (checked with the driver's lock held);
        while another thread steps, wait for its steps instead."""
        while True:
            with self._cond:
                while not done() and (self._stepping or not (self._commands or not self._marked.empty()
                                                             or self.engine.has_unfinished())):
                    self._cond.wait(timeout=None if self._stepping else 0.1)
                if done():
                    return
                self._stepping = True
            try:
                self._step()
            finally:
                with self._cond:
                    self._stepping = False
                    self._abort_marked_if_idle()  # those marked during the step
                    self._cond.notify_all()

    def _next_command(self) -> _Add | _Abort | None:
        """The oldest command; marked aborts join the queue behind the commands already in it.
        Taken one at a time, so that an interrupt loses none of the others."""
        with self._cond:
            while True:
                try:
                    self._commands.append(_Abort(self._marked.get_nowait()))
                except queue.Empty:
                    break
            return self._commands.pop(0) if self._commands else None

    def _step(self) -> None:
        while (command := self._next_command()) is not None:
            self._apply(command)
        if not self.engine.has_unfinished():
            return
        try:
            outputs = self.engine.step()
        except Exception as error:  # a bug in the engine: fail what it holds, keep serving
            logger.exception("engine step failed; failing the requests in flight")
            self._fail_all(error)
            return
        except BaseException:  # KeyboardInterrupt: the engine restarted its requests; it may have lost some
            self._fail_lost()
            raise
        deliveries = []
        for output in outputs:
            if output.finished:
                self._forget(output.request_id)
                sink = self._sinks.pop(output.request_id, None)
            else:
                sink = self._sinks.get(output.request_id)
            if sink is not None:
                deliveries.append((sink, output))
        _hand_all(deliveries)

    def _apply(self, command: _Add | _Abort) -> None:
        if isinstance(command, _Abort):
            with self._cond:
                if command.request_id in self._compiling:  # aborted before it was added: it never will be
                    self._compiling.discard(command.request_id)
                    self._aborted_early.add(command.request_id)
            sink = self._sinks.pop(command.request_id, None)
            self._forget(command.request_id)
            if sink is not None:
                try:
                    output = self.engine.abort(command.request_id)
                    if output is not None:
                        _hand(sink, output)
                except Exception:
                    logger.exception("abort of %s failed", command.request_id)
            return
        results = []
        try:
            for request, compiled in zip(command.requests, command.compiles):
                results.append(self._add(request, compiled, command))
        finally:  # interrupted, the requests not added yet are refused: the consumer is answered either way
            interrupted = EngineFailure("the request was not added: the engine's thread was interrupted")
            command.accepted.set_result(results + [interrupted] * (len(command.requests) - len(results)))

    def _add(self, request: NewRequest, compiled: Future | None, command: _Add) -> str | BaseException:
        """The new request's id, or the error that refused it."""
        with self._cond:
            self._compiling.discard(request.request_id)
        if request.request_id in self._aborted_early:
            self._aborted_early.discard(request.request_id)
            return Qwen2VLError(f"request {request.request_id} was aborted before it started")
        if compiled is not None and compiled.exception() is not None:  # refused: not compiled again here
            return compiled.exception()
        try:
            request_id = self.engine.add_request(request.prompt, request.params, request.request_id,
                                                 cache_salt=request.cache_salt)
        except Exception as error:  # InputError for a bad request; anything else is ours
            if not isinstance(error, ValueError):
                logger.exception("add_request failed")
            return error
        self._sinks[request_id] = command.sink
        if command.background:
            with self._cond:
                self._background_requests.add(request_id)
        return request_id

    def _forget(self, request_id: str) -> None:
        with self._cond:
            self._background_requests.discard(request_id)

    def _fail_all(self, error: Exception) -> None:
        failure = EngineFailure(f"the engine failed: {type(error).__name__}: {error}")
        failure.__cause__ = error
        sinks, self._sinks = self._sinks, {}
        for request_id, sink in sinks.items():
            self._forget(request_id)
            try:
                self.engine.abort(request_id)
            except Exception:
                logger.exception("abort of %s failed after an engine failure", request_id)
            _hand(sink, failure)

    def _fail_lost(self) -> None:
        """After an interrupted step: the requests the engine no longer holds lost their final
        output on the way; their consumers get a failure instead of waiting for ever."""
        lost = [request_id for request_id in self._sinks if not self.engine.has_request(request_id)]
        failure = EngineFailure("the engine's step was interrupted before this request's last output")
        for request_id in lost:
            self._forget(request_id)
            _hand(self._sinks.pop(request_id), failure)


def _hand_all(deliveries: list[tuple[Sink, RequestOutput]]) -> None:
    """Hand each output to its consumer; if an interrupt stops the handing, the rest are still
    handed (a consumer must not wait for ever for an output the engine already gave up)."""
    rest = iter(deliveries)
    try:
        for sink, output in rest:
            _hand(sink, output)
    finally:
        for sink, output in rest:
            _hand(sink, output)


def _when_all_done(futures: list[Future], then: Callable[[], None]) -> None:
    """`then()` once every future is done (at once if none), on the thread that completes the last."""
    left = [len(futures)]
    lock = threading.Lock()

    def one_done(_) -> None:
        with lock:
            left[0] -= 1
            last = left[0] == 0
        if last:
            then()

    if not futures:
        then()
    for future in futures:
        future.add_done_callback(one_done)


def _hand(sink: Sink, item: RequestOutput | BaseException) -> None:
    """A consumer's failure is its own: the driver goes on."""
    try:
        sink(item)
    except Exception:
        logger.exception("a consumer of engine outputs failed")
