"""Pin the CPU compute threads (torch's OpenMP team) to cores, one thread per core, and the rest off them.

What works with torch 2.13's CPU wheel (OpenMP = the libgomp bundled in torch/lib), found on the 2-core
box (docs/benchmarks.md, "CPU step"):

- `OMP_PROC_BIND` / `OMP_PLACES` / `GOMP_CPU_AFFINITY` are read once, when libgomp loads, i.e. at
  `import torch`. Set later they do nothing. Set before, they also pin the importing (main) thread to
  the first place, so every Python thread it starts afterwards inherits that one core.
- After import, only per-thread `sched_setaffinity` works. libgomp starts its workers lazily, at the
  first parallel region that needs them, one new worker per extra team member, and a new thread
  inherits its creator's affinity mask. Workers that already exist keep theirs.

So `pin_compute_threads(cores)` pins the calling thread (the one that runs torch ops: OpenMP's master)
to cores[0], grows the OpenMP team one thread at a time, and pins each new worker to the next core:

    cores [0, 1]:   caller -> 0    worker 1 -> 1    (any other existing thread -> the remaining cores)

Call it in the process that computes, before its first multi-threaded torch op (else the existing
workers cannot be told apart and stay where they are: the result says so).
"""
from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, field
from typing import Sequence

import torch

logger = logging.getLogger(__name__)


@dataclass
class ThreadPinning:
    """What pin_compute_threads did: thread id -> core for the compute team, and where the rest went."""
    compute: dict[int, int] = field(default_factory=dict)  # tid -> core (caller first)
    others: dict[int, tuple[int, ...]] = field(default_factory=dict)  # tid -> allowed cores
    unpinned_workers: int = 0  # team members that existed before the call (not pinned)
    other_cores: tuple[int, ...] = ()  # where every thread but the compute team goes


    @property
    def complete(self) -> bool:
        return self.unpinned_workers == 0


def thread_ids() -> set[int]:
    """Kernel thread ids of this process's threads."""
    return {int(tid) for tid in os.listdir("/proc/self/task")}


def pin_current_thread(cores: Sequence[int]) -> None:
    """Restrict the calling thread (and threads it starts later) to `cores`."""
    os.sched_setaffinity(0, set(cores))


def move_other_threads(pinning: ThreadPinning) -> None:
    """Move every thread of this process but the compute team to pinning.other_cores: call it again once
    the process has started its I/O threads (they inherit the core of the thread that started them).
    Left alone if there are no other cores, or if some workers were not pinned (they cannot be told
    apart from the other threads)."""
    if not pinning.other_cores or pinning.unpinned_workers:
        return
    for tid in thread_ids() - set(pinning.compute):
        try:
            os.sched_setaffinity(tid, set(pinning.other_cores))
            pinning.others[tid] = pinning.other_cores
        except OSError:  # the thread ended meanwhile
            pass


def _run_parallel_region() -> None:
    # Big enough that ATen splits it over every thread of the team (grain size 32768 elements).
    torch.ones(1 << 18).add_(1.0)


def pin_compute_threads(cores: Sequence[int], other_cores: Sequence[int] | None = None) -> ThreadPinning:
    """Pin torch's compute threads one per core on `cores` and set torch's thread count to len(cores).

    Mutates: the calling thread's affinity (cores[0]), torch.set_num_threads, the affinity of each
    OpenMP worker it starts, and of every other thread of the process, which moves to `other_cores`
    (default: the cores this process may use that are not in `cores`; left alone if there are none, or
    if some workers existed before the call, since they cannot be told apart from the other threads).
    Threads the caller starts later inherit cores[0]: start them first, or have them call
    pin_current_thread. Assumes cores are distinct and allowed for this process.
    """
    cores = list(dict.fromkeys(cores))
    allowed = os.sched_getaffinity(0)
    if not cores or not set(cores) <= allowed:
        raise ValueError(f"compute cores {cores} must be a non-empty subset of the cores this process may use "
                         f"({sorted(allowed)})")
    if other_cores is None:
        other_cores = sorted(allowed - set(cores))
    result = ThreadPinning()
    caller = threading.get_native_id()
    pin_current_thread([cores[0]])
    result.compute[caller] = cores[0]
    team_size = 1
    for size in range(2, len(cores) + 1):
        torch.set_num_threads(size)  # may start an (idle) pthreadpool thread for NNPACK: not a worker
        before = thread_ids()
        _run_parallel_region()
        started = sorted(thread_ids() - before)  # libgomp starts one worker per growth
        for tid in started:
            os.sched_setaffinity(tid, {cores[size - 1]})
            result.compute[tid] = cores[size - 1]
        team_size += bool(started)
    torch.set_num_threads(len(cores))
    result.unpinned_workers = len(cores) - team_size
    result.other_cores = tuple(other_cores)
    move_other_threads(result)
    if result.unpinned_workers:
        logger.warning("pin_compute_threads: %d OpenMP worker(s) already existed and were not pinned; call it "
                       "before the first multi-threaded torch op", result.unpinned_workers)
    return result
