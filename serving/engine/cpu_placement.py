"""Which cores the engine process computes on, and with how many threads.

The API process does HTTP, tokenization and detokenization and mostly waits on I/O; the engine
process owns the compute. `engine_placement` decides in the parent (it knows the cores it may use);
`place_engine_threads` applies it in the engine process before torch runs anything, so the
OpenMP pool torch starts on its first parallel op is born inside the allotted cores with the
allotted size (threads inherit their creator's affinity).

Its OpenMP threads wait passively (OMP_WAIT_POLICY=PASSIVE, unless the environment says otherwise):
libgomp's default spins ~300k iterations at every barrier when it believes it has the cores to
itself, which a lone engine process does; on cores shared with the API process (or anything else)
a spinning thread holds the core its partner needs, and a batch-64 step of the tiny model went from
~10 ms to 100-400 ms (docs/benchmarks.md, "Engine process"). In-process the same runtime throttled
its spinning by itself, because the server's threads made it see more threads than cores.

A stopgap on purpose: serving/runner/cpu_threads.py (`pin_compute_threads(cores)`, branch cpu-step)
pins each compute thread to one core; once it lands, `place_engine_threads` should call it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class CpuPlacement:
    cores: tuple[int, ...] | None  # None: leave the affinity the process inherited
    num_threads: int  # torch intra-op threads


def engine_placement(num_threads: int | None = None) -> CpuPlacement:
    """The cores this process may use, all for the engine; one compute thread per core unless told
    (an instance: --num-cpus-per-instance)."""
    if not hasattr(os, "sched_getaffinity"):
        return CpuPlacement(None, max(1, num_threads or os.cpu_count() or 1))
    cores = tuple(sorted(os.sched_getaffinity(0)))
    return CpuPlacement(cores, max(1, num_threads or len(cores)))


def engine_environment(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The engine process's environment: this one's, with OpenMP waiting passively by default."""
    environment = dict(os.environ if environ is None else environ)
    environment.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return environment


def place_engine_threads(placement: CpuPlacement) -> None:
    """In the engine process, before any torch computation: its affinity and thread count."""
    if placement.cores is not None and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, placement.cores)
    import torch
    torch.set_num_threads(placement.num_threads)


def name_os_thread(name: str) -> None:
    """The calling thread's name as `top -H`, `ps -L` and /proc show it (15 bytes at most): so the
    engine loop can be told apart from the server's threads and torch's workers. Linux only."""
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(15, name.encode()[:15], 0, 0, 0)  # PR_SET_NAME
    except (OSError, AttributeError):
        pass
