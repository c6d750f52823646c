"""Chat messages: validation, media parts in prompt order, and the checkpoint's Jinja chat template."""
from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from qwen2vl.errors import CheckpointError, InputError
from qwen2vl.processor.types import MediaOptions
from qwen2vl.tool_calls import uses_tools

ROLES = ("system", "user", "assistant", "tool")
ASSETS = Path(__file__).resolve().parent.parent / "assets"
BUILTIN_TEMPLATE = ASSETS / "chat_template.json"
# Qwen2-VL's template knows no tools: conversations with tools render with this one.
BUILTIN_TOOLS_TEMPLATE = ASSETS / "chat_template_tools.jinja"


@dataclass(frozen=True)
class MediaPart:
    """One image or video of a conversation, where it is, and its per-item settings."""

    kind: str  # "image" | "video"
    value: Any  # path / URL / data URI / base64 / PIL image, or a list of frames for a video
    options: MediaOptions
    message_index: int
    content_index: int


def media_parts(messages: Any) -> list[MediaPart]:
    """Validate one conversation and list its images and videos in the order the template emits them.

    A part is an image or video by the same rule as the chat template (its `type`, or an `image` /
    `image_url` / `video` key), so the pads and the media always pair up.
    """
    if not isinstance(messages, (list, tuple)) or not messages:
        raise InputError("messages must be a non-empty list of {'role': ..., 'content': ...} objects")
    parts = []
    for m, message in enumerate(messages):
        if not isinstance(message, dict):
            raise InputError(f"a message must be an object, got {type(message).__name__}", m)
        if message.get("role") not in ROLES:
            raise InputError(f"unknown role {message.get('role')!r} (expected one of {', '.join(ROLES)})", m)
        content = message.get("content")
        if isinstance(content, str) or (content is None and message.get("tool_calls")):
            continue
        if content is None:
            raise InputError("content must be a string or a list of parts (only an assistant message with "
                             "tool_calls may leave it out)", m)
        if not isinstance(content, (list, tuple)):
            raise InputError(f"content must be a string or a list of parts, got {type(content).__name__}", m)
        for c, part in enumerate(content):
            media = _media_part(part, m, c)
            if media is not None:
                parts.append(media)
    return parts


def _media_part(part: Any, m: int, c: int) -> MediaPart | None:
    if not isinstance(part, dict):
        raise InputError(f"a content part must be an object, got {type(part).__name__}", m, c)
    kind = part.get("type")
    if kind == "image" or kind == "image_url" or "image" in part or "image_url" in part:
        value = part.get("image", part.get("image_url"))
        kind = "image"
    elif kind == "video" or "video" in part:
        value = part.get("video")
        kind = "video"
    elif kind == "text" or (kind is None and "text" in part):
        if not isinstance(part.get("text"), str):
            raise InputError(f"text must be a string, got {type(part.get('text')).__name__}", m, c)
        return None
    else:
        raise InputError(f"unknown content type {kind!r} (expected text, image, image_url or video)", m, c)
    if value is None:
        raise InputError(f"{kind} part has no {kind!r} value", m, c)
    try:
        options = MediaOptions.from_part(part)
    except InputError as e:
        raise e.at(m, c) from None
    return MediaPart(kind, value, options, m, c)


class ChatTemplate:
    """A chat template rendered with jinja2 the way transformers does (sandboxed, trimmed blocks).

    `tools_source` renders the conversations with tools, tool results or past tool calls when
    `source` cannot (a template that never mentions `tools`, such as Qwen2-VL's): the built-in
    tool-aware one unless given.
    """

    def __init__(self, source: str, special_tokens: dict[str, str] | None = None, tools_source: str | None = None):
        self.source = source
        self.special_tokens = dict(special_tokens or {})
        if tools_source is None and "tools" not in source:
            tools_source = BUILTIN_TOOLS_TEMPLATE.read_text(encoding="utf-8")
        self.tools_source = tools_source or source

    @classmethod
    def from_dir(cls, model_dir: Path, special_tokens: dict[str, str] | None = None) -> "ChatTemplate":
        """The checkpoint's template: chat_template.jinja, chat_template.json, tokenizer_config.json,
        else the built-in Qwen2-VL one."""
        model_dir = Path(model_dir)
        if (model_dir / "chat_template.jinja").is_file():
            return cls((model_dir / "chat_template.jinja").read_text(encoding="utf-8"), special_tokens)
        for path in (model_dir / "chat_template.json", model_dir / "tokenizer_config.json"):
            template = _template_in(path)
            if template is not None:
                return cls(template, special_tokens)
        return cls(_template_in(BUILTIN_TEMPLATE), special_tokens)

    @classmethod
    def from_file(cls, path: str | Path, special_tokens: dict[str, str] | None = None) -> "ChatTemplate":
        """A template file (`--chat-template`): Jinja text, or JSON with a "chat_template" key. It
        renders every conversation, those with tools too."""
        path = Path(path)
        if not path.is_file():
            raise InputError(f"chat template {path} is not a file", field="chat_template")
        template = _template_in(path) if path.suffix == ".json" else path.read_text(encoding="utf-8")
        if template is None:
            raise InputError(f"{path} has no \"chat_template\" string", field="chat_template")
        return cls(template, special_tokens, tools_source=template)

    @cached_property
    def _compiled(self) -> jinja2.Template:
        return _compile(self.source)

    @cached_property
    def _tools_compiled(self) -> jinja2.Template:
        return self._compiled if self.tools_source == self.source else _compile(self.tools_source)

    def render(self, messages: list[dict], add_generation_prompt: bool = True, add_vision_id: bool = False,
               tools: list[dict] | None = None) -> str:
        """`tools`: OpenAI's `{"type": "function", "function": {...}}` objects, listed in the prompt."""
        template = self._tools_compiled if uses_tools(messages, tools) else self._compiled
        # An assistant turn of only tool calls may leave its content out or null (OpenAI's
        # protocol); Qwen3-VL's templates iterate any content that is not a string, so it is
        # rendered as "" (as vLLM does), which every template reads as no text.
        messages = [{**message, "content": ""} if isinstance(message, dict) and message.get("content") is None
                    and message.get("tool_calls") else message for message in messages]
        try:
            return template.render(
                messages=messages,
                tools=tools or None,
                add_generation_prompt=add_generation_prompt,
                add_vision_id=add_vision_id,
                **self.special_tokens,
            )
        except InputError:
            raise
        except (jinja2.TemplateError, TypeError, KeyError, AttributeError) as e:
            raise InputError(f"the chat template cannot render these messages: {e}") from None


def _compile(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = lambda value, indent=None: json.dumps(value, ensure_ascii=False, indent=indent)
    env.globals["raise_exception"] = _raise_from_template
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise CheckpointError(f"chat template does not parse: {e}") from None


def _template_in(path: Path) -> str | None:
    if not path.is_file():
        return None
    try:
        template = json.loads(path.read_text(encoding="utf-8")).get("chat_template")
    except (json.JSONDecodeError, AttributeError) as e:
        raise CheckpointError(f"{path} is not a JSON object: {e}") from None
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    return template if isinstance(template, str) else None


def _raise_from_template(message: str):
    raise InputError(f"chat template: {message}")
