"""Paged KV cache bookkeeping: fixed-size blocks handed to sequences as their tokens grow, and the
prefix cache, which lets a sequence start from full blocks another one computed."""
from __future__ import annotations

import hashlib
from collections import OrderedDict

from qwen2vl.engine.sequence import Sequence
from qwen2vl.errors import InputError

MAX_CACHE_SALT_CHARS = 256  # a 256-bit random salt is 43 base64 characters


def check_cache_salt(cache_salt: object) -> None:
    """A request's `cache_salt` is None (the shared cache) or a non-empty string of at most
    `MAX_CACHE_SALT_CHARS` characters."""
    if cache_salt is None:
        return
    if not isinstance(cache_salt, str):
        raise InputError(f"cache_salt must be a string, not {type(cache_salt).__name__}", field="cache_salt")
    if not 0 < len(cache_salt) <= MAX_CACHE_SALT_CHARS:
        raise InputError(f"cache_salt has {len(cache_salt)} characters; give 1 to {MAX_CACHE_SALT_CHARS}",
                         field="cache_salt")


def salt_digest(cache_salt: str | None) -> bytes:
    """The parent of a request's first block: none without a salt, else the salt's own digest,
    so that requests share blocks (and everything after them) only within one salt.

    Personalized apart from `block_digest`, so no salt's digest is any block's."""
    if cache_salt is None:
        return b""
    return hashlib.blake2b(cache_salt.encode("utf-8", "surrogatepass"), digest_size=32, person=b"qwen2vl salt").digest()


def block_digest(parent: bytes, token_ids: list[int], media: list[tuple[bytes, int]]) -> bytes:
    """The identity of a full block: its parent's digest (for a first block, `salt_digest`), its
    token ids, and for the images and videos whose pad tokens it holds, each one's digest and
    the offset of its first pad here.

    Cryptographic (BLAKE2b) so that no prompt can be made to collide with another's blocks;
    media enter by the digest of their processed pixels, so two images of one size (the same pad
    tokens) never share a block."""
    h = hashlib.blake2b(parent, digest_size=32)
    h.update(len(token_ids).to_bytes(4, "little"))
    for token in token_ids:
        h.update(token.to_bytes(4, "little"))
    for digest, offset in media:
        h.update(digest)
        h.update(offset.to_bytes(8, "little"))
    return h.digest()


class BlockManager:
    """Owns the `num_blocks` KV blocks of `block_size` tokens each.

    A sequence holds `ceil(tokens / block_size)` blocks for the tokens it has in the cache (or is
    about to compute), listed in `seq.block_table`. With `prefix_caching`, each full block that
    was computed is registered under its digest (chained from its parent's and from the
    request's `cache_salt`, see `block_digest`);
    blocks are reference-counted, a new sequence starts from the longest run of registered blocks
    matching its tokens, and a block nobody holds stays registered (evictable) until a block is
    needed and no never-registered one is free: then the least recently used goes.
    """

    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = False):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need at least one block of at least one token, got {num_blocks} x {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.prefix_caching = prefix_caching
        # Popped from the end: recently freed blocks are reused first, while still warm in cache.
        self._free = list(range(num_blocks - 1, -1, -1))
        self._evictable: OrderedDict[int, None] = OrderedDict()  # registered, held by none; oldest first
        self._ref_counts = [0] * num_blocks
        self._digest_of: dict[int, bytes] = {}
        self._block_of: dict[bytes, int] = {}
        self.num_queried_tokens = 0  # prompt tokens looked up in the prefix cache
        self.num_hit_tokens = 0  # of those, found

    @property
    def num_free_blocks(self) -> int:
        """Blocks no sequence holds (never registered, or registered and evictable)."""
        return len(self._free) + len(self._evictable)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def extra_blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        """Blocks `seq` lacks to hold its first `num_tokens` tokens."""
        return max(0, self.blocks_for(num_tokens) - len(seq.block_table))

    def can_grow(self, seq: Sequence, num_tokens: int) -> bool:
        return self.extra_blocks_needed(seq, num_tokens) <= self.num_free_blocks

    def grow(self, seq: Sequence, num_tokens: int) -> None:
        """Give `seq` enough blocks for its first `num_tokens` tokens."""
        needed = self.extra_blocks_needed(seq, num_tokens)
        if needed > self.num_free_blocks:
            raise RuntimeError(f"{needed} KV blocks needed, {self.num_free_blocks} free; check can_grow first")
        for _ in range(needed):
            block = self._free.pop() if self._free else self._evict()
            self._ref_counts[block] = 1
            seq.block_table.append(block)

    def _evict(self) -> int:
        block, _ = self._evictable.popitem(last=False)
        del self._block_of[self._digest_of.pop(block)]
        return block

    def free(self, seq: Sequence) -> None:
        for block in reversed(seq.block_table):
            self._ref_counts[block] -= 1
            if self._ref_counts[block] == 0:
                if block in self._digest_of:
                    self._evictable[block] = None
                else:
                    self._free.append(block)
        seq.block_table = []

    # --- the prefix cache ---------------------------------------------------------------------

    def cached_prefix(self, seq: Sequence) -> list[int]:
        """The registered blocks that match `seq`'s first full blocks, leaving at least its last
        token to compute (its next token is sampled from it)."""
        if not self.prefix_caching:
            return []
        digests = self._digests(seq, (seq.num_tokens - 1) // self.block_size)
        blocks = []
        for digest in digests:
            block = self._block_of.get(digest)
            if block is None:
                break
            blocks.append(block)
        return blocks

    def blocks_taken_from_free(self, blocks: list[int]) -> int:
        """How many of `blocks` no sequence holds now (taking them uses up free blocks)."""
        return sum(self._ref_counts[block] == 0 for block in blocks)

    def take_prefix(self, seq: Sequence, blocks: list[int]) -> None:
        """`seq` (holding no blocks) starts from the cached `blocks`."""
        for block in blocks:
            if self._ref_counts[block] == 0:
                del self._evictable[block]
            self._ref_counts[block] += 1
        seq.block_table = list(blocks)
        if self.prefix_caching:
            self.num_queried_tokens += seq.num_tokens
            self.num_hit_tokens += len(blocks) * self.block_size

    def register(self, seq: Sequence, num_computed: int, block_table: list[int]) -> None:
        """The full blocks among `seq`'s first `num_computed` tokens, computed by a step into
        `block_table`, become findable by their digests (unless `seq` was preempted since, and
        gave those blocks up)."""
        num_blocks = num_computed // self.block_size
        if not self.prefix_caching or seq.block_table[:num_blocks] != block_table[:num_blocks]:
            return
        for index, digest in enumerate(self._digests(seq, num_blocks)):
            block = block_table[index]
            if block not in self._digest_of and digest not in self._block_of:
                self._digest_of[block] = digest
                self._block_of[digest] = block

    def _digests(self, seq: Sequence, num_blocks: int) -> list[bytes]:
        """Digests of `seq`'s first `num_blocks` full blocks (computed once each, kept by `seq`)."""
        digests = seq.block_digests
        size = self.block_size
        while len(digests) < num_blocks:
            start = len(digests) * size
            parent = digests[-1] if digests else salt_digest(seq.cache_salt)
            digests.append(block_digest(parent, seq.token_ids[start:start + size], seq.media_in(start, start + size)))
        return digests[:num_blocks]
