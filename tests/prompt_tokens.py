"""How long a prompt would be, without decoding any pixel: what the tests compare `prepare` with."""
from __future__ import annotations

from qwen2vl.processor.chat import media_parts


def count_tokens(processor, messages: list[dict], add_generation_prompt: bool = True, add_vision_id: bool = False,
                 context_len: int | None = None) -> int:
    """The prompt length `processor.prepare` would give, reading only media headers: the rendered
    text's tokens and each media plan's tokens, from the same steps `prepare` takes."""
    parts = media_parts(messages)
    _, ids = processor._render(messages, parts, add_generation_prompt, add_vision_id)
    text_tokens = len(ids) - len(parts)
    return text_tokens + sum(plan.num_tokens for plan in processor._plans(parts, text_tokens, context_len))
