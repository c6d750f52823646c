"""JSON Lines read as bytes: only b"\\n" ends a line, and a line's length is bounded before it is read.

JSON text may hold U+2028, U+0085 and other characters that `str.splitlines` splits at, so a
file is split in bytes; and a line is read at most `max_line_bytes + 1` bytes at a time, so one
huge line costs its limit, not its size. Shared by `batch_job.read_conversations` (a job's input)
and `JobOutput` (its output, read back by `--resume`).
"""
from __future__ import annotations

import codecs
from collections.abc import Iterator
from typing import BinaryIO

from .errors import InputError

# A line of a conversations file (base64 media inline) longer than this is not read: parsing a line
# takes several times its size in memory. `qwen2vl generate --max-line-bytes`.
MAX_LINE_BYTES = 64 << 20
# JSON's whitespace; `str.strip()` also strips U+2028, U+0085 and others that JSON does not.
JSON_SPACE = " \t\r\n"


def jsonl_lines(file: BinaryIO, max_line_bytes: int | None = None) -> Iterator[tuple[int, bytes, bool]]:
    """`(number, line, whole)` for each line of a binary file, numbered from 1, b"\\n" kept. A line
    over `max_line_bytes` (its b"\\n" not counted) comes as its first `max_line_bytes + 1` bytes
    with `whole` False, its rest read and dropped a block at a time."""
    number, size = 0, -1 if max_line_bytes is None else max_line_bytes + 1
    while line := file.readline(size):
        number += 1
        whole = size < 0 or len(line) < size or line.endswith(b"\n")
        if not whole:
            while (rest := file.readline(1 << 20)) and not rest.endswith(b"\n"):
                pass
        yield number, line, whole


def utf8_text(line: bytes, where: str, complete: bool = True) -> str:
    """`line` as text, or an `InputError` saying where it is not UTF-8 (`complete` False: `line`
    may end inside a character, as the head of a line over the limit does)."""
    try:
        return codecs.getincrementaldecoder("utf-8")().decode(line, final=complete)
    except UnicodeDecodeError as error:
        raise InputError(f"{where}: not UTF-8 text (byte 0x{line[error.start]:02x} at column {error.start + 1}); "
                         "expected JSON Lines") from None
