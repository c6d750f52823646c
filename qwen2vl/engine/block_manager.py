"""Paged KV cache bookkeeping: fixed-size blocks handed to sequences as their tokens grow."""
from __future__ import annotations

from qwen2vl.engine.sequence import Sequence


class BlockManager:
    """Owns the free list of `num_blocks` KV blocks of `block_size` tokens each.

    A sequence holds `ceil(tokens / block_size)` blocks for the tokens it has in the cache (or is
    about to compute), listed in `seq.block_table`; memory grows with tokens in use, not with
    the maximum length.
    """

    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need at least one block of at least one token, got {num_blocks} x {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        # Popped from the end: recently freed blocks are reused first, while still warm in cache.
        self._free = list(range(num_blocks - 1, -1, -1))

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def extra_blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        """Blocks `seq` lacks to hold its first `num_tokens` tokens."""
        return max(0, self.blocks_for(num_tokens) - len(seq.block_table))

    def can_grow(self, seq: Sequence, num_tokens: int) -> bool:
        return self.extra_blocks_needed(seq, num_tokens) <= len(self._free)

    def grow(self, seq: Sequence, num_tokens: int) -> None:
        """Give `seq` enough blocks for its first `num_tokens` tokens."""
        needed = self.extra_blocks_needed(seq, num_tokens)
        if needed > len(self._free):
            raise RuntimeError(f"{needed} KV blocks needed, {len(self._free)} free; check can_grow first")
        for _ in range(needed):
            seq.block_table.append(self._free.pop())

    def free(self, seq: Sequence) -> None:
        self._free.extend(reversed(seq.block_table))
        seq.block_table = []
