"""The shared-memory collectives (pdkernels/csrc/cpu_shm_collectives.cpp) against their definition: ranks are
threads here, over one region in ordinary memory (ctypes releases the GIL, so they run at once); the
rank processes of tests/serving/test_tensor_parallel.py use them across processes."""
import subprocess
import sys
import threading

import pytest
import torch

from pdkernels import cpu_native

pytestmark = pytest.mark.skipif(cpu_native.library() is None, reason="pdserve's CPU kernels are not built here")


def make_region(lib, size: int, slot_bytes: int) -> torch.Tensor:
    region = torch.zeros(lib.pdserve_shm_header_bytes() + 2 * size * slot_bytes, dtype=torch.uint8)
    assert lib.pdserve_shm_init(region.data_ptr(), 0, size, slot_bytes, 0) == 0
    for rank in range(1, size):
        assert lib.pdserve_shm_init(region.data_ptr(), rank, size, slot_bytes, 0) == 0
    return region


def run_ranks(size: int, fn) -> list:
    results, errors = [None] * size, []

    def one(rank):
        try:
            results[rank] = fn(rank)
        except BaseException as e:  # noqa: BLE001 - re-raised below
            errors.append(e)
    threads = [threading.Thread(target=one, args=(r,)) for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    return results


@pytest.mark.parametrize("size", [2, 3, 4])
def test_all_reduce_and_all_gather_match_their_definition_over_many_rounds(size):
    lib = cpu_native.library()
    slot_bytes = 64 * 1024
    region = make_region(lib, size, slot_bytes)
    gen = torch.Generator().manual_seed(torch.seed())
    seed = gen.initial_seed()
    # sizes that are and are not multiples of 16, up to a whole slot; both collectives interleaved, so
    # both parities of the double buffer are rewritten many times
    lengths = [1, 15, 16, 17, 1000, slot_bytes // 4] * 4
    inputs = [[torch.randn(n, generator=gen) for n in lengths] for _ in range(size)]

    def rank_fn(rank):
        out = []
        for i, n in enumerate(lengths):
            seq = i + 1
            x = inputs[rank][i].clone()
            if i % 2 == 0:
                status = lib.pdserve_shm_all_reduce(region.data_ptr(), rank, size, seq, x.data_ptr(), n, 30.0)
                out.append((status, x))
            else:
                gathered = torch.empty(size * n)
                status = lib.pdserve_shm_all_gather(region.data_ptr(), rank, size, seq, x.data_ptr(), n,
                                                    gathered.data_ptr(), 30.0)
                out.append((status, gathered))
        return out

    results = run_ranks(size, rank_fn)
    for i in range(len(lengths)):
        if i % 2 == 0:
            expected = inputs[0][i].clone()
            for r in range(1, size):
                expected += inputs[r][i]  # rank order, as the kernel sums
        else:
            expected = torch.cat([inputs[r][i] for r in range(size)])
        for rank in range(size):
            status, got = results[rank][i]
            assert status == 0
            assert torch.equal(got, expected), f"seed={seed} round {i} rank {rank}"  # every rank the same bits


def test_too_large_and_mismatched_arguments_are_refused():
    lib = cpu_native.library()
    region = make_region(lib, 2, 1024)
    x = torch.zeros(257)
    assert lib.pdserve_shm_all_reduce(region.data_ptr(), 0, 2, 1, x.data_ptr(), 257, 1.0) == -1  # > a slot
    assert lib.pdserve_shm_all_reduce(region.data_ptr(), 0, 3, 1, x.data_ptr(), 4, 1.0) == -1    # wrong size
    assert lib.pdserve_shm_init(region.data_ptr(), 1, 2, 2048, 0) == -1                           # wrong slot
    assert lib.pdserve_shm_init(region.data_ptr(), 0, 0, 1024, 0) == -1


def test_a_peer_that_never_comes_times_out_and_a_dead_peer_is_seen():
    lib = cpu_native.library()
    region = make_region(lib, 2, 1024)
    x = torch.ones(4)
    assert lib.pdserve_shm_all_reduce(region.data_ptr(), 0, 2, 1, x.data_ptr(), 4, 0.2) == -3
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    assert lib.pdserve_shm_init(region.data_ptr(), 1, 2, 1024, int(gone.stdout)) == 0
    assert lib.pdserve_shm_all_reduce(region.data_ptr(), 0, 2, 2, x.data_ptr(), 4, 30.0) == -2


def test_the_group_uses_shared_memory_for_what_fits_and_the_process_group_for_the_rest():
    from serving.models.tensor_parallel import ShmCollectives, TPGroup
    lib = cpu_native.library()
    calls = []

    class FakeProcessGroup:  # a one-rank stand-in: records what reached it
        def allreduce(self, tensors):
            calls.append(("allreduce", tensors[0].numel()))
            return _Done()

    region = torch.zeros(ShmCollectives.region_bytes(lib, 1, 1024), dtype=torch.uint8)
    shm = ShmCollectives(lib, region.numpy(), 0, 1, 1024, 1.0)
    group = TPGroup(0, 1, FakeProcessGroup(), shm)
    small = torch.arange(8.0)
    assert torch.equal(group.all_reduce(small.clone()), small) and not calls
    assert torch.equal(group.all_gather_last_dim(small.view(2, 4)), small.view(2, 4))
    group.all_reduce(torch.zeros(300))  # 1200 bytes: more than a slot
    group.all_reduce(torch.zeros(8, dtype=torch.float64))
    assert calls == [("allreduce", 300), ("allreduce", 8)]


class _Done:
    def wait(self):
        return True



def test_a_peer_that_exited_but_was_not_reaped_is_seen_as_gone():
    """Rank 0's worker ranks are its children: one that dies stays a zombie until waited for."""
    lib = cpu_native.library()
    region = make_region(lib, 2, 1024)
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    import time
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # exited, not reaped (Popen.poll would reap it)
        with open(f"/proc/{child.pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                break
        time.sleep(0.05)
    assert lib.pdserve_shm_init(region.data_ptr(), 1, 2, 1024, child.pid) == 0
    x = torch.ones(4)
    assert lib.pdserve_shm_all_reduce(region.data_ptr(), 0, 2, 1, x.data_ptr(), 4, 30.0) == -2
    child.wait()
