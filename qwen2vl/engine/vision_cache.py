"""Vision encoder outputs kept by media digest, so an image seen again is not encoded again."""
from __future__ import annotations

from collections import OrderedDict

import torch


class VisionCache:
    """Least recently used first out, under `max_bytes` of embeddings (0: off). An entry is the
    embeddings of one image or video, keyed by `VisionItem.digest` (its processed pixels) and the
    `cache_salt` of the request that encoded it: a request finds only its own salt's entries."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.num_bytes = 0
        self.num_hits = 0
        self._entries: OrderedDict[tuple[str | None, bytes], torch.Tensor] = OrderedDict()

    def get(self, cache_salt: str | None, digest: bytes) -> torch.Tensor | None:
        key = (cache_salt, digest)
        embeds = self._entries.get(key)
        if embeds is not None:
            self._entries.move_to_end(key)
            self.num_hits += 1
        return embeds

    def put(self, cache_salt: str | None, digest: bytes, embeds: torch.Tensor) -> None:
        key = (cache_salt, digest)
        size = embeds.numel() * embeds.element_size()
        if size > self.max_bytes or key in self._entries:
            return
        while self.num_bytes + size > self.max_bytes:
            _, old = self._entries.popitem(last=False)
            self.num_bytes -= old.numel() * old.element_size()
        self._entries[key] = embeds
        self.num_bytes += size
