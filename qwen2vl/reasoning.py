"""Thinking models: the reasoning a model writes between `<think>` and `</think>`, told apart from
its answer, as vLLM's `qwen3` / `deepseek_r1` reasoning parsers do (the server's
`reasoning_content`, `Completion.reasoning`).

`thinking_tags` is the one place that decides whether a model thinks: a Qwen3-VL checkpoint
(`REASONING_MODEL_TYPES`; a Qwen2-VL or Qwen2.5-VL one never is) whose tokenizer has `<think>` and
`</think>` as single tokens kept in decoded text (Qwen3's 151667 and 151668). Its chat template
decides where the output starts: a Thinking template ends the generation prompt with `<think>`,
so the output is reasoning up to `</think>`; otherwise the output is the answer unless it opens
with `<think>` itself (vLLM's qwen3 parser takes both). An output cut off before `</think>` is
all reasoning. As Qwen's model cards do, the newlines around the reasoning and those that start
the answer are dropped.

Structured output and tool calls apply to the answer: the grammar lets the reasoning run free
(`structured.after_reasoning`), the tool-call parser reads the answer only.
"""
from __future__ import annotations

from dataclasses import dataclass

from qwen2vl.tool_calls import held_prefix

THINK_START = "<think>"
THINK_END = "</think>"
REASONING_MODEL_TYPES = frozenset({"qwen3_vl", "qwen3_vl_moe"})


@dataclass(frozen=True)
class ThinkingTags:
    """A thinking model's tags: their token ids, and whether its prompts open the reasoning."""

    start_id: int
    end_id: int
    opened_by_prompt: bool  # the chat template's generation prompt ends with `<think>`


def thinking_tags(model_type: str, tokenizer, template) -> ThinkingTags | None:
    """The model's `ThinkingTags` when it is a thinking model (see the module's docstring), else None."""
    if model_type not in REASONING_MODEL_TYPES:
        return None
    ids = [tokenizer.token_to_id(tag) for tag in (THINK_START, THINK_END)]
    if None in ids or any(tokenizer.decode([token]) != tag for token, tag in zip(ids, (THINK_START, THINK_END))):
        return None
    prompt = template.render([{"role": "user", "content": "?"}], add_generation_prompt=True)
    return ThinkingTags(ids[0], ids[1], prompt.rstrip().endswith(THINK_START))


class ReasoningParser:
    """Splits a thinking model's output, fed as it streams, into reasoning and answer.

    `feed(text)` and `finish()` return `(reasoning, content)`: the text of each that became
    known. Held back until it is known: a tail that may be the start of a tag, and newlines
    that may end the reasoning. What it returns does not depend on how the text was cut.
    """

    def __init__(self, opened_by_prompt: bool):
        self._opened = opened_by_prompt  # the output starts in the reasoning, with or without `<think>`
        self._state = "start"  # an opening tag may come
        self._pending = ""  # not yet returned
        self.reasoning: str | None = None  # all of it so far, None while there is none
        self.content = ""

    def feed(self, text: str) -> tuple[str, str]:
        self._pending += text
        reasoning = content = ""
        while True:
            if self._state == "start":
                stripped = self._pending.lstrip()
                if stripped.startswith(THINK_START):
                    self._pending, self._state = stripped[len(THINK_START):], "reasoning"
                    continue
                if THINK_START.startswith(stripped):
                    break  # it may still open
                self._state = "reasoning" if self._opened else "content"
            if self._state == "reasoning":
                end = self._pending.find(THINK_END)
                if end < 0:
                    ready = self._pending[:len(self._pending) - held_prefix(self._pending, THINK_END)].rstrip("\n")
                    reasoning += self._reasoning(ready)
                    self._pending = self._pending[len(ready):]
                    break
                reasoning += self._reasoning(self._pending[:end].rstrip("\n"))
                self._pending, self._state = self._pending[end + len(THINK_END):], "content"
                self.reasoning = self.reasoning or ""
            content += self._content(self._pending)
            self._pending = ""
            break
        return reasoning, content

    def finish(self) -> tuple[str, str]:
        """The rest, once the output has ended (cut off in the reasoning: all of it is reasoning)."""
        rest, self._pending = self._pending, ""
        if self._state == "reasoning" or (self._state == "start" and self._opened):
            return self._reasoning(rest.rstrip("\n")), ""
        return "", self._content(rest)

    def _reasoning(self, text: str) -> str:
        if not self.reasoning:
            text = text.lstrip("\n")
        if text:
            self.reasoning = (self.reasoning or "") + text
        return text

    def _content(self, text: str) -> str:
        if not self.content and self.reasoning is not None:  # the newlines after </think>
            text = text.lstrip("\n")
        self.content += text
        return text


def split_reasoning(text: str, tags: ThinkingTags | None) -> tuple[str | None, str]:
    """(reasoning, answer) of a whole output; reasoning None without one (and for a model that does not think)."""
    if tags is None:
        return None, text
    parser = ReasoningParser(tags.opened_by_prompt)
    parser.feed(text)
    parser.finish()
    return parser.reasoning, parser.content
