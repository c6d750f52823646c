"""Progress on standard error: one line redrawn in place on a terminal, plain lines in a log.

On a terminal (the stream's `isatty()`), `ProgressLine.update` redraws one line (carriage return,
clear to the end of the line) at most every `TTY_EVERY_S`; elsewhere (a pipe, a file, a CI
log) it writes a whole newline-ended line at most every `LOG_EVERY_S`, so a log holds a few
readable lines and never a carriage return. `finish` writes the summary once. `note` writes a
message on a line of its own (clearing a drawn line first), the next update draws below it.
The clock and `isatty` can be given, for tests.
"""
from __future__ import annotations

import sys
import time
from collections.abc import Callable

TTY_EVERY_S = 0.1
LOG_EVERY_S = 10.0
BAR_WIDTH = 20
_CLEAR = "\r\x1b[K"

_active: ProgressLine | None = None  # the line drawn now, which `note` clears first


class ProgressLine:
    def __init__(self, stream=None, *, isatty: bool | None = None, every_s: float | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.stream = stream if stream is not None else sys.stderr
        self.tty = _isatty(self.stream) if isatty is None else isatty
        self.every_s = every_s if every_s is not None else (TTY_EVERY_S if self.tty else LOG_EVERY_S)
        self.clock = clock
        self.start = self._shown = clock()
        self._drawn = self._finished = False

    def elapsed(self) -> float:
        return self.clock() - self.start

    def update(self, text: str, done: int | None = None, total: int | None = None) -> None:
        """Show `text` (with a bar of `done`/`total` on a terminal) if `every_s` has passed since
        the last one; a log gets no line at the very end (`done == total`): the summary follows."""
        global _active
        now = self.clock()
        if self._finished or now - self._shown < self.every_s:
            return
        self._shown = now
        if self.tty:
            self.stream.write(f"{_CLEAR}{bar(done, total)}{text}")
            self._drawn, _active = True, self
        elif done is None or done != total:
            self.stream.write(text + "\n")
        self.stream.flush()

    def finish(self, summary: str) -> None:
        """The summary on its own line, once (a drawn progress line is replaced by it)."""
        if self._finished:
            return
        self._finished = True
        self._clear()
        self.stream.write(summary + "\n")
        self.stream.flush()

    def close(self) -> None:
        """Done without a summary: a drawn line is cleared, later updates show nothing."""
        self._finished = True
        self._clear()

    def _clear(self) -> None:
        global _active
        if self._drawn:
            self.stream.write(_CLEAR)
            self._drawn = False
        if _active is self:
            _active = None


def note(text: str, stream=None) -> None:
    """`text` on a line of its own on standard error (or `stream`: a job's rows to standard
    output), below any progress line drawn on the same terminal."""
    stream = stream if stream is not None else sys.stderr
    if _active is not None and _isatty(stream):
        _active._clear()
    stream.write(text + "\n")
    stream.flush()


def bar(done: int | None, total: int | None) -> str:
    """tqdm's look: ` 45%|#########           | ` (nothing when the total is not known)."""
    if done is None or not total:
        return ""
    filled = min(done * BAR_WIDTH // total, BAR_WIDTH)
    return f"{100 * done // total:3d}%|{'#' * filled}{' ' * (BAR_WIDTH - filled)}| "


def _isatty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False
