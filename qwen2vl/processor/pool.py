"""One thread pool for decoding and resizing media: PIL, PyAV and torch's resize release the GIL, so the
images of a message, or the conversations of a batch, are prepared side by side."""
from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch

T = TypeVar("T")
R = TypeVar("R")

_pool: ThreadPoolExecutor | None = None
_lock = threading.Lock()
_worker = threading.local()


def _executor() -> ThreadPoolExecutor:
    global _pool
    with _lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=os.cpu_count() or 1, thread_name_prefix="qwen2vl-media",
                                       initializer=_mark_worker)
        return _pool


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
    if len(items) < 2 or getattr(_worker, "active", False):
        return [fn(item) for item in items]
    futures = [_executor().submit(fn, item) for item in items]
    errors = [future.exception() for future in futures]
    for error in errors:
        if error is not None:
            raise error
    return [future.result() for future in futures]
