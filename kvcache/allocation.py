"""Block allocation strategies: which free blocks a request gets.

The pool keeps its free blocks in LRU order (head: freed longest ago, evicted first). A strategy takes
`num_blocks` ids out of that order. `LruBlocks` takes them one by one from the head, which keeps
recently freed prefixes cached longest. A strategy handing out contiguous runs (block groups, so a
swap copies one span per group instead of one block at a time) plugs in here.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Protocol


class AllocationStrategy(Protocol):
    def take(self, free: OrderedDict[int, None], num_blocks: int) -> list[int]:
        """Remove and return num_blocks ids from `free` (the caller checked there are enough)."""


class LruBlocks:
    """Single blocks, least recently freed first."""

    def take(self, free: OrderedDict[int, None], num_blocks: int) -> list[int]:
        return [free.popitem(last=False)[0] for _ in range(num_blocks)]
