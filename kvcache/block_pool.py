"""The pool of KV blocks: ids, reference counts, an LRU free list and the prefix-cache hash index.

A block is in exactly one of two states:

    ref_count > 0   in use by one or more requests (shared prefix blocks have ref_count > 1)
    ref_count == 0  in the free list; if it still carries a hash it is a *cached* free block that a
                    prefix lookup can revive until allocation evicts it (lazy eviction)

The free list is ordered: blocks freed last are reused last, so recently used prefixes survive longest.
Which free blocks an allocation takes is the allocation strategy's choice (kvcache/allocation.py).

A hash is only an index: a cached block also records its tokens and its parent (the block before it
in the sequence that published it, with that block's generation, which changes whenever the block is
handed out afresh). A lookup serves a block only if its tokens and its parent match, so a hash
collision can never serve another prompt's KV: by induction from the first block, every block of a
hit holds exactly the KV of the looked-up prefix.

This module never touches tensors: a block id indexes the KV tensors (kvcache/layout.py).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

from kvcache.allocation import AllocationStrategy, LruBlocks

Parent = tuple[int, int] | None  # (block id, its generation) of the previous block; None for the first


class BlockPool:
    def __init__(self, num_blocks: int, enable_prefix_caching: bool = True,
                 strategy: AllocationStrategy | None = None) -> None:
        if num_blocks < 1:
            raise ValueError(f"the KV pool needs at least one block, got {num_blocks}: raise the KV "
                             "memory budget (--kv-cache-memory-bytes) or lower --block-size")
        self.num_blocks = num_blocks
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.strategy = strategy or LruBlocks()
        self.strategy.attach(num_blocks)
        self.block_hashes: list[int | None] = [None] * num_blocks
        self.hash_to_block: dict[int, int] = {}
        # of cached blocks: their tokens and parent, checked on every lookup
        self.block_tokens: list[tuple[int, ...] | None] = [None] * num_blocks
        self.block_parents: list[Parent] = [None] * num_blocks
        self.generations = [0] * num_blocks
        self.num_hash_collisions = 0  # lookups whose hash matched a block holding other tokens
        # block id -> None; insertion order is LRU order (head is evicted first)
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))

    # ---- queries (no mutation) ----
    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        return 1.0 - len(self._free) / self.num_blocks

    def lookup(self, block_hash: int, token_ids: Sequence[int], parent: Parent) -> int | None:
        """The cached block (in use or free) holding exactly these tokens after `parent`, found by
        their hash. Mutates nothing but the collision counter."""
        if not self.enable_prefix_caching:
            return None
        block_id = self.hash_to_block.get(block_hash)
        if block_id is None:
            return None
        if self.block_tokens[block_id] != tuple(token_ids) or self.block_parents[block_id] != parent:
            self.num_hash_collisions += 1
            return None
        return block_id

    def parent_of(self, block_id: int) -> Parent:
        """The parent key a child of this block records."""
        return (block_id, self.generations[block_id])

    def num_free_among(self, block_ids: list[int]) -> int:
        """How many of these (cached) blocks sit in the free list, i.e. would be revived by touch()."""
        return sum(1 for b in block_ids if self.ref_counts[b] == 0)

    # ---- mutation ----
    def allocate(self, num_blocks: int, after: int | None = None) -> list[int]:
        """Take `num_blocks` free blocks (which: the allocation strategy's choice; `after`: the last
        block the requester holds), evicting their cached hashes."""
        if num_blocks > len(self._free):
            raise RuntimeError(f"allocate({num_blocks}) with only {len(self._free)} free blocks; "
                               "callers must check can_allocate first")
        if num_blocks == 0:
            return []
        block_ids = self.strategy.take(self._free, num_blocks, after)
        for block_id in block_ids:
            self._evict(block_id)
            self.generations[block_id] += 1  # new contents: children recorded against it no longer match
            self.ref_counts[block_id] = 1
        return block_ids

    def touch(self, block_ids: list[int]) -> None:
        """Add a reference to each (cached) block, reviving it from the free list if needed."""
        revived = []
        for block_id in block_ids:
            if self.ref_counts[block_id] == 0:
                del self._free[block_id]
                revived.append(block_id)
            self.ref_counts[block_id] += 1
        if revived:
            self.strategy.taken(revived)

    def free(self, block_ids: list[int]) -> None:
        """Drop one reference from each block. Pass a request's blocks tail first so that, among
        equally old blocks, the end of a sequence is evicted before its (more shareable) prefix."""
        returned = []
        for block_id in block_ids:
            if self.ref_counts[block_id] <= 0:
                raise RuntimeError(f"double free of KV block {block_id}")
            self.ref_counts[block_id] -= 1
            if self.ref_counts[block_id] == 0:
                self._free[block_id] = None
                returned.append(block_id)
        if returned:
            self.strategy.freed(returned)

    def cache_block(self, block_id: int, block_hash: int, token_ids: Sequence[int], parent: Parent) -> None:
        """Publish a full, computed block under its chained hash, with its tokens and parent. The
        first block published under a hash stays the canonical one; a duplicate keeps serving its owner
        and is simply not indexed."""
        if not self.enable_prefix_caching or self.block_hashes[block_id] is not None:
            return
        if block_hash in self.hash_to_block:
            return
        self.block_hashes[block_id] = block_hash
        self.hash_to_block[block_hash] = block_id
        self.block_tokens[block_id] = tuple(token_ids)
        self.block_parents[block_id] = parent

    def evict(self, block_ids: list[int]) -> None:
        """Drop these blocks' prefix hashes (what they hold can no longer be trusted)."""
        for block_id in block_ids:
            self._evict(block_id)

    def reset_prefix_cache(self) -> None:
        for block_id, block_hash in enumerate(self.block_hashes):
            if block_hash is not None:
                self._evict(block_id)

    def _evict(self, block_id: int) -> None:
        block_hash = self.block_hashes[block_id]
        if block_hash is not None:
            self.block_hashes[block_id] = None
            self.block_tokens[block_id] = None
            self.block_parents[block_id] = None
            if self.hash_to_block.get(block_hash) == block_id:
                del self.hash_to_block[block_hash]

    def check_integrity(self, expected_refs: dict[int, int] | None = None) -> None:
        """Raise AssertionError if the pool's invariants do not hold.

        expected_refs: block id -> references held by live requests; when given, every block's
        ref count must equal it (blocks absent from the map must be free)."""
        free = set(self._free)
        assert len(free) == len(self._free)
        for block_id in range(self.num_blocks):
            refs = self.ref_counts[block_id]
            assert refs >= 0, f"block {block_id} has negative ref count {refs}"
            assert (refs == 0) == (block_id in free), \
                f"block {block_id}: ref count {refs} but in free list={block_id in free}"
            if expected_refs is not None:
                want = expected_refs.get(block_id, 0)
                assert refs == want, f"block {block_id}: ref count {refs}, live requests hold {want}"
        self.strategy.check(free)
        for block_hash, block_id in self.hash_to_block.items():
            assert self.block_hashes[block_id] == block_hash, f"hash index out of sync at {block_id}"
            assert self.block_tokens[block_id] is not None, f"cached block {block_id} has no tokens"
