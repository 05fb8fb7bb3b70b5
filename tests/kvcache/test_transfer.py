"""KV transfer end to end: a real gRPC receiver in another process (spawn) with its own kv_cache.

The test process plays the prefill instance (KVSender over a random kv_cache); the receiver process
plays the decode instance and answers questions about its state over a pipe.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import threading
import time

import pytest
import torch

from kvcache.transfer import (IncompatibleLayoutError, KVLayout, KVReceiver, KVSender, ReceiverServer,
                              TransferConfig, TransferRefusedError)

pytestmark = pytest.mark.slow

NUM_LAYERS, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM = 6, 16, 2, 8
NUM_SRC_BLOCKS = 48
PIPE_TIMEOUT_S = 60.0  # generous: a loaded 2-core machine starts a torch process in seconds


def make_kv_cache(num_blocks: int, dtype: torch.dtype = torch.float32, block_size: int = BLOCK_SIZE,
                  num_kv_heads: int = NUM_KV_HEADS) -> torch.Tensor:
    return torch.zeros(NUM_LAYERS, 2, num_blocks, block_size, num_kv_heads, HEAD_DIM, dtype=dtype)


class RecordingAllocator:
    """A free list of the receiver's blocks that records every callback."""

    def __init__(self, num_blocks: int) -> None:
        self.lock = threading.Lock()
        self.free = list(range(num_blocks))[::-1]
        self.owned: dict[str, list[int]] = {}
        self.events: list[tuple] = []

    def reserve(self, request_id, num_tokens):
        num_blocks = -(-num_tokens // BLOCK_SIZE)
        with self.lock:
            if num_blocks > len(self.free):
                return None
            # every other block: the destination block table has holes too
            taken = self.free[-2 * num_blocks::2][:num_blocks] if 2 * num_blocks <= len(self.free) \
                else self.free[-num_blocks:]
            for block_id in taken:
                self.free.remove(block_id)
            self.owned[request_id] = taken
            return list(taken)

    def release(self, request_id):
        with self.lock:
            self.free.extend(self.owned.pop(request_id))
            self.events.append(("release", request_id))

    def on_transfer_complete(self, request_id, first_token_id=None):
        with self.lock:
            self.events.append(("complete", request_id))

    def on_transfer_failed(self, request_id, reason):
        with self.lock:
            self.events.append(("failed", request_id, reason))


def _receiver_main(conn, num_blocks: int, dtype: torch.dtype, config: TransferConfig, device: str = "cpu") -> None:
    """Serve a KVReceiver on 127.0.0.1:0 and answer ("state", request_ids) / ("stop",) on conn."""
    torch.set_num_threads(1)
    kv_cache = make_kv_cache(num_blocks, dtype).to(device)
    layout = KVLayout.from_kv_cache(kv_cache, "test-model")
    allocator = RecordingAllocator(num_blocks)
    server = ReceiverServer(KVReceiver(kv_cache, layout, allocator, config)).start()
    conn.send(server.address)
    try:
        while conn.poll(PIPE_TIMEOUT_S * 5):  # the parent died or forgot us: exit
            command = conn.recv()
            if command[0] == "stop":
                break
            with allocator.lock:
                blocks = {rid: kv_cache[:, :, allocator.owned[rid]].cpu()
                          for rid in command[1] if rid in allocator.owned}
                conn.send({"blocks": blocks, "events": list(allocator.events), "num_free": len(allocator.free),
                           "num_open": server.receiver.num_open, "counters": server.receiver.counters.snapshot()})
    finally:
        server.stop(grace_s=0.5)
        conn.send("stopped")


class ReceiverProcess:
    def __init__(self, num_blocks: int = 64, dtype: torch.dtype = torch.float32,
                 config: TransferConfig = TransferConfig(), device: str = "cpu") -> None:
        context = mp.get_context("spawn")
        self.conn, child_conn = context.Pipe()
        self.process = context.Process(target=_receiver_main, args=(child_conn, num_blocks, dtype, config, device),
                                       daemon=True)
        self.process.start()
        assert self.conn.poll(PIPE_TIMEOUT_S), "the receiver process did not start"
        self.address = self.conn.recv()

    def state(self, request_ids=()) -> dict:
        self.conn.send(("state", list(request_ids)))
        assert self.conn.poll(PIPE_TIMEOUT_S), "the receiver process did not answer"
        return self.conn.recv()

    def wait_for(self, predicate, timeout_s: float = 30.0) -> dict:
        deadline = time.monotonic() + timeout_s
        while True:
            state = self.state()
            if predicate(state) or time.monotonic() > deadline:
                return state
            time.sleep(0.1)

    def kill(self) -> None:
        self.process.kill()
        self.process.join(PIPE_TIMEOUT_S)

    def stop(self) -> None:
        if self.process.is_alive():
            self.conn.send(("stop",))
            self.conn.poll(PIPE_TIMEOUT_S)
        self.process.join(PIPE_TIMEOUT_S)
        if self.process.is_alive():
            self.kill()


@pytest.fixture(scope="module")
def receiver():
    process = ReceiverProcess(num_blocks=64)
    yield process
    process.stop()


def make_sender(address: str, kv_cache: torch.Tensor, released: list, **config) -> KVSender:
    config = TransferConfig(**({"rpc_timeout_s": 10.0} | config))
    layout = KVLayout.from_kv_cache(kv_cache, "test-model")
    return KVSender(kv_cache, layout, address, released.append, config).connect()


def shm_names(sender_id: str) -> list[str]:
    return [name for name in os.listdir("/dev/shm") if sender_id in name]


# (request id, number of tokens, source block ids): holes, odd lengths, a one-token request
REQUESTS = [("r-odd", 37, [40, 3, 17]),
            ("r-one", 1, [8]),
            ("r-long", 250, [1, 5, 9, 44, 13, 21, 2, 30, 31, 32, 6, 7, 46, 11, 25, 38])]
LAYER_GROUPS = [(0, 1), (1, 4), (4, NUM_LAYERS)]


@pytest.mark.parametrize("enable_shm", [False, True], ids=["grpc", "shm"])
def test_layerwise_transfer_writes_bit_exact_blocks(receiver, enable_shm):
    src = torch.randn(NUM_LAYERS, 2, NUM_SRC_BLOCKS, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM)
    released = []
    # 4 KiB chunks: the long request's layers are split by blocks, the others grouped by layers
    sender = make_sender(receiver.address, src, released, enable_shm=enable_shm, max_chunk_bytes=4096)
    try:
        assert sender.uses_shm == enable_shm
        assert shm_names(sender.sender_id) == []  # shm names are gone as soon as both sides mapped them
        handles = [sender.begin(rid, num_tokens, block_ids) for rid, num_tokens, block_ids in REQUESTS]
        for layer_start, layer_end in LAYER_GROUPS:  # as prefill finishes each group, all requests
            for handle in handles:
                handle.send_layers(layer_start, layer_end)
        results = [handle.finish(timeout_s=60.0) for handle in handles]
    finally:
        sender.close()
    assert [r.ok for r in results] == [True] * 3, results
    assert [r.num_attempts for r in results] == [1, 1, 1]
    assert sorted(released) == sorted(rid for rid, _, _ in REQUESTS)
    state = receiver.state([rid for rid, _, _ in REQUESTS])
    for rid, _, block_ids in REQUESTS:
        assert torch.equal(state["blocks"][rid], src[:, :, block_ids]), rid
        assert ("complete", rid) in state["events"]
    num_bytes = sum(len(b) for _, _, b in REQUESTS) * NUM_LAYERS * 2 * BLOCK_SIZE * NUM_KV_HEADS * HEAD_DIM * 4
    assert sender.counters.num_bytes_sent == num_bytes
    assert sender.counters.num_transfers_sent == 3 and sender.counters.num_failed == 0
    assert shm_names(sender.sender_id) == []


@pytest.mark.gpu
@pytest.mark.parametrize("enable_shm", [False, True], ids=["grpc", "shm"])
def test_gpu_caches_transfer_bit_exact_through_payloads_and_slabs(enable_shm):
    """Both caches on the GPU, the chunks through host memory (gRPC payloads or shared-memory slabs):
    gathered on the GPU into the host buffer, scattered from it on the other side."""
    receiver = ReceiverProcess(num_blocks=64, device="cuda", config=TransferConfig(one_sided=False))
    try:
        src = torch.randn(NUM_LAYERS, 2, NUM_SRC_BLOCKS, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM, device="cuda")
        released = []
        sender = make_sender(receiver.address, src, released, enable_shm=enable_shm, max_chunk_bytes=4096)
        try:
            assert sender.uses_shm == enable_shm and not sender.one_sided
            handles = [sender.begin(rid, num_tokens, block_ids) for rid, num_tokens, block_ids in REQUESTS]
            for layer_start, layer_end in LAYER_GROUPS:
                for handle in handles:
                    handle.send_layers(layer_start, layer_end)
            assert [handle.finish(timeout_s=60.0).ok for handle in handles] == [True] * 3
        finally:
            sender.close()
        state = receiver.state([rid for rid, _, _ in REQUESTS])
        for rid, _, block_ids in REQUESTS:
            assert torch.equal(state["blocks"][rid], src[:, :, block_ids].cpu()), rid
    finally:
        receiver.stop()


def test_bfloat16_transfer_is_bit_exact():
    receiver = ReceiverProcess(num_blocks=16, dtype=torch.bfloat16)
    try:
        src = torch.randn(NUM_LAYERS, 2, NUM_SRC_BLOCKS, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM).to(torch.bfloat16)
        released = []
        sender = make_sender(receiver.address, src, released, enable_shm=False)
        try:
            handle = sender.begin("bf", 40, [30, 2, 11])
            handle.send_layers(0, NUM_LAYERS)
            assert handle.finish(timeout_s=60.0).ok
        finally:
            sender.close()
        blocks = receiver.state(["bf"])["blocks"]["bf"]
        assert blocks.dtype == torch.bfloat16 and torch.equal(blocks, src[:, :, [30, 2, 11]])
    finally:
        receiver.stop()


def test_handshake_refuses_an_incompatible_peer_naming_the_fields(receiver):
    src = make_kv_cache(NUM_SRC_BLOCKS, block_size=32, num_kv_heads=4)
    with pytest.raises(IncompatibleLayoutError) as info:
        KVSender(src, KVLayout.from_kv_cache(src, "other-model"), receiver.address, lambda rid: None,
                 TransferConfig(rpc_timeout_s=10.0)).connect()
    message = str(info.value)
    assert "block_size: prefill=32 decode=16" in message
    assert "num_kv_heads: prefill=4 decode=2" in message
    assert "model_fingerprint: prefill='other-model' decode='test-model'" in message
    assert "head_dim:" not in message


def test_reserve_refused_when_the_receiver_is_full_releases_the_lease(receiver):
    src = torch.randn(NUM_LAYERS, 2, NUM_SRC_BLOCKS, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM)
    released = []
    sender = make_sender(receiver.address, src, released)
    try:
        num_free = receiver.state()["num_free"]
        too_many_tokens = (num_free + 1) * BLOCK_SIZE
        with pytest.raises(TransferRefusedError, match="no room"):
            sender.begin("r-big", too_many_tokens, [i % NUM_SRC_BLOCKS for i in range(num_free + 1)])
        assert released == ["r-big"]
        assert sender.counters.num_refused == 1
        assert receiver.state()["num_free"] == num_free  # nothing held on the decode side either
        handle = sender.begin("r-fits", BLOCK_SIZE, [4])  # backpressure is per request, not sticky
        handle.send_layers(0, NUM_LAYERS)
        assert handle.finish(timeout_s=60.0).ok
    finally:
        sender.close()


def test_receiver_killed_mid_transfer_fails_after_one_retry_and_releases_the_lease():
    receiver = ReceiverProcess(num_blocks=32)
    src = torch.randn(NUM_LAYERS, 2, NUM_SRC_BLOCKS, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM)
    released, results = [], []
    sender = make_sender(receiver.address, src, released, rpc_timeout_s=3.0, failure_policy="recompute")
    try:
        handle = sender.begin("r-dies", 100, list(range(7)), on_done=results.append)
        handle.send_layers(0, 2)
        receiver.kill()
        handle.send_layers(2, NUM_LAYERS)
        start = time.monotonic()
        result = handle.finish(timeout_s=30.0)
        elapsed = time.monotonic() - start
    finally:
        sender.close()
        receiver.stop()
    assert not result.ok and result.action == "recompute"
    assert result.num_attempts == 2, result  # retried exactly once
    assert elapsed < 30.0, "finish() must return within its timeout"
    assert released == ["r-dies"] and results == [result]
    assert sender.counters.num_retries == 1 and sender.counters.num_failed == 1


def test_stalled_partial_transfer_is_dropped_and_its_blocks_released():
    receiver = ReceiverProcess(num_blocks=32, config=TransferConfig(stall_timeout_s=1.0))
    src = torch.randn(NUM_LAYERS, 2, NUM_SRC_BLOCKS, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM)
    released = []
    sender = make_sender(receiver.address, src, released)
    try:
        num_free = receiver.state()["num_free"]
        handle = sender.begin("r-stalls", 70, [3, 1, 4, 9, 5])
        handle.send_layers(0, 2)  # prefill "hangs" after two layers
        state = receiver.wait_for(lambda s: any(e[0] == "failed" for e in s["events"]))
        failed = [e for e in state["events"] if e[0] == "failed"]
        assert failed and failed[0][1] == "r-stalls" and "no progress" in failed[0][2]
        assert ("release", "r-stalls") in state["events"]  # the 5 reserved blocks went back
        assert state["num_free"] == num_free and state["num_open"] == 0
        assert state["counters"]["num_stalled"] == 1
        result = handle.finish(timeout_s=0.5)  # the prefill side gives up too
        assert not result.ok and "no acknowledgement" in result.reason
        assert released == ["r-stalls"]
    finally:
        sender.close()
        receiver.stop()


def test_lease_expiry_fails_the_transfer_and_the_receiver_drops_it(receiver):
    src = torch.randn(NUM_LAYERS, 2, NUM_SRC_BLOCKS, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM)
    released, results, ended = [], [], threading.Event()
    sender = make_sender(receiver.address, src, released, lease_ttl_s=0.5)
    try:
        num_free = receiver.state()["num_free"]

        def on_done(result):
            results.append(result)
            ended.set()
        handle = sender.begin("r-expires", 20, [10, 12], on_done=on_done)
        handle.send_layers(0, 1)  # and never the rest: no ack can come
        assert ended.wait(30.0), "the lease did not expire"
        state = receiver.wait_for(lambda s: s["num_free"] == num_free)
    finally:
        sender.close()
    assert not results[0].ok and "lease expired" in results[0].reason
    assert handle.poll() == results[0] and released == ["r-expires"]
    assert sender.counters.num_leases_expired == 1
    assert any(e[:2] == ("failed", "r-expires") and "aborted by the sender" in e[2] for e in state["events"])
    assert state["num_free"] == num_free
