"""Block allocation strategies (kvcache/allocation.py): block groups hand out runs of consecutive ids,
split and coalesce without bookkeeping, and keep the pool's invariants under churn."""
import random

import pytest

from kvcache.allocation import BlockGroups, LruBlocks, count_runs, make_strategy
from kvcache.block_pool import BlockPool
from kvcache.kv_manager import KVCacheManager


def _grow_interleaved(strategy, num_requests=6, tokens=64, block_size=4, num_blocks=128):
    """Requests growing a token at a time side by side, as decodes do: their blocks interleave in time."""
    kv = KVCacheManager(BlockPool(num_blocks, False, strategy), block_size)
    for n in range(1, tokens + 1):
        for r in range(num_requests):
            kv.allocate(f"r{r}", n)
    return kv


def test_groups_keep_a_requests_blocks_in_runs_when_growth_interleaves():
    lru = _grow_interleaved(LruBlocks())
    groups = _grow_interleaved(BlockGroups(group_size=8))
    runs_lru = [count_runs(lru.block_ids(f"r{r}")) for r in range(6)]
    runs_groups = [count_runs(groups.block_ids(f"r{r}")) for r in range(6)]
    assert all(len(lru.block_ids(f"r{r}")) == len(groups.block_ids(f"r{r}")) == 16 for r in range(6))
    assert sum(runs_lru) == 6 * 16  # LRU hands the interleaved requests alternate ids: one run per block
    assert all(runs <= 2 for runs in runs_groups), runs_groups  # 16 blocks in groups of 8
    groups.check_integrity()


def test_a_request_splits_a_group_and_its_blocks_coalesce_when_freed():
    kv = KVCacheManager(BlockPool(16, False, BlockGroups(group_size=4)), 1)
    strategy = kv.pool.strategy
    assert strategy.num_whole_groups == 4
    kv.allocate("a", 2)  # group 0 split: blocks 0-1 taken, 2-3 left for a to grow into
    kv.allocate("b", 2)  # a whole group: 4-5
    assert kv.block_ids("a") == [0, 1] and kv.block_ids("b") == [4, 5] and strategy.num_whole_groups == 2
    kv.allocate("a", 4)
    assert kv.block_ids("a") == [0, 1, 2, 3]
    kv.allocate("a", 6)  # 4 is b's: a new run in the next whole group
    assert kv.block_ids("a") == [0, 1, 2, 3, 8, 9] and count_runs(kv.block_ids("a")) == 2
    kv.check_integrity()
    kv.free("a")
    kv.free("b")
    assert strategy.num_whole_groups == 4  # coalesced
    kv.allocate("big", 16)
    assert count_runs(kv.block_ids("big")) <= 4 and strategy.num_whole_groups == 0
    kv.check_integrity()


def test_without_a_whole_group_blocks_come_from_the_lru_head():
    kv = KVCacheManager(BlockPool(8, False, BlockGroups(group_size=4)), 1)
    kv.allocate("a", 1)
    kv.allocate("b", 1)  # both groups split
    kv.allocate("c", 3)
    assert len(set(kv.block_ids("c")) | {0, 4}) == 5
    kv.check_integrity()


@pytest.mark.parametrize("name", ["lru", "groups"])
def test_strategies_keep_the_pool_consistent_under_churn(name):
    rng = random.Random(7)
    pool = BlockPool(64, True, make_strategy(name))
    kv = KVCacheManager(pool, 4)
    live: dict[str, int] = {}
    for i in range(2000):
        if live and (rng.random() < 0.3 or pool.num_free_blocks < 4):
            rid = rng.choice(sorted(live))
            kv.free(rid)
            del live[rid]
        else:
            rid = f"q{i}"
            tokens = rng.randint(1, 12)
            if kv.can_allocate(rid, tokens):
                kv.allocate(rid, tokens)
                live[rid] = tokens
        for rid in list(live)[:3]:  # some grow
            if kv.can_allocate(rid, live[rid] + 4):
                live[rid] += 4
                kv.allocate(rid, live[rid])
        kv.check_integrity()
    blocks = [b for rid in live for b in kv.block_ids(rid)]
    assert len(blocks) == len(set(blocks)) == pool.num_blocks - pool.num_free_blocks


def test_unknown_strategy_names_the_choices():
    with pytest.raises(ValueError, match="--block-allocation must be one of lru, groups"):
        make_strategy("buddy")
    with pytest.raises(ValueError, match="group size must be at least 1"):
        BlockGroups(group_size=0)
