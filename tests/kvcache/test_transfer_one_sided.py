"""One-sided KV writes end to end: a decode-side receiver process whose pool lives in shared memory,
and prefill-side writers (this process, or writer processes that the tests kill -9 or SIGSTOP).

What must hold: blocks are bit-exact after a one-sided transfer; a writer that dies or stops
mid-write never gets its blocks used (no commit), and they return to the pool only once it can no
longer write (its process exited, or it confirmed it stopped); nothing lands in blocks after they
were given back; other requests' blocks are untouched; a peer on "another host" still gets gRPC.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time

import pytest
import torch

from kvcache.layout import KVCacheLayout
from kvcache.transfer import KVLayout, KVReceiver, KVSender, ReceiverServer, TransferConfig
from tests.kvcache.test_transfer import (BLOCK_SIZE, HEAD_DIM, NUM_KV_HEADS, NUM_LAYERS, NUM_SRC_BLOCKS,
                                         PIPE_TIMEOUT_S, RecordingAllocator)

pytestmark = pytest.mark.slow

NUM_POOL_BLOCKS = 64
CHUNK_BYTES = 4096  # two blocks of one layer (float32): long requests are cut by blocks too


def make_src(seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(NUM_LAYERS, 2, NUM_SRC_BLOCKS, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM,
                       generator=generator).to(dtype)


def layout_of(dtype: torch.dtype) -> KVCacheLayout:
    return KVCacheLayout(NUM_LAYERS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE, str(dtype).removeprefix("torch."))


# ---- the decode side: a receiver process with its pool in shared memory ----
def _receiver_main(conn, dtype: torch.dtype, config: TransferConfig, device: str = "cpu") -> None:
    torch.set_num_threads(1)
    pool = layout_of(dtype).allocate_shared(NUM_POOL_BLOCKS, device)
    allocator = RecordingAllocator(NUM_POOL_BLOCKS)
    receiver = KVReceiver(pool.tensor, KVLayout.from_kv_cache(pool.tensor, "test-model"), allocator, config,
                          pool=pool)
    server = ReceiverServer(receiver).start()
    conn.send((server.address, pool.name))
    try:
        while conn.poll(PIPE_TIMEOUT_S * 5):
            command = conn.recv()
            if command[0] == "stop":
                break
            if command[0] == "drop":  # what the engine's cancel does (KVReceives.cancel)
                conn.send(receiver.drop(command[1], "cancelled by the test", routine=True))
                continue
            if command[0] == "blocks":  # by block id, whoever owns them now
                conn.send(pool.tensor[:, :, command[1]].cpu())
                continue
            with allocator.lock:
                owned = {rid: list(allocator.owned[rid]) for rid in command[1] if rid in allocator.owned}
                conn.send({"owned": owned, "blocks": {rid: pool.tensor[:, :, ids].cpu() for rid, ids in owned.items()},
                           "events": list(allocator.events), "num_free": len(allocator.free),
                           "num_open": receiver.num_open, "num_quarantined": receiver.num_quarantined_blocks,
                           "counters": receiver.counters.snapshot()})
    finally:
        server.stop(grace_s=0.5)
        conn.send("stopped")


class PoolReceiver:
    def __init__(self, dtype: torch.dtype = torch.float32, device: str = "cpu", **config) -> None:
        context = mp.get_context("spawn")
        self.conn, child_conn = context.Pipe()
        self.process = context.Process(target=_receiver_main, daemon=True,
                                       args=(child_conn, dtype, TransferConfig(**config), device))
        self.process.start()
        assert self.conn.poll(PIPE_TIMEOUT_S), "the receiver process did not start"
        self.address, self.pool_name = self.conn.recv()

    def ask(self, *command):
        self.conn.send(command)
        assert self.conn.poll(PIPE_TIMEOUT_S), "the receiver process did not answer"
        return self.conn.recv()

    def state(self, request_ids=()) -> dict:
        return self.ask("state", list(request_ids))

    def wait_for(self, predicate, timeout_s: float = 30.0) -> dict:
        deadline = time.monotonic() + timeout_s
        while not predicate(state := self.state()):
            assert time.monotonic() < deadline, f"timed out; last state: { {k: v for k, v in state.items() if k != 'blocks'} }"
            time.sleep(0.05)
        return state

    def stop(self) -> None:
        if self.process.is_alive():
            self.conn.send(("stop",))
            self.conn.poll(PIPE_TIMEOUT_S)
        self.process.join(PIPE_TIMEOUT_S)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(PIPE_TIMEOUT_S)


def make_sender(address: str, src: torch.Tensor, **config) -> KVSender:
    config = TransferConfig(**({"rpc_timeout_s": 10.0, "max_chunk_bytes": CHUNK_BYTES} | config))
    return KVSender(src, KVLayout.from_kv_cache(src, "test-model"), address, lambda rid: None, config).connect()


def transfer(sender: KVSender, request_id: str, num_tokens: int, block_ids: list[int],
             groups=((0, 1), (1, 4), (4, NUM_LAYERS))):
    handle = sender.begin(request_id, num_tokens, block_ids)
    for start, end in groups:
        handle.send_layers(start, end)
    return handle.finish(timeout_s=60.0)


# (request id, number of tokens, source block ids): holes, odd lengths, a one-token request, one cut by blocks
REQUESTS = [("r-odd", 37, [40, 3, 17]),
            ("r-one", 1, [8]),
            ("r-long", 250, [1, 5, 9, 44, 13, 21, 2, 30, 31, 32, 6, 7, 46, 11, 25, 38])]


@pytest.mark.parametrize("dtype, device", [
    (torch.float32, "cpu"), (torch.bfloat16, "cpu"),
    # the decode pool in GPU memory, opened by the writer through CUDA IPC (make gpu-check)
    pytest.param(torch.float32, "cuda", marks=pytest.mark.gpu),
    pytest.param(torch.bfloat16, "cuda", marks=pytest.mark.gpu),
], ids=["fp32", "bf16", "fp32-cuda", "bf16-cuda"])
def test_one_sided_transfers_are_bit_exact(dtype, device):
    receiver = PoolReceiver(dtype, device)
    try:
        src = make_src(1, dtype).to(device)
        sender = make_sender(receiver.address, src)
        try:
            assert sender.one_sided and not sender.uses_shm  # no slabs: the pool itself is written
            results = [transfer(sender, rid, n, ids) for rid, n, ids in REQUESTS]
        finally:
            sender.close()
        assert [r.ok for r in results] == [True] * 3, results
        state = receiver.state([rid for rid, _, _ in REQUESTS])
        for rid, _, block_ids in REQUESTS:
            assert state["blocks"][rid].dtype == dtype
            assert torch.equal(state["blocks"][rid], src[:, :, block_ids].cpu()), rid
            assert ("complete", rid) in state["events"]
        num_bytes = sum(len(ids) for _, _, ids in REQUESTS) * NUM_LAYERS * layout_of(dtype).bytes_per_layer_block
        counters = state["counters"]
        assert counters["num_one_sided_received"] == 3 and counters["num_bytes_received"] == num_bytes
        assert sender.counters.num_one_sided_sent == 3 and sender.counters.num_bytes_sent == num_bytes
        assert sender.counters.latency.snapshot()["count"] == 3
    finally:
        receiver.stop()
    assert not os.path.exists(f"/dev/shm/{receiver.pool_name}")  # the pool's name goes with its owner


def test_peers_on_other_hosts_fall_back_to_payloads(monkeypatch):
    """A sender that reports another host gets no pool and no slabs: gRPC payloads, bit-exact; a sender
    that checks transfers (or turns one-sided off) gets the shared-memory slabs."""
    receiver = PoolReceiver()
    try:
        src = make_src(2)
        from kvcache.transfer import sender as sender_module
        with monkeypatch.context() as patch:
            patch.setattr(sender_module, "host_id", lambda: "another-host")
            remote = make_sender(receiver.address, src)
        checked = make_sender(receiver.address, src, checksum=True)
        slabs = make_sender(receiver.address, src, one_sided=False)
        try:
            assert not remote.one_sided and not remote.uses_shm
            assert not checked.one_sided and checked.uses_shm
            assert not slabs.one_sided and slabs.uses_shm
            for sender, (rid, n, ids) in zip((remote, checked, slabs), REQUESTS):
                assert transfer(sender, rid, n, ids).ok
        finally:
            for sender in (remote, checked, slabs):
                sender.close()
        state = receiver.state([rid for rid, _, _ in REQUESTS])
        for rid, _, block_ids in REQUESTS:
            assert torch.equal(state["blocks"][rid], src[:, :, block_ids]), rid
        assert state["counters"]["num_one_sided_received"] == 0
        assert state["counters"]["num_transfers_received"] == 3
    finally:
        receiver.stop()


# ---- writers in their own processes: killed, stopped ----
PAUSE_AT_WRITE = 3  # the writer pauses in the middle of its third chunk write


def _writer_main(conn, address: str, seed: int, request_id: str, num_tokens: int, block_ids: list[int]) -> None:
    """Writes a transfer one layer at a time; its PAUSE_AT_WRITE-th chunk write stops halfway (half
    of its blocks written) until told ("finish-write"). Then ("rest") sends the remaining layers."""
    import threading
    from kvcache.transfer import onesided
    torch.set_num_threads(1)
    real_unpack, resume, calls = onesided.unpack_kv, threading.Event(), [0]

    def pausing_unpack(buffer, kv_cache, dst_block_ids, layer_start):
        calls[0] += 1
        if calls[0] == PAUSE_AT_WRITE:
            half = max(1, len(dst_block_ids) // 2)
            real_unpack(buffer[:, :, :half], kv_cache, dst_block_ids[:half], layer_start)
            conn.send(("mid-write", os.getpid()))
            resume.wait()
        real_unpack(buffer, kv_cache, dst_block_ids, layer_start)

    onesided.unpack_kv = pausing_unpack
    sender = make_sender(address, make_src(seed))
    handle = sender.begin(request_id, num_tokens, block_ids)
    for layer in range(NUM_LAYERS // 2):
        handle.send_layers(layer, layer + 1)
    while conn.poll(PIPE_TIMEOUT_S * 5):
        command = conn.recv()
        if command == "finish-write":
            resume.set()
        elif command == "rest":
            for layer in range(NUM_LAYERS // 2, NUM_LAYERS):
                handle.send_layers(layer, layer + 1)  # no-ops once the transfer has failed
            result = handle.finish(timeout_s=30.0)
            conn.send(("result", result.ok, result.reason))
        elif command == "stop":
            break
    sender.close()


class WriterProcess:
    def __init__(self, address: str, seed: int, request_id: str, num_tokens: int, block_ids: list[int]) -> None:
        context = mp.get_context("spawn")
        self.conn, child_conn = context.Pipe()
        self.process = context.Process(target=_writer_main, daemon=True,
                                       args=(child_conn, address, seed, request_id, num_tokens, block_ids))
        self.process.start()

    def expect(self, kind: str):
        assert self.conn.poll(PIPE_TIMEOUT_S), f"the writer did not report {kind}"
        message = self.conn.recv()
        assert message[0] == kind, message
        return message

    def signal(self, signum: int) -> None:
        os.kill(self.process.pid, signum)

    def close(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join(PIPE_TIMEOUT_S)


VICTIM = ("victim", 100, [4, 0, 33, 12, 47, 20, 9])  # 7 blocks, the last one partly filled


def _bystander(receiver: PoolReceiver, src: torch.Tensor) -> tuple[KVSender, list[int]]:
    """A request committed before the victim's transfer: its blocks must stay as they are."""
    sender = make_sender(receiver.address, src)
    assert transfer(sender, "bystander", 70, [2, 11, 29, 43, 7]).ok
    return sender, receiver.state(["bystander"])["owned"]["bystander"]


def _check_given_back_and_untouched(receiver: PoolReceiver, sender: KVSender, src: torch.Tensor,
                                    bystander_ids: list[int], victim_ids: list[int], num_free: int) -> None:
    state = receiver.wait_for(lambda s: ("release", "victim") in s["events"])
    assert ("complete", "victim") not in state["events"]  # never handed to the engine
    assert state["num_free"] == num_free and state["num_open"] == 0 and state["num_quarantined"] == 0
    assert torch.equal(receiver.ask("blocks", bystander_ids), src[:, :, [2, 11, 29, 43, 7]])
    # the victim's blocks go to the next request (the allocator hands freed blocks out first):
    # written and read back bit-exact, nothing lands in them afterwards
    reuse_ids = [45, 1, 14, 36, 27, 18, 10]
    assert transfer(sender, "reuse", 100, reuse_ids).ok
    reused = receiver.state(["reuse"])["owned"]["reuse"]
    assert set(reused) & set(victim_ids)
    time.sleep(0.5)
    assert torch.equal(receiver.ask("blocks", reused), src[:, :, reuse_ids])


def test_a_writer_killed_mid_write_never_has_its_blocks_used():
    receiver = PoolReceiver(stall_timeout_s=2.0)
    src = make_src(3)
    writer = None
    try:
        sender, bystander_ids = _bystander(receiver, src)
        num_free = receiver.state()["num_free"]
        writer = WriterProcess(receiver.address, 4, *VICTIM)
        writer.expect("mid-write")  # half of one chunk written, the process blocked inside the copy
        victim_ids = receiver.state(["victim"])["owned"]["victim"]
        writer.signal(signal.SIGKILL)
        state = receiver.wait_for(lambda s: any(e[:2] == ("failed", "victim") for e in s["events"]),
                                  timeout_s=10.0)
        failed = next(e for e in state["events"] if e[:2] == ("failed", "victim"))
        assert "exited" in failed[2]  # seen through the pidfd, before the stall timeout
        assert state["counters"]["num_blocks_quarantined"] == 0  # a dead writer holds nothing
        _check_given_back_and_untouched(receiver, sender, src, bystander_ids, victim_ids, num_free)
        sender.close()
    finally:
        if writer is not None:
            writer.close()
        receiver.stop()


@pytest.mark.parametrize("ends,writer_fate", [("stall", "resumes"), ("cancel", "killed")])
def test_a_stopped_writers_blocks_stay_quarantined_until_it_stops_or_dies(ends, writer_fate):
    """SIGSTOP mid-write; the decode side gives up (stall timeout, or the engine cancels): the blocks
    are quarantined (counted, not in the pool) while the writer might still write. They come back
    when it resumes, finishes the write it was in, sees the reservation closed and says it stopped;
    or when it is killed. After that nothing is written into them."""
    receiver = PoolReceiver(stall_timeout_s=1.0 if ends == "stall" else 60.0)
    src = make_src(5)
    writer = None
    try:
        sender, bystander_ids = _bystander(receiver, src)
        num_free = receiver.state()["num_free"]
        writer = WriterProcess(receiver.address, 6, *VICTIM)
        writer.expect("mid-write")
        writer.signal(signal.SIGSTOP)
        victim_ids = receiver.state(["victim"])["owned"]["victim"]
        if ends == "cancel":
            assert receiver.ask("drop", "victim")
        state = receiver.wait_for(lambda s: s["num_quarantined"] == len(VICTIM[2]))
        assert state["counters"]["num_blocks_quarantined"] == len(VICTIM[2])
        assert state["num_free"] == num_free - len(VICTIM[2])  # not back in the pool
        assert ("release", "victim") not in state["events"] and ("complete", "victim") not in state["events"]
        time.sleep(1.5)  # a stopped writer keeps them quarantined for as long as it is stopped
        assert receiver.state()["num_quarantined"] == len(VICTIM[2])
        if writer_fate == "resumes":
            writer.signal(signal.SIGCONT)
            writer.conn.send("finish-write")  # the write it was in may finish; no other starts
        else:
            writer.signal(signal.SIGKILL)
        _check_given_back_and_untouched(receiver, sender, src, bystander_ids, victim_ids, num_free)
        counters = receiver.state()["counters"]
        assert counters["num_blocks_released_from_quarantine"] == counters["num_blocks_quarantined"]
        if writer_fate == "resumes":
            writer.conn.send("rest")  # the later layers: refused before any byte is written
            _, ok, reason = writer.expect("result")
            assert not ok and "dropped" in reason
            time.sleep(0.5)
            reuse_ids = receiver.state(["reuse"])["owned"]["reuse"]
            assert torch.equal(receiver.ask("blocks", reuse_ids), src[:, :, [45, 1, 14, 36, 27, 18, 10]])
        sender.close()
    finally:
        if writer is not None:
            writer.close()
        receiver.stop()


def test_the_pool_name_goes_when_the_decode_process_is_killed():
    receiver = PoolReceiver()
    assert os.path.exists(f"/dev/shm/{receiver.pool_name}")
    receiver.process.kill()
    receiver.process.join(PIPE_TIMEOUT_S)
    deadline = time.monotonic() + 10.0
    while os.path.exists(f"/dev/shm/{receiver.pool_name}") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not os.path.exists(f"/dev/shm/{receiver.pool_name}")
