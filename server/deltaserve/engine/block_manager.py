"""Paged KV-cache block allocation, with prefix caching.

Blocks are handed out on demand and reference counted. With prefix caching on, a block that
holds a full `block_size` tokens of computed KV is registered under a chained key:

    key(block i) = sha256(key(block i-1) || token ids of block i),  key(block -1) = sha256(salt)

where the salt names everything else the KV depends on (the delta key, i.e. tenant and
version, and alpha; see `Sequence.cache_salt`). Equal keys therefore mean equal KV, and a
block of tenant A is never found by tenant B, by A at another alpha, or by A's next version.
SHA-256 (not Python's `hash`, which is not randomised for ints) keeps one tenant from
crafting a prompt whose key collides with another tenant's block.

A block whose last reference goes stays cached but free: it is evictable, and the free
list is kept in LRU order (blocks that hold no cached prefix are handed out first, then
cached blocks least recently freed first; handing one out drops its key). A request whose
prompt starts with cached blocks takes them (their reference counts rise) and computes only
the rest; at least the prompt's last token is always computed (its logits are needed).
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from dataclasses import dataclass

from deltaserve.errors import ResourceExhaustedError


def block_key(parent: bytes, tokens: list[int]) -> bytes:
    """The cache key of a full block of `tokens` whose prefix has key `parent`."""
    return hashlib.sha256(parent + array("q", tokens).tobytes()).digest()


def root_key(salt: str) -> bytes:
    """The key that chains the first block of a sequence with cache salt `salt`."""
    return hashlib.sha256(b"deltaserve-prefix\0" + salt.encode()).digest()


@dataclass
class PrefixCacheCounters:
    """Totals since start: lookups (one per admission), lookups that reused at least one
    block, prompt tokens looked up, prompt tokens whose KV came from the cache."""

    queries: int = 0
    hits: int = 0
    query_tokens: int = 0
    hit_tokens: int = 0


class BlockManager:
    """Owns `num_blocks` blocks of `block_size` token rows each; `prefix_caching` turns on
    reuse of full blocks across sequences (see the module docstring)."""

    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = False) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.prefix_caching = prefix_caching
        self._ref = [0] * num_blocks
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))  # head = next out
        self._key_of: dict[int, bytes] = {}  # cached block -> its key
        self._block_of: dict[bytes, int] = {}  # key -> cached block
        self.counters = PrefixCacheCounters()

    @property
    def num_free(self) -> int:
        """Blocks no sequence holds (cached ones included: they are evictable)."""
        return len(self._free)

    @property
    def num_cached_free(self) -> int:
        """Free blocks that still hold a cached prefix."""
        return sum(1 for b in self._key_of if self._ref[b] == 0)

    @property
    def num_cached(self) -> int:
        """Blocks registered in the prefix cache (held or free)."""
        return len(self._key_of)

    def blocks_needed(self, table: list[int], num_tokens: int) -> int:
        """Extra blocks a table needs to hold `num_tokens` tokens."""
        return max(0, -(-num_tokens // self.block_size) - len(table))

    def can_grow(self, table: list[int], num_tokens: int) -> bool:
        return self.blocks_needed(table, num_tokens) <= len(self._free)

    def _take_free(self) -> int:
        block, _ = self._free.popitem(last=False)
        key = self._key_of.pop(block, None)
        if key is not None:  # evict the cached prefix this block held
            del self._block_of[key]
        self._ref[block] = 1
        return block

    def grow(self, table: list[int], num_tokens: int) -> None:
        """Append blocks to `table` (in place) until it holds `num_tokens` tokens."""
        need = self.blocks_needed(table, num_tokens)
        if need > len(self._free):
            raise ResourceExhaustedError("out of KV-cache blocks")
        for _ in range(need):
            table.append(self._take_free())

    def free(self, table: list[int]) -> list[int]:
        """Drop `table`'s reference on each of its blocks and empty it; returns the blocks that
        became free. Blocks are released last first, so a sequence's tail (the least shared part
        of its prefix) is evicted before its head."""
        released = []
        for block in reversed(table):
            self._ref[block] -= 1
            if self._ref[block] == 0:
                self._free[block] = None
                if block not in self._key_of:
                    self._free.move_to_end(block, last=False)  # nothing cached: hand out first
                released.append(block)
        table.clear()
        return released

    def discard(self, table: list[int]) -> list[int]:
        """Like `free`, but blocks this table held alone also leave the prefix cache (their KV
        must not be reused, e.g. after non-finite values); returns the blocks that became free."""
        for block in table:
            if self._ref[block] == 1:
                self._uncache(block)
        return self.free(table)

    def _uncache(self, block: int) -> None:
        key = self._key_of.pop(block, None)
        if key is not None:
            del self._block_of[key]

    def reset_cache(self) -> None:
        """Forget every cached prefix (e.g. after the base weights changed)."""
        self._key_of.clear()
        self._block_of.clear()

    # ---- prefix caching ----

    def match(self, tokens: list[int], salt: str, keys: list[bytes]) -> list[int]:
        """Cached blocks holding the longest prefix of `tokens` (full blocks only, the last
        token never included) under `salt`; takes a reference on each. `keys` (empty on entry)
        receives the chain keys of the matched blocks. Give them back with `free` if the
        sequence is not admitted after all."""
        if not self.prefix_caching:
            return []
        bs = self.block_size
        parent = root_key(salt)
        found: list[int] = []
        for i in range((len(tokens) - 1) // bs):
            key = block_key(parent, tokens[i * bs : (i + 1) * bs])
            block = self._block_of.get(key)
            if block is None:
                break
            found.append(block)
            keys.append(key)
            parent = key
        for block in found:
            if self._ref[block] == 0:
                del self._free[block]
            self._ref[block] += 1
        return found

    def record_lookup(self, num_tokens: int, hit_tokens: int) -> None:
        """Count one admitted sequence's lookup: `num_tokens` looked up, `hit_tokens` reused."""
        c = self.counters
        c.queries += 1
        c.query_tokens += num_tokens
        c.hits += hit_tokens > 0
        c.hit_tokens += hit_tokens

    def register(self, table: list[int], tokens: list[int], num_computed: int, salt: str,
                 keys: list[bytes]) -> None:
        """Register the full, computed blocks of a sequence not registered yet. `keys` holds the
        chain keys of its first blocks (extended in place). A block whose key is already cached
        (another sequence computed the same prefix) stays private."""
        if not self.prefix_caching:
            return
        bs = self.block_size
        full = num_computed // bs
        parent = keys[-1] if keys else root_key(salt)
        for i in range(len(keys), full):
            key = block_key(parent, tokens[i * bs : (i + 1) * bs])
            keys.append(key)
            block = table[i]
            if key not in self._block_of and block not in self._key_of:
                self._block_of[key] = block
                self._key_of[block] = key
            parent = key
