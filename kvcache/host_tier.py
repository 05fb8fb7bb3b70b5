"""The host tier's block accounting: swapped-out requests, copies kept across switches, and a second
tier of the prefix cache. No tensors here: the executor's swap worker holds the host cache and uses
these block ids (serving/kv_connector/swap.py).

A request's host table mirrors its device blocks from the first one, and `valid` says through which
token the host copy holds the request's KV:

    swap-out   the blocks past `valid` are copied (a kept copy, or blocks the host prefix cache already
               holds, are not copied again); `valid` becomes the computed tokens
    swap-in    every block of the table comes back; the table stays ("kept": a running request's
               copy, still valid for the tokens it had), so its next swap-out copies only what is new
    finish     the request's full blocks past `valid` are copied out ("offload", when the prefix
               cache is on) and the table is released: its blocks stay in the host pool under their
               prefix hashes, least recently used evicted first, so a later request with the same
               prefix (the next turn of a conversation) brings them back instead of recomputing them

Full blocks are published under the same chained hashes the device prefix cache uses
(kvcache/kv_manager.py), so a lookup verifies tokens and parents block by block, never by hash alone.
Kept copies of running requests hold host blocks; when a swap-out finds no room, they are given up,
least recently kept first (they are an optimisation, never needed for correctness).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

from kvcache.allocation import AllocationStrategy
from kvcache.block_pool import BlockPool
from kvcache.kv_manager import KVCacheManager


class HostTier:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 strategy: AllocationStrategy | None = None) -> None:
        self.pool = BlockPool(num_blocks, enable_prefix_caching, strategy)
        self.kv = KVCacheManager(self.pool, block_size)
        self.block_size = block_size
        self.valid: dict[str, int] = {}  # request -> tokens whose KV its host table holds
        self.kept: OrderedDict[str, None] = OrderedDict()  # running requests' copies, least recent first
        self.out: set[str] = set()  # requests swapped out: their host table is their only copy
        self._offloads: dict[str, list[int]] = {}  # finished requests' copies in flight: their new blocks
        self.num_prefix_hit_tokens = 0  # prompt tokens brought back from the host prefix cache
        self.num_offloaded_blocks = 0

    # ---- queries ----
    def block_ids(self, request_id: str) -> list[int]:
        return self.kv.block_ids(request_id)

    @property
    def request_ids(self) -> list[str]:
        return self.kv.request_ids

    @property
    def num_used_blocks(self) -> int:
        return self.pool.num_blocks - self.pool.num_free_blocks

    def is_offloading(self, request_id: str) -> bool:
        return request_id in self._offloads

    def lookup_prefix(self, token_ids: Sequence[int]) -> list[int]:
        """Host blocks holding the longest cached prefix of full blocks of token_ids (one token left)."""
        return self.kv.lookup_prefix(token_ids)

    # ---- moves' bookkeeping ----
    def reserve(self, request_id: str, token_ids: Sequence[int], num_tokens: int) -> tuple[int, list[int]] | None:
        """Host blocks for a swap-out of the request's first num_tokens tokens: returns (first block to
        copy, the request's host table), or None when the tier has no room even after giving up kept
        copies. Reuses the request's kept copy, or else the host prefix cache's blocks."""
        kv = self.kv
        self.kept.pop(request_id, None)  # swapping out: its copy is what it is swapped to
        self.out.add(request_id)
        fresh = not kv.block_ids(request_id)  # no table yet: start from what the host prefix cache holds

        def prefix_hits() -> list[int]:
            return kv.lookup_prefix(token_ids[:num_tokens + 1]) if fresh and num_tokens else []
        hits = prefix_hits()
        while not kv.can_allocate(request_id, num_tokens, hits):
            if not self._give_up_kept():
                return None
            hits = prefix_hits()  # a given-up copy may have served a hit
        kv.allocate(request_id, num_tokens, hits)
        if fresh:
            self.valid[request_id] = len(hits) * self.block_size
        first = self.valid.get(request_id, 0) // self.block_size
        self.valid[request_id] = num_tokens
        kv.cache_blocks(request_id, token_ids, num_tokens)  # the copies land before any read of them
        return first, list(kv.block_ids(request_id))

    def hold_prefix(self, request_id: str, hits: list[int]) -> None:
        """A new request brings host prefix blocks back (a SwapIn): hold them while it runs."""
        self.kv.allocate(request_id, len(hits) * self.block_size, hits)
        self.valid[request_id] = len(hits) * self.block_size
        self.num_prefix_hit_tokens += len(hits) * self.block_size

    def resuming(self, request_id: str) -> None:
        """Its SwapIn is planned: the device blocks will hold its KV again."""
        self.out.discard(request_id)

    def swapped_in(self, request_id: str) -> None:
        """Its SwapIn ended: the host table stays as a kept copy; unless the request was swapped out
        again before this report came (plans in flight on pipeline stages): then the table is its
        only copy, and a kept copy may be given up."""
        if self.kv.block_ids(request_id) and request_id not in self.out:
            self.kept[request_id] = None
            self.kept.move_to_end(request_id)

    def offload(self, request_id: str, token_ids: Sequence[int], num_tokens: int) -> tuple[int, list[int]] | None:
        """A finished request's full blocks, for the host prefix cache: (first block to copy, its host
        table) or None (nothing new, no room, or caching off). The table is released at once (the copy
        is ordered before any reuse of its blocks); `offload_ended` settles it."""
        num_full = num_tokens // self.block_size * self.block_size
        if not self.pool.enable_prefix_caching or num_full == 0 or self.valid.get(request_id, 0) >= num_full:
            self.release(request_id)
            return None
        reserved = self.reserve(request_id, token_ids, num_full)
        if reserved is None:
            self.release(request_id)
            return None
        first, blocks = reserved
        self._offloads[request_id] = blocks[first:]
        self.num_offloaded_blocks += len(blocks) - first
        self.release(request_id)
        return first, blocks

    def offload_ended(self, request_id: str, ok: bool) -> None:
        """A failed offload's blocks must never serve a lookup: their hashes go."""
        blocks = self._offloads.pop(request_id, [])
        if not ok:
            self.pool.evict([b for b in blocks if self.pool.ref_counts[b] == 0])

    def release(self, request_id: str, evict: bool = False) -> None:
        """The request's host table goes back to the pool; its full blocks stay cached under their
        hashes unless `evict` (what they hold cannot be trusted: a failed copy)."""
        blocks = list(self.kv.block_ids(request_id))
        self.kv.free(request_id)
        self.valid.pop(request_id, None)
        self.kept.pop(request_id, None)
        self.out.discard(request_id)
        if evict and blocks:
            self.pool.evict([b for b in blocks if self.pool.ref_counts[b] == 0])

    def _give_up_kept(self) -> bool:
        if not self.kept:
            return False
        self.release(next(iter(self.kept)))
        return True

    def check_integrity(self) -> None:
        self.kv.check_integrity()
        assert set(self.kept) <= set(self.kv.request_ids), "a kept copy without a host table"
        assert not self.kept.keys() & self.out, "a swapped-out request's only copy counted as kept"
