"""Vision encoder outputs kept by media digest, so an image seen again is not encoded again."""
from __future__ import annotations

from collections import OrderedDict

import torch


class VisionCache:
    """Least recently used first out, under `max_bytes` of embeddings (0: off). An entry is the
    embeddings of one image or video, keyed by `VisionItem.digest` (its processed pixels)."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.num_bytes = 0
        self.num_hits = 0
        self._entries: OrderedDict[bytes, torch.Tensor] = OrderedDict()

    def get(self, digest: bytes) -> torch.Tensor | None:
        embeds = self._entries.get(digest)
        if embeds is not None:
            self._entries.move_to_end(digest)
            self.num_hits += 1
        return embeds

    def put(self, digest: bytes, embeds: torch.Tensor) -> None:
        size = embeds.numel() * embeds.element_size()
        if size > self.max_bytes or digest in self._entries:
            return
        while self.num_bytes + size > self.max_bytes:
            _, old = self._entries.popitem(last=False)
            self.num_bytes -= old.numel() * old.element_size()
        self._entries[digest] = embeds
        self.num_bytes += size
