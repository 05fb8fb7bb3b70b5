"""Which cores the engine process computes on, and with how many threads.

The API process does HTTP, tokenization and detokenization and mostly waits on I/O; the engine
process owns the compute. `engine_placement` decides in the parent (it knows the cores it may use);
`place_engine_threads` applies it in the engine process before torch runs anything, so the
OpenMP pool torch starts on its first parallel op is born inside the allotted cores with the
allotted size (threads inherit their creator's affinity).

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


def place_engine_threads(placement: CpuPlacement) -> None:
    """In the engine process, before any torch computation: its affinity and thread count."""
    if placement.cores is not None and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, placement.cores)
    import torch
    torch.set_num_threads(placement.num_threads)
