"""Per-request block tables on top of a BlockPool, with prefix caching.

A request's tokens map onto its blocks in order (block_size = 4 here):

    tokens   t0 t1 t2 t3 | t4 t5 t6 t7 | t8 t9
    blocks   [   b7     ] [    b2     ] [ b5 .. ]      slot(t9) = b5 * block_size + 1

Full blocks whose KV has been computed are published under a chained hash
h_i = hash((h_{i-1}, tokens of block i)), so a later request with the same prefix reuses them.
Methods named `lookup_*`, `can_*` and `num_*` never mutate.
"""
from __future__ import annotations

from typing import Sequence

from kvcache.block_pool import BlockPool

_ROOT_HASH = 0x5EED


def chain_hashes(token_ids: Sequence[int], block_size: int, num_blocks: int,
                 parent: int = _ROOT_HASH, start_block: int = 0) -> list[int]:
    hashes = []
    for i in range(start_block, start_block + num_blocks):
        parent = hash((parent, tuple(token_ids[i * block_size:(i + 1) * block_size])))
        hashes.append(parent)
    return hashes


class KVCacheManager:
    def __init__(self, pool: BlockPool, block_size: int) -> None:
        self.pool = pool
        self.block_size = block_size
        self._blocks: dict[str, list[int]] = {}
        self._hashes: dict[str, list[int]] = {}  # hashes of the request's published full blocks
        self.num_prefix_queries = 0  # prompt tokens looked up
        self.num_prefix_hits = 0  # prompt tokens found cached

    # ---- queries ----
    def block_ids(self, request_id: str) -> list[int]:
        return self._blocks.get(request_id, [])

    def num_blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def lookup_prefix(self, token_ids: Sequence[int]) -> list[int]:
        """Cached blocks covering the longest prefix of full blocks of `token_ids`. At least one token
        is always left to compute, since the last prompt token's logits are needed. Each block found
        is verified against its tokens and its parent (block_pool.py), never trusted by hash alone."""
        if not self.pool.enable_prefix_caching:
            return []
        max_blocks = (len(token_ids) - 1) // self.block_size
        found: list[int] = []
        parent = None
        for i, block_hash in enumerate(chain_hashes(token_ids, self.block_size, max_blocks)):
            block_id = self.pool.lookup(block_hash, token_ids[i * self.block_size:(i + 1) * self.block_size],
                                        parent)
            if block_id is None:
                break
            found.append(block_id)
            parent = self.pool.parent_of(block_id)
        return found

    def num_new_blocks(self, request_id: str, num_total_tokens: int, cached_block_ids: Sequence[int] = ()) -> int:
        held = len(self._blocks.get(request_id, ())) or len(cached_block_ids)
        return max(0, self.num_blocks_for(num_total_tokens) - held)

    def can_allocate(self, request_id: str, num_total_tokens: int,
                     cached_block_ids: Sequence[int] = ()) -> bool:
        """Whether the request can hold `num_total_tokens` tokens (reviving `cached_block_ids`)."""
        if not cached_block_ids:  # the common case (a running request growing), without the general sums
            needed = -(-num_total_tokens // self.block_size) - len(self._blocks.get(request_id, ()))
            return needed <= 0 or needed <= self.pool.num_free_blocks
        revived = self.pool.num_free_among(list(cached_block_ids))
        needed = self.num_new_blocks(request_id, num_total_tokens, cached_block_ids) + revived
        return needed <= self.pool.num_free_blocks

    # ---- mutation ----
    def allocate(self, request_id: str, num_total_tokens: int,
                 cached_block_ids: Sequence[int] = ()) -> list[int]:
        """Grow the request's block table to hold `num_total_tokens`; returns the block ids appended
        (the revived cached ones first on a request's first allocation). Assumes can_allocate."""
        blocks = self._blocks.get(request_id)
        if blocks is not None and -(-num_total_tokens // self.block_size) <= len(blocks):
            return []  # the common case: a decode token that fits in the last block
        appended: list[int] = []
        if blocks is None:
            blocks = self._blocks[request_id] = []
            self._hashes[request_id] = []
            if cached_block_ids:
                self.pool.touch(list(cached_block_ids))
                blocks.extend(cached_block_ids)
                appended.extend(cached_block_ids)
                self._hashes[request_id] = [self.pool.block_hashes[b] for b in cached_block_ids]
        new = self.pool.allocate(max(0, self.num_blocks_for(num_total_tokens) - len(blocks)),
                                 blocks[-1] if blocks else None)
        blocks.extend(new)
        appended.extend(new)
        return appended

    def record_prefix_lookup(self, num_prompt_tokens: int, num_cached_tokens: int) -> None:
        self.num_prefix_queries += num_prompt_tokens
        self.num_prefix_hits += num_cached_tokens

    def cache_blocks(self, request_id: str, token_ids: Sequence[int], num_computed_tokens: int) -> None:
        """Publish the request's full blocks whose KV is now computed."""
        if not self.pool.enable_prefix_caching:
            return
        hashes = self._hashes.get(request_id)
        if hashes is None:
            return
        blocks = self._blocks[request_id]
        num_full = min(num_computed_tokens // self.block_size, len(blocks))
        if num_full <= len(hashes):
            return
        parent_hash = hashes[-1] if hashes else _ROOT_HASH
        new_hashes = chain_hashes(token_ids, self.block_size, num_full - len(hashes), parent_hash, len(hashes))
        size = self.block_size
        for i, block_hash in enumerate(new_hashes, start=len(hashes)):
            parent = self.pool.parent_of(blocks[i - 1]) if i else None
            self.pool.cache_block(blocks[i], block_hash, token_ids[i * size:(i + 1) * size], parent)
        hashes.extend(new_hashes)

    def free(self, request_id: str) -> None:
        """Release every block the request holds (no-op for an unknown id)."""
        blocks = self._blocks.pop(request_id, None)
        self._hashes.pop(request_id, None)
        if blocks:
            self.pool.free(list(reversed(blocks)))

    @property
    def request_ids(self) -> list[str]:
        return list(self._blocks)

    def check_integrity(self) -> None:
        refs: dict[int, int] = {}
        for blocks in self._blocks.values():
            assert len(set(blocks)) == len(blocks), "a block appears twice in one block table"
            for block_id in blocks:
                refs[block_id] = refs.get(block_id, 0) + 1
        self.pool.check_integrity(refs)
