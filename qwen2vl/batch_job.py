"""The generate job: every row of a set of conversations answered once, a bad row as an error row.

`qwen2vl generate` runs it in one process on the conversations `read_conversations` reads;
`qwen2vl.distributed` runs `answer_rows` in each replica of a Ray actor pool and writes through
the same `JobOutput`.

An input row is `{"id", "messages"}`, or `{"id", "prompt"}` with the prompt (or the `InputError`
of preparing it) made ahead by `prepare_row`. An output row is
`{"id", "text", "finish_reason", "usage": {"prompt_tokens", "completion_tokens"}}`, or
`{"id", "error": {"type", "message"}}` for a row whose media or prompt is bad.
"""
from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import InputError, Qwen2VLError
from .jsonl import JSON_SPACE, MAX_LINE_BYTES, jsonl_lines, utf8_text
from .processor.fetch import relative_to
from .processor.pool import media_map
from .progress import ProgressLine, note


def id_key(row_id) -> str:
    """A row id as a set member: 7 and "7" stay different ids, as in the JSON."""
    return json.dumps(row_id, sort_keys=True)


# The start of an object line whose "id" comes first: a line over the limit is named by that id.
_LEADING_ID = re.compile(r'[ \t\r]*\{[ \t\r]*"id"[ \t\r]*:[ \t\r]*')


def read_conversations(path: str | Path, max_line_bytes: int | None = None) -> list[dict]:
    """A JSONL file of conversations (`-`: standard input), each line an object with 'id' and
    'messages' (or a bare list of messages, which has no id). Returns `conversation_row`'s
    `{"id", "messages", "line"}` per line (other fields are not read); `line` counts from 1, as
    errors name it, and relative media paths are joined onto the file's folder (standard input's
    stay relative to the current one). A record with an "error" (an `InputError`) cannot run: a
    line without an id (`named_by_line`), a line over `max_line_bytes`, not read (`{"id", "line",
    "error"}`, its id if the line starts with it, else named by its line), or messages that are
    not text. A line that is not JSON (or not UTF-8) raises an `InputError`: the file is not what
    was meant."""
    if str(path) == "-":
        return _read_conversations(sys.stdin.buffer, "stdin", None, max_line_bytes)
    with open(path, "rb") as file:
        return _read_conversations(file, str(path), Path(path).absolute().parent, max_line_bytes)


def _read_conversations(file, name: str, folder: Path | None, max_line_bytes: int | None) -> list[dict]:
    records = []
    for number, line, whole in jsonl_lines(file, max_line_bytes):
        where = f"{name}: line {number}"
        text = utf8_text(line, where, complete=whole)
        if number == 1:
            text = text.removeprefix("\ufeff")
        if not whole:
            records.append(_unread_record(text, number, where, max_line_bytes))
        elif text.strip(JSON_SPACE):
            records.append(_conversation(text, number, where, folder))
    return named_by_line(records)


def _conversation(text: str, number: int, where: str, folder: Path | None) -> dict:
    try:
        record = json.loads(text)
    except json.JSONDecodeError as error:
        raise InputError(f"{where}: not JSON ({error.msg} at column {error.colno})") from None
    except (ValueError, RecursionError) as error:  # a number over Python's digit limit; nesting too deep
        raise InputError(f"{where}: not JSON this reader takes ({error})") from None
    try:
        conversation = conversation_row(record, number, folder)
    except InputError as error:
        raise InputError(f"{where}: {error}") from None
    if "error" not in conversation and "\\u" in text and (error := _lone_surrogate(conversation["messages"])):
        conversation["error"] = error
    return conversation


def conversation_row(record, line: int, folder: str | os.PathLike | None = None) -> dict:
    """A parsed JSONL line as a job's row `{"id", "messages", "line"}`, the one rule of `generate`
    with and without --ray: relative media paths joined onto `folder` (None: as they are); a line
    without an id (or with a null one) is a row that cannot run, `"error"` saying so, its id None
    until `named_by_line` names it. Raises an `InputError` for a line that is not a conversation."""
    if isinstance(record, list):
        record = {"messages": record}
    if not isinstance(record, dict) or not isinstance(record.get("messages"), list):
        raise InputError("expected an object with 'id' and 'messages' (a list of messages)")
    messages = record["messages"] if folder is None else _media_relative_to(record["messages"], folder)
    if record.get("id") is None:
        error = InputError("the row has no 'id' (every row needs one, unique in the input); its line number "
                           "stands in", field="id")
        return {"id": None, "messages": messages, "line": line, "error": error}
    return {"id": record["id"], "messages": messages, "line": line}


def named_by_line(rows: list[dict]) -> list[dict]:
    """Each row without an id (None) named by its line number: as a string where other rows'
    ids are strings, so that the ids stay of one type (an Arrow or Parquet column)."""
    as_text = any(isinstance(row["id"], str) for row in rows)
    for row in rows:
        if row["id"] is None:
            row["id"] = str(row["line"]) if as_text else row["line"]
    return rows


def _media_relative_to(messages: list, folder: str | os.PathLike) -> list:
    """`messages` with each relative media path of a content part (`image`, `image_url`, `video`,
    a video's frame list) joined onto `folder`; everything else as it is."""
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        for part in content if isinstance(content, list) else []:
            for key in ("image", "image_url", "video") if isinstance(part, dict) else ():
                value = part.get(key)
                if isinstance(value, str):
                    part[key] = relative_to(value, folder)
                elif isinstance(value, list):
                    part[key] = [relative_to(item, folder) if isinstance(item, str) else item for item in value]
    return messages


def _lone_surrogate(messages: list) -> InputError | None:
    """The error of messages holding a lone `\\uD800`-`\\uDFFF` escape, which JSON parses and no
    tokenizer takes."""
    try:
        json.dumps(messages, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as error:
        return InputError(f"messages: the escape \\u{ord(error.object[error.start]):04x} is half of a UTF-16 "
                          "surrogate pair, not a character", field="messages")
    return None


def _unread_record(head: str, number: int, where: str, max_line_bytes: int) -> dict:
    """The record of a line over the limit, from its first bytes `head` (which must start JSON)."""
    if not head.lstrip(JSON_SPACE).startswith(("{", "[")):
        raise InputError(f"{where}: not JSON (expected a list of messages or an object with 'messages')")
    row_id = None
    if match := _LEADING_ID.match(head):
        try:
            row_id = json.JSONDecoder().raw_decode(head, match.end())[0]
        except (ValueError, RecursionError):
            pass  # the id is cut off too: the line number stands in (`named_by_line`)
    error = InputError(f"the line is longer than {max_line_bytes} bytes (--max-line-bytes); it was not read",
                       field="max_line_bytes")
    return {"id": row_id, "line": number, "error": error}


def prepare_row(processor, messages, context_len: int | None = None):
    """`processor.prepare(messages)` within `context_len` tokens (the engine's max_model_len; None:
    the checkpoint's context), or the `InputError` that says why the row cannot run."""
    try:
        return processor.prepare(messages, context_len=context_len)
    except InputError as error:
        return error


def error_row(row_id, error: BaseException) -> dict:
    return {"id": row_id, "error": {"type": type(error).__name__, "message": str(error)}}


def answer_row(row_id, completion) -> dict:
    return {"id": row_id, "text": completion.text, "finish_reason": completion.finish_reason,
            "usage": {"prompt_tokens": completion.usage.prompt_tokens,
                      "completion_tokens": completion.usage.completion_tokens}}


def answer_rows(llm, rows: Iterable[dict], params=None, batch_size: int = 64) -> Iterator[dict]:
    """One output row per input row, in input order; `batch_size` rows at a time run as one
    continuous batch. A row that cannot run (its media, its prompt, a limit) becomes an error row
    and the others go on."""
    chunk: list[dict] = []
    for row in rows:
        chunk.append(row)
        if len(chunk) == batch_size:
            yield from _answer_chunk(llm, chunk, params)
            chunk = []
    if chunk:
        yield from _answer_chunk(llm, chunk, params)


def _answer_chunk(llm, rows: list[dict], params) -> list[dict]:
    context_len = llm.engine.max_model_len
    prompts = media_map(lambda row: row["prompt"] if "prompt" in row
                        else prepare_row(llm.processor, row["messages"], context_len), rows)
    runnable = [i for i, prompt in enumerate(prompts) if not isinstance(prompt, InputError)]
    try:
        completions = dict(zip(runnable, llm.complete([prompts[i] for i in runnable], params)))
    except InputError:
        # The engine refused one of them (or one failed while running): each alone says which.
        completions = {i: _complete_one(llm, prompts[i], params) for i in runnable}
    answers = []
    for i, row in enumerate(rows):
        outcome = completions.get(i, prompts[i])
        answers.append(error_row(row["id"], outcome) if isinstance(outcome, InputError)
                       else answer_row(row["id"], outcome))
    return answers


def _complete_one(llm, prompt, params):
    try:
        [completion] = llm.complete([prompt], params)
        return completion
    except InputError as error:
        return error


def write_rows(output, batches: Iterable[list[dict]], progress: Progress, on_row=None) -> None:
    """Each batch of output rows to `output` (a `JobOutput`, or the Ray job's `ParquetOutput`;
    None: standard output) as it comes, each row counted in `progress` (then passed to
    `on_row`), and `output` committed once all are written. The caller closes `output`, also
    when this raises."""
    for rows in batches:
        if output is not None and rows:
            output.write(rows)
        for row in rows:
            if output is None:
                note(row_line(row).removesuffix("\n"), sys.stdout)
            progress.add(row)
            if on_row is not None:
                on_row(row)
    if output is not None:
        output.commit()


class Progress:
    """Rows/s, tokens/s and failed rows while a job runs (a `ProgressLine` on standard error),
    and its summary, written once by `finish`."""

    def __init__(self, total: int | None, line: ProgressLine | None = None):
        self.total, self.display = total, line or ProgressLine()
        self.rows = self.failed = self.tokens = 0

    def add(self, row: dict) -> None:
        self.rows += 1
        if "error" in row:
            self.failed += 1
        else:
            self.tokens += row["usage"]["completion_tokens"]
        self.display.update(f"[{self.line()}]", self.rows, self.total)

    def line(self) -> str:
        elapsed = max(self.display.elapsed(), 1e-9)
        done = f"{self.rows}/{self.total}" if self.total is not None else f"{self.rows}"
        return (f"{done} rows, {self.rows / elapsed:.2f} rows/s, {self.tokens / elapsed:.1f} tokens/s, "
                f"{self.failed} failed")

    def summary(self) -> str:
        return f"{self.line()}, {self.display.elapsed():.1f} s"

    def finish(self, extra: str = "") -> None:
        """The summary line (with `extra` after it), once."""
        self.display.finish(f"[{self.summary()}{extra}]")


class JobOutput:
    """Output rows written to `PATH.partial`, flushed as they come, moved onto PATH by `commit`.

    A job that fails or is stopped leaves PATH as it was and its rows in `PATH.partial`;
    `resume=True` goes on from `PATH.partial` if there is one, else from PATH, and `done` holds
    the ids already answered (as `id_key`), so a restarted job answers only the rest. The rows
    kept are copied to a new file renamed onto `PATH.partial`, so a job killed at any moment
    leaves the old file or the new one whole. A line cut short by a crash is dropped. Without
    `resume` an earlier partial file is started over.
    """

    def __init__(self, path: str | os.PathLike, resume: bool = False, max_line_bytes: int = MAX_LINE_BYTES):
        self.path = Path(path)
        self.partial = self.path.with_name(self.path.name + ".partial")
        if self.path.is_dir():
            raise InputError(f"--output {self.path}: is a directory", field="output")
        if not self.path.parent.is_dir():
            raise InputError(f"--output {self.path}: folder {self.path.parent} does not exist", field="output")
        self.done: set[str] = set()
        with _writing(self.partial):
            if resume:
                source = self.partial if self.partial.is_file() else self.path
                if source.is_file():
                    self._keep_answered(source, max_line_bytes)
            self._file = open(self.partial, "a" if resume else "w", encoding="utf-8")

    def _keep_answered(self, source: Path, max_line_bytes: int) -> None:
        """The complete rows of `source` to `PATH.partial` by way of a new file, their ids to `done`."""
        new_partial = self.partial.with_name(self.partial.name + ".new")
        try:
            with open(source, "rb") as old, open(new_partial, "wb") as new:
                for number, line, whole in jsonl_lines(old, max_line_bytes):
                    row_id = _answered_id(source, number, line, whole)
                    if row_id is not _CUT_SHORT:
                        self.done.add(id_key(row_id))
                        new.write(line if line.endswith(b"\n") else line + b"\n")
                _write_through(new)
            os.replace(new_partial, self.partial)
        except BaseException:
            new_partial.unlink(missing_ok=True)
            raise
        _write_through_folder(self.partial.parent)

    def write(self, rows: Iterable[dict]) -> None:
        with _writing(self.partial):
            for row in rows:
                self._file.write(row_line(row))
            self._file.flush()

    def commit(self) -> None:
        with _writing(self.path):
            _write_through(self._file)
            self._file.close()
            os.replace(self.partial, self.path)
            _write_through_folder(self.path.parent)

    def close(self) -> None:
        """Stop writing; an uncommitted job's rows stay in `PATH.partial` for `--resume`."""
        try:
            self._file.close()
        except OSError:
            pass  # the failed write was reported; the row it cut short is dropped by --resume
        note_partial(self.partial)


@contextmanager
def _writing(path: Path):
    """An OSError while writing `path` (a full disk, a file size limit) as one line naming it."""
    try:
        yield
    except OSError as error:
        raise Qwen2VLError(f"--output: cannot write {path}: {error.strerror or error}") from None


_CUT_SHORT = object()


def _answered_id(source: Path, number: int, line: bytes, whole: bool):
    """The id of an output row read back, or `_CUT_SHORT` for a last line cut short by a crash."""
    where = f"--resume: {source}: line {number}"
    if not whole:
        raise InputError(f"{where} is longer than any row of a job; is this a qwen2vl generate output?",
                         field="output")
    try:
        row = json.loads(line.decode("utf-8"))
    except (ValueError, RecursionError):  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        if not line.endswith(b"\n"):
            return _CUT_SHORT
        raise InputError(f"{where} is not JSON; is this a qwen2vl generate output?", field="output") from None
    if not isinstance(row, dict) or "id" not in row:
        raise InputError(f"{where} has no 'id'", field="output")
    return row["id"]


def row_line(row: dict) -> str:
    """An output row as its JSON line. A lone surrogate (which an input's JSON escapes can carry
    into an id) keeps its escape: UTF-8 cannot hold it."""
    return json.dumps(row, ensure_ascii=False).encode("utf-8", "backslashreplace").decode("utf-8") + "\n"


def _write_through(file) -> None:
    """`file`'s rows on disk, not only in the page cache, before a rename makes them the output."""
    file.flush()
    os.fsync(file.fileno())


def _write_through_folder(folder: Path) -> None:
    """A rename in `folder` on disk (where a folder cannot be opened, as on Windows, the rename stands)."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def note_partial(partial: Path) -> None:
    """Say where a stopped job's rows are (nothing once the job is committed)."""
    if partial.is_file():
        note(f"[the rows written so far are in {partial}; --resume goes on from there]")
