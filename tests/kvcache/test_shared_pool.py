"""The shared-memory KV pool and the one-sided bookkeeping, in one process (plus a short-lived child
for the kill -9 case): file lifetime, control slots, the transfer-latency histogram, and the stop
protocol of a dropped one-sided reservation whose writer is idle."""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import pytest
import torch

from kvcache.layout import KVCacheLayout
from kvcache.shared_memory import SHM_DIR, map_region, sweep_stale
from kvcache.transfer import KVLayout, KVReceiver, KVSender, ReceiverServer, TransferConfig
from kvcache.transfer.counters import LatencyHistogram
from kvcache.transfer.writers import OneSidedWriters, pid_namespace

LAYOUT = KVCacheLayout(num_layers=3, num_kv_heads=2, head_dim=8, block_size=4, dtype="float32")


def test_pool_file_holds_the_cache_and_its_control_slots():
    pool = LAYOUT.allocate_shared(10)
    try:
        assert pool.tensor.shape == LAYOUT.shape(10) and not pool.tensor.any()
        assert oct(os.stat(pool.file.path).st_mode & 0o777) == "0o600"  # no other user reads the KV
        regions = pool.regions
        assert regions.tickets_offset >= regions.kv_bytes and regions.tickets_offset % 4096 == 0
        # a peer's view of the same pages: what one writes, the other reads
        peer = map_region(pool.name, 0, regions.kv_bytes, writable=True)
        peer_cache = torch.frombuffer(peer, dtype=torch.float32).view(LAYOUT.shape(10))
        peer_cache[1, 0, 7] = 3.5
        assert torch.equal(pool.tensor[1, 0, 7], torch.full(LAYOUT.block_shape, 3.5))
        tickets = map_region(pool.name, regions.tickets_offset, regions.control_bytes, writable=False)
        pool.tickets[4] = 12345
        assert memoryview(tickets).cast("q")[4] == 12345
        with pytest.raises(TypeError):  # read-only for the peer
            memoryview(tickets).cast("q")[4] = 0
    finally:
        pool.close()
    assert not os.path.exists(pool.file.path)
    assert pool.tensor[1, 0, 7, 0, 0, 0] == 3.5  # the mapping outlives the name


def test_a_killed_owner_leaves_no_name_and_stale_names_are_swept():
    code = ("from kvcache.shared_memory import SharedFile; import time; f = SharedFile('pdkvtest', 4096); "
            "print(f.path, flush=True); time.sleep(60)")
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                             cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    try:
        path = child.stdout.readline().strip()
        assert os.path.exists(path)
        child.kill()
        child.wait(10)
        deadline = time.monotonic() + 10
        while os.path.exists(path) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not os.path.exists(path)  # the watchdog removed it
    finally:
        child.kill()
    # a name whose owner died with its watchdog: swept when the next one is made
    dead_pid = child.pid
    stale = os.path.join(SHM_DIR, f"pdkvtest_{dead_pid}_0123456789ab")
    live = os.path.join(SHM_DIR, f"pdkvtest_{os.getpid()}_0123456789ab")
    for path in (stale, live):
        open(path, "wb").close()
    try:
        assert sweep_stale("pdkvtest") == [os.path.basename(stale)]
        assert os.path.exists(live)
    finally:
        os.unlink(live)


@pytest.mark.parametrize("name", ["../etc/passwd", "pdkv_12_zz", "pdkv_1", "PDKV_1_0123456789ab"])
def test_peers_cannot_make_us_map_arbitrary_files(name):
    with pytest.raises(ValueError, match="not a pdserve shared-memory name"):
        map_region(name, 0, 8, writable=False)


def test_histogram_counts_each_value_in_the_bucket_of_its_upper_bound():
    histogram = LatencyHistogram((0.1, 1.0))
    for value in (0.05, 0.1, 0.5, 1.0, 7.0):
        histogram.observe(value)
    snapshot = histogram.snapshot()
    assert snapshot["counts"] == [2, 4, 5]  # cumulative: <= 0.1, <= 1.0, +Inf
    assert snapshot["count"] == 5 and snapshot["sum"] == pytest.approx(8.65)
    with pytest.raises(ValueError):
        LatencyHistogram((1.0, 0.5))


def test_writers_are_admitted_only_when_their_process_can_be_watched():
    pool = LAYOUT.allocate_shared(4)
    writers = OneSidedWriters(pool)
    try:
        assert writers.admit("a", os.getpid(), pid_namespace()) == ""
        assert "namespace" in writers.admit("b", os.getpid(), "pid:[1]")
        child = subprocess.Popen([sys.executable, "-c", "pass"])
        child.wait()
        assert writers.admit("c", child.pid, pid_namespace()) != ""  # exited (or reaped: no such process)
        assert writers.exited() == []
        slots = [writers.open_slot() for _ in range(4)]
        assert writers.open_slot() is None  # one slot per block
        (slot, ticket), (slot2, ticket2) = slots[0], slots[1]
        assert pool.tickets[slot] == ticket and ticket != ticket2 and 0 not in (ticket, ticket2)
        writers.close_slot(slot)
        assert pool.tickets[slot] == 0 and writers.open_slot() is None  # closed is not free
        writers.free_slot(slot)
        slot3, ticket3 = writers.open_slot()
        assert slot3 == slot and ticket3 not in (ticket, ticket2)  # a reused slot never reopens an old ticket
        assert writers.forget("a") and not writers.forget("a")
    finally:
        writers.close()


class _Allocator:
    def __init__(self) -> None:
        self.events: list[tuple] = []
        self.done = threading.Event()

    def reserve(self, request_id, num_tokens):
        return list(range(7, 7 + -(-num_tokens // LAYOUT.block_size)))

    def release(self, request_id):
        self.events.append(("release", request_id))

    def on_transfer_complete(self, request_id, first_token_id=None):
        self.events.append(("complete", request_id))

    def on_transfer_failed(self, request_id, reason):
        self.events.append(("failed", request_id, reason))
        self.done.set()


def test_a_dropped_reservation_of_an_idle_writer_comes_back_once_it_confirms():
    """The writer has written what it had and waits (e.g. for the first token); the decode side
    drops the reservation. The blocks are quarantined until the writer notices the closed slot and
    confirms it stopped; it never writes again into them."""
    pool = LAYOUT.allocate_shared(16)
    allocator = _Allocator()
    layout = KVLayout.from_cache_layout(LAYOUT, "m")
    server = ReceiverServer(KVReceiver(pool.tensor, layout, allocator, TransferConfig(), pool=pool)).start()
    src = torch.randn(LAYOUT.shape(8))
    sender = KVSender(src, layout, server.address, lambda rid: None, TransferConfig(lease_ttl_s=2.0)).connect()
    try:
        assert sender.one_sided
        handle = sender.begin("r", 10, [5, 1, 2])
        handle.send_layers(0, 2)
        deadline = time.monotonic() + 10
        while handle.num_in_flight and time.monotonic() < deadline:
            time.sleep(0.01)
        assert torch.equal(pool.tensor[:2, :, 7:10], src[:2, :, [5, 1, 2]])
        assert server.receiver.drop("r", "the engine gave up")
        assert server.receiver.num_quarantined_blocks == 3 and allocator.events == []
        assert allocator.done.wait(10), "the writer never confirmed"
        assert allocator.events[0] == ("release", "r") and server.receiver.num_quarantined_blocks == 0
        counters = server.receiver.counters.snapshot()
        assert counters["num_blocks_quarantined"] == counters["num_blocks_released_from_quarantine"] == 3
        result = handle.finish(1.0)
        assert not result.ok and "dropped the reservation" in result.reason
        before = pool.tensor.clone()
        handle.send_layers(2, 3)  # too late: nothing is written
        time.sleep(0.2)
        assert torch.equal(pool.tensor, before)
    finally:
        sender.close()
        server.stop()
