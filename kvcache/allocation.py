"""Block allocation strategies: which free blocks a request gets.

The pool keeps its free blocks in LRU order (head: freed longest ago, evicted first). A strategy takes
`num_blocks` ids out of that order; `after` is the last block the request holds already (None for its
first allocation). The pool tells the strategy of every block that leaves the free list by other means
(`taken`: a cached block revived) and of every block that returns to it (`freed`).

- `LruBlocks` takes them one by one from the head, which keeps recently freed prefixes cached longest.
  A request's blocks end up scattered, so a swap copies them one block at a time.
- `BlockGroups` (FastSwitch's block groups): the pool is cut into groups of `group_size` consecutive
  blocks. A request's next block continues its last one when that id is free; otherwise it starts in a
  group whose blocks are all free (the one that became whole longest ago), and grows through it. A swap
  then copies one span per run per layer instead of one per block. A group is split when a request
  takes part of it (its other blocks stay free, for that request's growth or, when no whole group is
  left, for anyone); it is whole again, coalesced, when its last block comes back. Without a whole
  group, blocks come from the LRU head as with `LruBlocks`.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Protocol


class AllocationStrategy(Protocol):
    name: str

    def take(self, free: OrderedDict[int, None], num_blocks: int, after: int | None = None) -> list[int]:
        """Remove and return num_blocks ids from `free` (the caller checked there are enough)."""

    def taken(self, block_ids: list[int]) -> None:
        """These blocks left the free list outside take() (cached blocks revived)."""

    def freed(self, block_ids: list[int]) -> None:
        """These blocks are back in the free list."""

    def attach(self, num_blocks: int) -> None:
        """Called by the pool once, every block free."""

    def check(self, free: set[int]) -> None:
        """AssertionError unless what the strategy tracks matches the pool's free list."""


class LruBlocks:
    """Single blocks, least recently freed first."""
    name = "lru"

    def attach(self, num_blocks: int) -> None:
        pass

    def check(self, free: set[int]) -> None:
        pass

    def take(self, free: OrderedDict[int, None], num_blocks: int, after: int | None = None) -> list[int]:
        return [free.popitem(last=False)[0] for _ in range(num_blocks)]

    def taken(self, block_ids: list[int]) -> None:
        pass

    def freed(self, block_ids: list[int]) -> None:
        pass


class BlockGroups:
    """Groups of `group_size` consecutive blocks over a pool of `num_blocks` (set by the pool)."""
    name = "groups"

    def __init__(self, group_size: int = 16) -> None:
        if group_size < 1:
            raise ValueError(f"block group size must be at least 1, got {group_size}")
        self.group_size = group_size
        self.num_blocks = 0

    def attach(self, num_blocks: int) -> None:
        size = self.group_size
        self.num_blocks = num_blocks
        self._free_count = [min(size, num_blocks - g * size) for g in range(-(-num_blocks // size))]
        self._whole: OrderedDict[int, None] = OrderedDict((g, None) for g in range(len(self._free_count)))

    @property
    def num_whole_groups(self) -> int:
        return len(self._whole)

    def take(self, free: OrderedDict[int, None], num_blocks: int, after: int | None = None) -> list[int]:
        taken: list[int] = []
        if after is not None:
            taken += _take_run(free, after + 1, num_blocks)
            self.taken(taken)
        while len(taken) < num_blocks:
            wanted = num_blocks - len(taken)
            if self._whole:
                run = _take_run(free, next(iter(self._whole)) * self.group_size, wanted)
            else:
                run = [free.popitem(last=False)[0] for _ in range(wanted)]
            self.taken(run)  # (the group leaves the whole list before the next pick)
            taken += run
        return taken

    def taken(self, block_ids: list[int]) -> None:
        size, counts, whole = self.group_size, self._free_count, self._whole
        for block_id in block_ids:
            group = block_id // size
            counts[group] -= 1
            whole.pop(group, None)

    def check(self, free: set[int]) -> None:
        size = self.group_size
        for group, count in enumerate(self._free_count):
            ids = range(group * size, min((group + 1) * size, self.num_blocks))
            actual = sum(1 for b in ids if b in free)
            assert count == actual, f"block group {group}: counted {count} free blocks, {actual} are"
            assert (group in self._whole) == (actual == len(ids)), f"block group {group}: whole list out of sync"

    def freed(self, block_ids: list[int]) -> None:
        size, counts = self.group_size, self._free_count
        for block_id in block_ids:
            group = block_id // size
            counts[group] += 1
            if counts[group] == min(size, self.num_blocks - group * size):
                self._whole[group] = None  # coalesced: whole again, last in line


def _take_run(free: OrderedDict[int, None], start: int, limit: int) -> list[int]:
    """Consecutive free ids from `start`, at most `limit` of them, removed from `free`."""
    run = []
    block_id = start
    while len(run) < limit and block_id in free:
        del free[block_id]
        run.append(block_id)
        block_id += 1
    return run


STRATEGIES = {"lru": LruBlocks, "groups": BlockGroups}


def make_strategy(name: str) -> AllocationStrategy:
    if name not in STRATEGIES:
        raise ValueError(f"--block-allocation must be one of {', '.join(STRATEGIES)}, got {name!r}")
    return STRATEGIES[name]()


def count_runs(block_ids: list[int]) -> int:
    """How many runs of consecutive ids a block table has (a swap's copies per layer and K/V half)."""
    return sum(1 for i, b in enumerate(block_ids) if i == 0 or b != block_ids[i - 1] + 1)
