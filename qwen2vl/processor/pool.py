"""One thread pool for decoding and resizing media: PIL, PyAV and torch's resize release the GIL, so the
images of a message, or the conversations of a batch, are prepared side by side, and a large image's
resize runs in bands on it.

Callers share it fairly: a free worker takes the next item of the `media_map` call that has the fewest
items running (the earliest call among equals), so a lone call uses every worker and concurrent calls
(the requests of a server) interleave instead of one's images queueing behind all of another's.

Its size is the machine's core count, or `QWEN2VL_MEDIA_THREADS` (1: everything in the calling thread,
in order).
"""
from __future__ import annotations

import os
import threading
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import TypeVar

import torch

T = TypeVar("T")
R = TypeVar("R")

_pool: ThreadPoolExecutor | None = None
_lock = threading.Lock()
_worker = threading.local()
_calls: list[_Call] = []  # the media_map calls with items not yet started, in arrival order (under _lock)


def pool_size() -> int:
    setting = os.environ.get("QWEN2VL_MEDIA_THREADS", "").strip()
    if not setting:
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if not setting.isdigit() or int(setting) < 1:
        raise ValueError(f"QWEN2VL_MEDIA_THREADS must be a positive integer, got {setting!r}")
    return int(setting)


def _executor() -> ThreadPoolExecutor:
    global _pool
    with _lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=pool_size(), thread_name_prefix="qwen2vl-media",
                                       initializer=_mark_worker)
        return _pool


def media_workers() -> int:
    """How many of `media_map`'s items run side by side when called here: the pool's size, or 1
    inside a pool worker (where it runs them in order)."""
    return 1 if getattr(_worker, "active", False) else pool_size()


def _mark_worker() -> None:
    _worker.active = True
    # The pool is the parallelism: torch's own threads (per calling thread) in each worker would
    # oversubscribe the cores; on the busy 2-core machine a resize then ran 10-20x slower.
    torch.set_num_threads(1)


def media_map(fn: Callable[[T], R], items: Iterable[T]) -> list[R]:
    """`[fn(item) for item in items]`, run in the media pool; the first failure (in `items`' order) is
    raised once all have ended. Inside a pool worker (a conversation of a batch preparing its
    images) it runs in the caller's thread, so nested calls cannot wait on each other."""
    items = list(items)
    if len(items) < 2 or media_workers() < 2:
        return [fn(item) for item in items]
    call = _Call(fn, items)
    executor = _executor()
    with _lock:
        _calls.append(call)
    try:
        for _ in items:  # one turn per item; which call's item a turn runs is decided when it starts
            executor.submit(_take_turn)
    except RuntimeError:  # the interpreter is exiting: no more turns, so none may wait for this call's items
        with _lock:
            if call in _calls:
                _calls.remove(call)
        raise
    wait(call.futures)
    errors = [future.exception() for future in call.futures]
    for error in errors:
        if error is not None:
            raise error
    return [future.result() for future in call.futures]


class _Call:
    """One `media_map` call's items: those not yet started, and how many of its items are running."""

    def __init__(self, fn: Callable, items: list):
        self.fn = fn
        self.futures = [Future() for _ in items]
        self.waiting = deque(zip(self.futures, items))
        self.running = 0


def _take_turn() -> None:
    """Run the next item of the call with the fewest items running. A call queues one turn per item
    once its items are listed, so every turn finds an item and every item runs, exactly once."""
    with _lock:
        if not _calls:  # a call withdrawn as the interpreter exits left its turns behind
            return
        call = min(_calls, key=lambda c: c.running)  # min keeps the first of equals: arrival order
        future, item = call.waiting.popleft()
        call.running += 1
        if not call.waiting:
            _calls.remove(call)
    try:
        future.set_result(call.fn(item))
    except BaseException as error:  # noqa: BLE001 - handed to the caller, as the executor's own futures do
        future.set_exception(error)
    finally:
        with _lock:
            call.running -= 1
