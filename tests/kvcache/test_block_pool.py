import random

import pytest

from kvcache.block_pool import BlockPool
from kvcache.kv_manager import KVCacheManager

TOKENS = (1, 2, 3, 4)


def test_allocate_free_roundtrip():
    pool = BlockPool(8)
    a = pool.allocate(3)
    b = pool.allocate(5)
    assert sorted(a + b) == list(range(8))
    assert pool.num_free_blocks == 0
    with pytest.raises(RuntimeError):
        pool.allocate(1)
    pool.free(a)
    assert pool.num_free_blocks == 3
    pool.check_integrity({x: 1 for x in b})
    with pytest.raises(RuntimeError, match="double free"):
        pool.free([a[0]])


def test_touch_revives_cached_block_and_lru_order():
    pool = BlockPool(4)
    blocks = pool.allocate(2)
    pool.cache_block(blocks[0], 111, TOKENS, None)
    pool.free(blocks)
    assert pool.lookup(111, TOKENS, None) == blocks[0]
    pool.touch([blocks[0]])
    assert pool.ref_counts[blocks[0]] == 1 and pool.num_free_blocks == 3
    pool.free([blocks[0]])
    # freed last -> evicted last: allocating 3 blocks leaves the cached block alone
    pool.allocate(3)
    assert pool.lookup(111, TOKENS, None) == blocks[0]
    pool.allocate(1)
    assert pool.lookup(111, TOKENS, None) is None  # evicted when reused


def test_integrity_detects_corruption():
    pool = BlockPool(4)
    blocks = pool.allocate(2)
    pool.ref_counts[blocks[0]] = 0  # corrupt
    with pytest.raises(AssertionError):
        pool.check_integrity()


def test_prefix_lookup_leaves_one_token_and_shares_blocks():
    kv = KVCacheManager(BlockPool(16), block_size=4)
    prompt = list(range(10))  # 2 full blocks + 2 tokens
    assert kv.lookup_prefix(prompt) == []
    kv.allocate("a", len(prompt))
    kv.cache_blocks("a", prompt, num_computed_tokens=10)
    hit = kv.lookup_prefix(prompt)
    assert hit == kv.block_ids("a")[:2]
    # exactly two full blocks: only the first may be reused (one token must be computed)
    assert kv.lookup_prefix(prompt[:8]) == kv.block_ids("a")[:1]
    # a different first block breaks the chain
    assert kv.lookup_prefix([99] + prompt[1:]) == []
    assert kv.can_allocate("b", 12, hit)
    kv.allocate("b", 12, hit)
    assert kv.block_ids("b")[:2] == hit
    assert kv.pool.ref_counts[hit[0]] == 2
    kv.check_integrity()
    kv.free("a")
    kv.free("b")
    kv.check_integrity()
    assert kv.pool.num_free_blocks == 16


def test_can_allocate_counts_revived_blocks():
    kv = KVCacheManager(BlockPool(3), block_size=2)
    kv.allocate("a", 4)
    kv.cache_blocks("a", [1, 2, 3, 4], 4)
    kv.free("a")
    hit = kv.lookup_prefix([1, 2, 3, 4, 5])
    assert len(hit) == 2
    # 3 blocks total: reviving 2 cached free blocks leaves one for the new tokens
    assert kv.can_allocate("b", 6, hit)
    assert not kv.can_allocate("b", 8, hit)


def test_random_scenario_no_leaks():
    rng = random.Random(0)
    kv = KVCacheManager(BlockPool(64), block_size=4)
    live: dict[str, list[int]] = {}
    prefixes = [[rng.randrange(50) for _ in range(12)] for _ in range(3)]
    for step in range(2000):
        if live and rng.random() < 0.4:
            rid = rng.choice(list(live))
            kv.free(rid)
            del live[rid]
        else:
            rid = f"r{step}"
            tokens = rng.choice(prefixes) + [rng.randrange(50) for _ in range(rng.randrange(1, 20))]
            hit = kv.lookup_prefix(tokens)
            if not kv.can_allocate(rid, len(tokens), hit):
                continue
            kv.allocate(rid, len(tokens), hit)
            kv.cache_blocks(rid, tokens, len(tokens))
            live[rid] = tokens
        kv.check_integrity()
    for rid in list(live):
        kv.free(rid)
    kv.check_integrity()
    assert kv.pool.num_free_blocks == 64


def test_a_hash_collision_never_serves_another_prompts_blocks(monkeypatch):
    """Every block hashes alike: the index finds a block for any prefix, and the token and parent
    checks must refuse each one that holds other tokens or follows another parent."""
    import kvcache.kv_manager as kv_manager
    monkeypatch.setattr(kv_manager, "hash", lambda value: 42, raising=False)
    kv = KVCacheManager(BlockPool(16), block_size=4)
    prompt_a = [1, 2, 3, 4, 5, 6, 7, 8, 9]
    kv.allocate("a", len(prompt_a))
    kv.cache_blocks("a", prompt_a, len(prompt_a))
    assert len(kv.pool.hash_to_block) == 1  # every block hashed alike: only the first is indexed
    assert kv.lookup_prefix(prompt_a) == kv.block_ids("a")[:1]  # its own prefix still hits
    assert kv.lookup_prefix([9, 9, 9, 9] + prompt_a[4:]) == []  # same hash, other tokens: a miss
    assert kv.pool.num_hash_collisions >= 1


def _children_of_3_4_collide(monkeypatch):
    """Make every block holding (3, 4) hash alike, whatever its parent: a forced collision."""
    import builtins

    import kvcache.kv_manager as kv_manager
    monkeypatch.setattr(kv_manager, "hash", lambda value: 77 if value[1] == (3, 4) else builtins.hash(value),
                        raising=False)


def test_a_colliding_child_of_another_parent_is_not_served(monkeypatch):
    _children_of_3_4_collide(monkeypatch)
    kv = KVCacheManager(BlockPool(8), block_size=2)
    kv.allocate("r", 4)
    kv.cache_blocks("r", [9, 9, 3, 4], 4)  # (3, 4) after (9, 9): its KV attended to 9, 9
    kv.allocate("s", 3)
    kv.cache_blocks("s", [1, 2, 0], 3)  # (1, 2) cached in another block
    assert kv.lookup_prefix([1, 2, 3, 4, 5]) == kv.block_ids("s")[:1]  # the (3, 4) block is refused
    assert kv.lookup_prefix([9, 9, 3, 4, 5]) == kv.block_ids("r")  # its own prefix still hits


def test_a_child_whose_parent_block_was_rewritten_is_not_served(monkeypatch):
    _children_of_3_4_collide(monkeypatch)
    kv = KVCacheManager(BlockPool(4), block_size=2)
    kv.allocate("r", 4)
    kv.cache_blocks("r", [9, 9, 3, 4], 4)
    parent, child = kv.block_ids("r")
    kv.free("r")
    kv.pool._free.move_to_end(parent, last=False)  # the parent block is reused first ...
    kv.allocate("s", 3)
    assert kv.block_ids("s")[0] == parent
    kv.cache_blocks("s", [1, 2, 0], 3)  # ... and now holds (1, 2): same block id, new contents
    assert kv.pool.block_hashes[child] is not None  # the child is still indexed
    assert kv.lookup_prefix([1, 2, 3, 4, 5]) == [parent]
