"""KV transfer between different tensor-parallel plans, over real gRPC in one process: each receiving
rank must end up with exactly its KV heads of every transferred block, bit for bit, and be sent exactly
what it owns."""
from __future__ import annotations

import threading
import zlib

import pytest
import torch

from kvcache.layout import KVCacheLayout, even_partition
from kvcache.transfer import KVReceiver, KVSender, ReceiverServer, TransferConfig
from kvcache.transfer.layout import IncompatibleLayoutError, KVLayout
from kvcache.transfer.plans import HeadCopy, head_routes

NUM_LAYERS, BLOCK_SIZE, HEAD_DIM, NUM_BLOCKS = 3, 16, 32, 24


def layout(total_heads: int, tp: int, fingerprint: str = "m", pp: int | tuple[int, ...] = 1) -> KVLayout:
    """pp: a number of stages (the even split) or the stages' layers (--pp-layer-partition)."""
    cache = KVCacheLayout.for_model(NUM_LAYERS, total_heads, HEAD_DIM, BLOCK_SIZE, "float32", tp, 0)
    partition = pp if isinstance(pp, tuple) else even_partition(NUM_LAYERS, pp) if pp > 1 else ()
    return KVLayout.from_cache_layout(cache, fingerprint, partition)


def rank_heads(kv: KVLayout, rank: int) -> range:
    return range(*kv.rank_cache_layout(rank).kv_head_range())


# ---- the routes ----

@pytest.mark.parametrize("heads, src_tp, dst_tp", [(h, s, d) for h in (1, 2, 4) for s in (1, 2, 4, 8)
                                                   for d in (1, 2, 4, 8)])
def test_every_receiving_rank_gets_exactly_its_heads_from_a_rank_that_holds_them(heads, src_tp, dst_tp):
    src, dst = layout(heads, src_tp), layout(heads, dst_tp)
    routes = head_routes(src, dst)
    assert len(routes) == dst_tp
    for rank, copies in enumerate(routes):
        filled = []
        for copy in copies:
            held = rank_heads(src, copy.src_rank)
            for i in range(copy.num_heads):
                filled.append((copy.dst_head + i, held[copy.src_head + i]))
        assert sorted(filled) == list(enumerate(rank_heads(dst, rank)))


def test_routes_of_fan_in_and_fan_out():
    assert head_routes(layout(4, 2), layout(4, 1)) == [(HeadCopy(0, 0, 0, 2), HeadCopy(1, 0, 2, 2))]
    assert head_routes(layout(2, 1), layout(2, 4)) == [(HeadCopy(0, 0, 0, 1),), (HeadCopy(0, 0, 0, 1),),
                                                       (HeadCopy(0, 1, 0, 1),), (HeadCopy(0, 1, 0, 1),)]
    assert head_routes(layout(2, 4), layout(2, 1)) == [(HeadCopy(0, 0, 0, 1), HeadCopy(2, 0, 1, 1))]
    assert head_routes(layout(4, 2), layout(4, 2)) == [(HeadCopy(0, 0, 0, 2),), (HeadCopy(1, 0, 0, 2),)]


def test_a_different_model_is_refused_but_a_different_plan_is_not():
    layout(4, 2).check_compatible(layout(4, 1))
    with pytest.raises(IncompatibleLayoutError, match="total_kv_heads: ours=4 theirs=2"):
        layout(4, 2).check_compatible(layout(2, 2))
    with pytest.raises(ValueError, match="KV heads in all"):
        head_routes(layout(4, 1), layout(2, 1))


# ---- end to end over gRPC ----

class Allocator:
    """Every other block of a free list, so the destination block table has holes."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.free = list(range(NUM_BLOCKS))
        self.owned: dict[str, list[int]] = {}
        self.completed: list[str] = []

    def reserve(self, request_id, num_tokens):
        n = -(-num_tokens // BLOCK_SIZE)
        with self.lock:
            taken = self.free[1:2 * n:2]
            if len(taken) < n:
                return None
            for b in taken:
                self.free.remove(b)
            self.owned[request_id] = taken
            return list(taken)

    def release(self, request_id):
        with self.lock:
            self.free += self.owned.pop(request_id)

    def on_transfer_complete(self, request_id, first_token_id=None):
        self.completed.append(request_id)

    def on_transfer_failed(self, request_id, reason):
        pass


def rank_caches(whole: torch.Tensor, kv: KVLayout) -> list[torch.Tensor]:
    """Each rank's cache: its stage's layers and its heads of the whole model's KV [L, 2, B, bs, H, D]."""
    caches = []
    for rank in range(kv.world_size):
        heads, layers = rank_heads(kv, rank % kv.tp_size), slice(*kv.rank_layers(rank))
        caches.append(whole[layers, :, :, :, heads.start:heads.stop].contiguous())
    return caches


# (heads, prefill tp, decode tp, prefill pp, decode pp); 3 layers: two stages hold 2 and 1 layers, three 1 each;
# a tuple: the stages' layers (--pp-layer-partition), the two sides split differently
PLANS = [(4, 2, 1, 1, 1), (4, 1, 2, 1, 1), (4, 2, 2, 1, 1), (4, 4, 1, 1, 1), (4, 1, 4, 1, 1), (2, 1, 4, 1, 1),
         (2, 4, 1, 1, 1), (2, 4, 2, 1, 1), (2, 2, 4, 1, 1), (1, 2, 1, 1, 1),
         (4, 1, 2, 2, 1), (4, 2, 1, 1, 2), (4, 1, 1, 2, 3), (4, 2, 2, 2, 2), (2, 1, 4, 3, 1), (4, 2, 1, 3, 2),
         (4, 1, 1, (1, 2), (2, 1)), (4, 2, 1, (1, 2), 3), (2, 1, 2, 1, (1, 2))]


@pytest.mark.parametrize("heads, src_tp, dst_tp, src_pp, dst_pp", PLANS)
@pytest.mark.parametrize("path", ["inline", "shm", "split-blocks"])
def test_transfer_between_plans_is_bit_exact_and_sends_what_each_rank_owns(heads, src_tp, dst_tp, src_pp, dst_pp,
                                                                           path):
    torch.manual_seed(zlib.crc32(repr((heads, src_tp, dst_tp, src_pp, dst_pp)).encode()))
    src, dst = layout(heads, src_tp, pp=src_pp), layout(heads, dst_tp, pp=dst_pp)
    whole = torch.randn(NUM_LAYERS, 2, NUM_BLOCKS, BLOCK_SIZE, heads, HEAD_DIM)
    per_layer_block = dst.num_bytes_per_layer_block
    config = TransferConfig(enable_shm=path == "shm", rpc_timeout_s=10.0,
                            max_chunk_bytes=2 * per_layer_block if path == "split-blocks" else 8 << 20)
    dst_caches = [torch.zeros(dst.rank_cache_layout(r).shape(NUM_BLOCKS)) for r in range(dst.world_size)]
    allocator = Allocator()
    server = ReceiverServer(KVReceiver(dst_caches, dst, allocator, config)).start()
    released = []
    sender = KVSender(rank_caches(whole, src), src, server.address, released.append, config).connect()
    try:
        src_ids = [7, 2, 11, 5, 19]
        num_tokens = 5 * BLOCK_SIZE - 1
        handle = sender.begin("r", num_tokens, src_ids)
        handle.send_layers(0, 1)
        handle.send_layers(1, NUM_LAYERS)
        result = handle.finish(30.0)
        assert result.ok, result.reason
        dst_ids = allocator.owned["r"]
        for rank, cache in enumerate(dst_caches):
            heads_of_rank, layers = rank_heads(dst, rank % dst_tp), slice(*dst.rank_layers(rank))
            expected = whole[layers][:, :, src_ids][:, :, :, :, heads_of_rank.start:heads_of_rank.stop]
            assert torch.equal(cache[:, :, dst_ids], expected), f"rank {rank}"
            others = [b for b in range(NUM_BLOCKS) if b not in dst_ids]
            assert not cache[:, :, others].any()  # nothing written outside the reserved blocks
        owned = len(src_ids) * NUM_LAYERS * dst_tp * per_layer_block  # each layer on one stage's ranks
        assert result.num_bytes == owned
        assert sender.counters.snapshot()["num_bytes_sent"] == owned
        assert server.receiver.counters.snapshot()["num_bytes_received"] == owned
        assert allocator.completed == ["r"] and released == ["r"]
        assert sender.counters.snapshot()["num_one_sided_sent"] == 0
    finally:
        sender.close()
        server.stop(grace_s=0.5)


def test_a_chunk_for_a_rank_the_receiver_does_not_have_is_refused():
    from kvcache.transfer import wire
    from kvcache.transfer._proto import kv_transfer_pb2 as pb
    from kvcache.transfer.receiver import RpcError
    dst = layout(4, 2)
    receiver = KVReceiver([torch.zeros(NUM_LAYERS, 2, NUM_BLOCKS, BLOCK_SIZE, 2, HEAD_DIM) for _ in range(2)], dst,
                          Allocator(), TransferConfig())
    receiver.reserve(pb.ReserveRequest(request_id="r", num_tokens=BLOCK_SIZE, num_blocks=1))
    header = pb.ChunkHeader(request_id="r", layer_start=0, layer_end=1, block_start=0, block_end=1, dst_rank=2,
                            num_bytes=dst.num_bytes_per_layer_block)
    message, payload = wire.new_chunk_message(header)
    with pytest.raises(RpcError, match="rank 2 outside"):
        receiver.push_chunk(message)
    receiver.close()
