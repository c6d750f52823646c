"""Tool calls in the hermes format Qwen's templates use, independent of the server.

The tools are listed in the system turn (the chat template does it, given `tools`); the model
answers a call as

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

several calls one per line. `<tool_call>` and `</tool_call>` are single (added) tokens of Qwen2's
tokenizer, which llguidance counts as special: a grammar names them as tokens, `<tool_call>`
unquoted; a quoted "<tool_call>" would be its spelling in ordinary tokens, which the model was
never trained on.

- `tool_call_grammar`: `tool_choice` as a Lark grammar (llguidance's dialect): "required" or a
  named function admit only valid calls, "auto" free text in which every call is valid; a call's
  arguments are valid under its function's `parameters`, with only the keys it declares unless it
  allows more (`structured.closed_objects`), each once;
- `ToolCallParser`: the calls in a reply as it streams, with the text around them; `parse_tool_calls`
  runs it over a whole reply, so streamed and whole answers are the same by construction.
"""
from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from qwen2vl.errors import InputError
from qwen2vl.structured import JSON_STYLE, checked_schema

TOOL_CALL_START = "<tool_call>"
TOOL_CALL_END = "</tool_call>"
TOOL_CHOICES = ("none", "auto", "required")
NO_PARAMETERS = {"type": "object", "properties": {}, "additionalProperties": False}
# A call as the template asks for it, up to where its arguments begin.
_HEADER = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:')


def uses_tools(messages: list[dict], tools: list[dict] | None = None) -> bool:
    """Whether a conversation needs a tool-aware template: tools, tool results or past calls."""
    return bool(tools) or any(isinstance(message, dict) and (message.get("role") == "tool" or message.get("tool_calls"))
                              for message in messages)


def function_name(choice: Any) -> str | None:
    """The function a `tool_choice` names, else None ("none", "auto", "required")."""
    return choice["function"]["name"] if isinstance(choice, dict) else None


def check_tool_choice(tools: list[dict] | None, choice: Any) -> None:
    """Raise `InputError` (field `tools` / `tool_choice...`) for a choice the tools cannot meet
    and for two tools of one name."""
    tools = tools or []
    names = [tool["function"]["name"] for tool in tools]
    for index, name in enumerate(names):
        if name in names[:index]:
            raise InputError(f"two tools are named {name!r}; function names must be unique",
                             field=f"tools[{index}].function.name")
    named = function_name(choice)
    if named is not None and named not in names:
        known = ", ".join(repr(name) for name in names) or "none"
        raise InputError(f"tool_choice names function {named!r}, which is not in tools (given: {known})",
                         field="tool_choice.function.name")
    if choice == "required" and not tools:
        raise InputError('tool_choice "required" needs at least one tool in tools', field="tool_choice")


def tool_call_grammar(tools: list[dict], choice: Any, parallel: bool = True) -> str | None:
    """The Lark grammar (llguidance's dialect) a reply must follow under `tool_choice`, or None
    when the reply is free ("none", or no tools).

    "required": one call of any tool, or with `parallel` one or more, a newline apart; a named
    function: exactly one call of it; "auto": any text, with calls of any tool in it (at most one
    without `parallel`), each valid, and no `<tool_call>` spelled in ordinary tokens (the parser
    would read it as a call). `tools` are OpenAI's `{"type": "function", "function": {"name",
    "parameters", ...}}`, already checked by `check_tool_choice`.
    """
    named = function_name(choice)
    if named is None and (choice not in ("required", "auto") or not tools):
        return None
    functions = [(position, tool["function"]) for position, tool in enumerate(tools)
                 if named is None or tool["function"]["name"] == named]
    rules = []
    for index, (position, function) in enumerate(functions):
        head = f'{{"name": {json.dumps(function["name"])}, "arguments": '
        # bounded as a request's JSON schema is (the grammar embeds it)
        schema = checked_schema(function.get("parameters") or NO_PARAMETERS, f"tools[{position}].function.parameters")
        schema["x-guidance"] = {**JSON_STYLE, **schema.get("x-guidance", {})}  # as the templates write arguments
        rules.append(f'call_{index}: {json.dumps(head)} args_{index} "}}"')
        rules.append(f"args_{index}: %json {json.dumps(schema)}")
    alternatives = " | ".join(f"call_{index}" for index in range(len(functions)))
    if choice == "auto":
        start = f"start: TEXT? (tool_call TEXT?){'*' if parallel else '?'}"
        rules.append(f"TEXT: /(?s:.+)/ & ~/(?s:.*{re.escape(TOOL_CALL_START)}.*)/")
    else:
        start = "start: tool_call" + (' ("\\n" tool_call)*' if parallel and named is None else "")
    return "\n".join([start,
                      f'tool_call: {TOOL_CALL_START} "\\n" ({alternatives}) "\\n" {TOOL_CALL_END}', *rules]) + "\n"


# --- parsing -----------------------------------------------------------------------------------

@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text, as the model wrote it


@dataclass
class ToolCallDelta:
    """A piece of call `index`: its first piece has `id` and `name` (and arguments ""), the
    next ones more of its arguments."""

    index: int
    arguments: str
    id: str | None = None
    name: str | None = None


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


class ToolCallParser:
    """Splits a reply, fed as it streams, into its text and its `<tool_call>` blocks.

    `feed(text)` and `finish()` return `(content, deltas)`: the text that is surely not part of
    a call, and the call pieces that became known. Held back until it is known: a tail that may
    be the start of `<tool_call>`, and whitespace, which is dropped when it only separates
    calls (a text of only whitespace that has calls around it). A call's id and name go out as
    soon as `{"name": ..., "arguments":` is complete, its arguments as they come (less a last
    `}` that may close the call). A block not of that shape is parsed whole at its end (other
    key orders); one that is not a call at all stays in the text, verbatim. An unclosed block
    at the end (the reply ran out of tokens) ends as if closed.

    What it returns does not depend on how the text was cut into pieces.
    """

    def __init__(self):
        self._text = ""  # not yet returned, outside a call
        self._segment_has_text = False  # the text since the last call has more than whitespace
        self._body: str | None = None  # inside a call: its text so far
        self._header_end = 0  # where its arguments begin, once its header is known
        self._sent = 0  # how much of its arguments went out
        self.calls: list[ToolCall] = []

    def feed(self, text: str) -> tuple[str, list[ToolCallDelta]]:
        content, deltas = [], []
        if self._body is None:
            self._text += text
        else:
            self._body += text
        while True:
            if self._body is None:
                start = self._text.find(TOOL_CALL_START)
                if start < 0:
                    content.append(self._release(held_prefix(self._text, TOOL_CALL_START)))
                    break
                content.append(self._segment_before_call(self._text[:start]))
                self._body, self._text = self._text[start + len(TOOL_CALL_START):], ""
            end = self._body.find(TOOL_CALL_END)
            if end < 0:
                deltas.extend(self._call_progress())
                break
            rest = self._body[end + len(TOOL_CALL_END):]
            self._body = self._body[:end]
            text_back, closed = self._close_call()
            content.append(text_back)
            deltas.extend(closed)
            self._text = rest
        return "".join(content), deltas

    def finish(self) -> tuple[str, list[ToolCallDelta]]:
        """The rest, once the reply has ended."""
        if self._body is not None:
            content, deltas = self._close_call(closed=False)
            return content + self._release(0, final=True), deltas
        return self._release(0, final=True), []

    # -- outside a call -----------------------------------------------------------------------

    def _release(self, hold: int, final: bool = False) -> str:
        """The text but its last `hold` characters and trailing whitespace (all of it when `final`,
        unless it is whitespace between or after calls)."""
        if final:
            text, self._text = self._text, ""
            return text if self._segment_has_text or not self.calls else ""
        ready = self._text[:len(self._text) - hold].rstrip()
        if not ready:
            return ""
        self._segment_has_text = True
        self._text = self._text[len(ready):]
        return ready

    def _segment_before_call(self, text: str) -> str:
        """What of the text before a call goes out: its held whitespace only if it has text."""
        keep = self._segment_has_text or bool(text.strip())
        self._segment_has_text = False
        return text if keep else ""

    # -- inside a call ------------------------------------------------------------------------

    def _call_progress(self) -> list[ToolCallDelta]:
        deltas = self._match_header()
        if not self._header_end:
            return []
        arguments = self._arguments(hold=held_prefix(self._body, TOOL_CALL_END))
        if len(arguments) > self._sent:
            deltas.append(ToolCallDelta(len(self.calls) - 1, arguments[self._sent:]))
            self._sent = len(arguments)
        return deltas

    def _arguments(self, hold: int = 0) -> str:
        """The arguments so far, without a last `}` (it may close the call) and the whitespace around."""
        text = self._body[self._header_end:len(self._body) - hold].strip()
        return text[:-1].rstrip() if text.endswith("}") else text

    def _match_header(self) -> list[ToolCallDelta]:
        """The call's first piece, once its header is complete (and not sent before)."""
        header = None if self._header_end else _HEADER.match(self._body)
        try:
            name = json.loads(f'"{header.group(1)}"') if header else None
        except json.JSONDecodeError:  # a bad escape: not a call of this shape
            name = None
        if name is None:
            return []
        self._header_end = header.end()
        return [self._open_call(name)]

    def _open_call(self, name: str) -> ToolCallDelta:
        self.calls.append(ToolCall(new_call_id(), name, ""))
        return ToolCallDelta(len(self.calls) - 1, "", id=self.calls[-1].id, name=name)

    def _close_call(self, closed: bool = True) -> tuple[str, list[ToolCallDelta]]:
        """(text, deltas) of a block that ended (`closed` by `</tool_call>`, or by the end of the
        reply): its last pieces, or the block back as text."""
        deltas = self._match_header()
        if not self._header_end:
            call = _whole_call(self._body)
            if call is None:
                text = TOOL_CALL_START + self._body + (TOOL_CALL_END if closed else "")
                self._body = None
                self._segment_has_text = True
                return text, []
            deltas.append(self._open_call(call[0]))
            arguments = call[1]
        else:
            arguments = self._arguments()
        if len(arguments) > self._sent:
            deltas.append(ToolCallDelta(len(self.calls) - 1, arguments[self._sent:]))
        self.calls[-1].arguments = arguments
        self._body, self._header_end, self._sent = None, 0, 0
        return "", deltas


def held_prefix(text: str, marker: str) -> int:
    """The length of the longest tail of `text` that is a proper start of `marker`."""
    for size in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-size:]):
            return size
    return 0


def _whole_call(body: str) -> tuple[str, str] | None:
    """(name, arguments JSON) of a block that is a call in another key order, else None."""
    try:
        value = json.loads(body)
    except json.JSONDecodeError:
        return None
    if not (isinstance(value, dict) and isinstance(value.get("name"), str)
            and isinstance(value.get("arguments", {}), dict)):
        return None
    return value["name"], json.dumps(value.get("arguments", {}), ensure_ascii=False)


def parse_tool_calls(text: str) -> tuple[str | None, list[ToolCall]]:
    """(content, calls) of a whole reply; content is None when the reply is only calls."""
    parser = ToolCallParser()
    content, _ = parser.feed(text)
    rest, _ = parser.finish()
    content += rest
    return (content or None) if parser.calls else content, parser.calls
