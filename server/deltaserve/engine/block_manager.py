"""Paged KV-cache block allocation: fixed-size blocks handed out on demand."""

from __future__ import annotations

from collections import deque

from deltaserve.errors import ResourceExhaustedError


class BlockManager:
    """Owns the free list of `num_blocks` blocks of `block_size` token rows each."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def blocks_needed(self, table: list[int], num_tokens: int) -> int:
        """Extra blocks a table needs to hold `num_tokens` tokens."""
        return max(0, -(-num_tokens // self.block_size) - len(table))

    def can_grow(self, table: list[int], num_tokens: int) -> bool:
        return self.blocks_needed(table, num_tokens) <= len(self._free)

    def grow(self, table: list[int], num_tokens: int) -> None:
        """Append blocks to `table` (in place) until it holds `num_tokens` tokens."""
        need = self.blocks_needed(table, num_tokens)
        if need > len(self._free):
            raise ResourceExhaustedError("out of KV-cache blocks")
        for _ in range(need):
            table.append(self._free.popleft())

    def free(self, table: list[int]) -> None:
        """Return every block of `table` and empty it."""
        self._free.extend(table)
        table.clear()
