"""Errors a user can act on. Every message names what was wrong and where."""
from __future__ import annotations


class Qwen2VLError(Exception):
    """Base class of the errors this package raises on purpose."""


class InputError(Qwen2VLError, ValueError):
    """A request's input is invalid (bad message, bad media, over a limit).

    `message_index` / `content_index` locate the offending part of a conversation when known;
    `field` names the offending field (of that part, such as "max_pixels", or of the request,
    such as "max_tokens"), so the server can answer with it as OpenAI's `param`.
    """

    def __init__(self, cause: str, message_index: int | None = None, content_index: int | None = None,
                 field: str | None = None):
        self.cause = cause
        self.message_index = message_index
        self.content_index = content_index
        self.field = field
        # Indices as in the request's JSON (from 0), written as its path: `messages[1].content[0]`.
        where = "" if message_index is None else f"messages[{message_index}]"
        if content_index is not None:
            where += f".content[{content_index}]"
        super().__init__(f"{where}: {cause}" if where else cause)

    def at(self, message_index: int, content_index: int) -> InputError:
        """The same error (its type, cause and field), located in content part `content_index` of
        message `message_index`: how a check that sees one part names where that part is."""
        return type(self)(self.cause, message_index, content_index, self.field)

    def in_conversation(self, index: int) -> InputError:
        """The same error, located in conversation `index` of a batch (`conversations[2]: ...`)."""
        error = type(self)(self.cause, self.message_index, self.content_index, self.field)
        error.args = (f"conversations[{index}]: {self}",)
        return error


class MediaError(InputError):
    """An image or video could not be fetched, decoded or resized."""


class CheckpointError(Qwen2VLError, ValueError):
    """A checkpoint directory is missing files, tensors, or has tensors of the wrong shape."""
