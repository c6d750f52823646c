"""The checkpoint's tokenizer (`tokenizer.json` through the `tokenizers` library) and streaming decode."""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import tokenizers

from qwen2vl.errors import CheckpointError

REPLACEMENT_CHAR = "\ufffd"


class Tokenizer:
    """Encode/decode with special tokens kept whole; `eos_token_id` / `pad_token_id` when the
    checkpoint's tokenizer_config.json names them."""

    def __init__(self, backend: tokenizers.Tokenizer, eos_token: str | None = None, pad_token: str | None = None):
        self.backend = backend
        self.eos_token = eos_token
        self.pad_token = pad_token
        self.eos_token_id = self.token_to_id(eos_token) if eos_token else None
        self.pad_token_id = self.token_to_id(pad_token) if pad_token else None

    @classmethod
    def from_dir(cls, model_dir: Path) -> "Tokenizer":
        model_dir = Path(model_dir)
        path = model_dir / "tokenizer.json"
        if not path.is_file():
            raise CheckpointError(f"{model_dir} has no tokenizer.json")
        try:
            backend = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:  # the tokenizers library raises bare Exceptions
            raise CheckpointError(f"{path} does not load: {e}") from None
        config = {}
        if (model_dir / "tokenizer_config.json").is_file():
            config = json.loads((model_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
        return cls(backend, _token_text(config.get("eos_token")), _token_text(config.get("pad_token")))

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def special_tokens(self) -> dict[str, str]:
        """Template variables for the chat template (`eos_token`, `pad_token` where known)."""
        return {name: token for name, token in (("eos_token", self.eos_token), ("pad_token", self.pad_token)) if token}

    def encode(self, text: str) -> list[int]:
        # The batch call releases the GIL while it works; `encode` holds it throughout, and a long
        # prompt then froze every other thread (a server's event loop included) for as long.
        return self.backend.encode_batch([text], add_special_tokens=False)[0].ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    def token_bytes(self, token_id: int) -> bytes:
        """The exact bytes token `token_id` stands for, which may be part of a UTF-8 character
        (OpenAI's logprob `bytes`). A token string with characters outside the byte-level alphabet
        (an added token kept as plain text) is that text in UTF-8."""
        piece = self.id_to_token(token_id) or ""
        decoder = byte_decoder()
        if all(ch in decoder for ch in piece):
            return bytes(decoder[ch] for ch in piece)
        return piece.encode()


@lru_cache(maxsize=1)
def byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet, which Qwen2's vocabulary is written in: the printable
    character that stands for each of the 256 bytes in token strings, mapped to that byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    characters = {byte: byte for byte in printable}
    extra = 0
    for byte in range(256):
        if byte not in characters:
            characters[byte] = 256 + extra
            extra += 1
    return {chr(code): byte for byte, code in characters.items()}


def _token_text(token) -> str | None:
    # tokenizer_config.json writes a token as a string or as {"content": ..., ...}
    return token.get("content") if isinstance(token, dict) else token


class IncrementalDetokenizer:
    """Text deltas for streaming: `add(id)` returns only completed characters.

    A token that ends inside a multi-byte character decodes to U+FFFD; such text is held back until
    a later token completes it. Only a small window of recent ids is decoded each step.
    `flush()` releases whatever is held back at the end, so the deltas joined equal
    `tokenizer.decode(all_ids)`.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.text = ""
        self._prefix_offset = 0  # start of the window decoded for context
        self._read_offset = 0  # ids before this are already in `text`

    def add(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        prefix = self._decode(self._prefix_offset, self._read_offset)
        window = self._decode(self._prefix_offset, len(self.ids))
        if len(window) <= len(prefix) or window.endswith(REPLACEMENT_CHAR):
            return ""
        delta = window[len(prefix):]
        self._prefix_offset, self._read_offset = self._read_offset, len(self.ids)
        self.text += delta
        return delta

    def flush(self) -> str:
        """Whatever is still held back (e.g. a truncated character at the end of generation)."""
        window = self._decode(self._prefix_offset, len(self.ids))
        delta = window[len(self._decode(self._prefix_offset, self._read_offset)):]
        self._prefix_offset = self._read_offset = len(self.ids)
        self.text += delta
        return delta

    def _decode(self, start: int, end: int) -> str:
        return self.tokenizer.decode(self.ids[start:end], self.skip_special_tokens) if end > start else ""
