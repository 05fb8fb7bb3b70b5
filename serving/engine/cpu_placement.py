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

Binding (`--cpu-threads-bind`, the meaning of vLLM's VLLM_CPU_OMP_THREADS_BIND):
- `nobind` (default): one unpinned compute thread per core this process may use; the kernel places
  them and the API server's threads among them.
- `auto`: a colocated engine computes on every core but the last, one compute thread pinned per core
  (serving/runner/cpu_threads.py), and the last core is left to the API server and the engine's I/O
  threads — vLLM's layout (it reserves one core for its frontend and engine-core processes). With one
  core, that core.
- a list (`0-2,5`): those cores, one pinned compute thread each.
On the 2-core CPU box `nobind` served 1.5 req/s within the SLOs where `auto` served under 1.0 (docs/
benchmarks.md, "Side by side"): one more compute thread is worth more than a core kept clear for the
server. On a many-core host, where one core is a small share, `auto` keeps the server off the compute.
The instances of a disaggregated deployment share their host and stay unbound (one thread each,
--num-cpus-per-instance on Ray).
"""
from __future__ import annotations

import os
import signal
from dataclasses import dataclass

from serving.config import parse_cores


@dataclass(frozen=True)
class CpuPlacement:
    cores: tuple[int, ...] | None  # None: leave the affinity the process inherited
    num_threads: int  # torch intra-op threads
    pin: bool = False  # one compute thread per core of `cores`, the engine's other threads off them


def engine_placement(num_threads: int | None = None, bind: str = "nobind") -> CpuPlacement:
    """Where the engine computes (module doc). num_threads: the thread count when unbound (an instance:
    --num-cpus-per-instance); a bound placement has one thread per core."""
    if not hasattr(os, "sched_getaffinity"):
        return CpuPlacement(None, max(1, num_threads or os.cpu_count() or 1))
    allowed = tuple(sorted(os.sched_getaffinity(0)))
    if bind == "nobind":
        return CpuPlacement(allowed, max(1, num_threads or len(allowed)))
    if bind == "auto":
        cores = allowed[:-1] if len(allowed) > 1 else allowed
    else:
        cores = parse_cores(bind)
        if not set(cores) <= set(allowed):
            raise ValueError(f"--cpu-threads-bind {bind}: this process may only use cores "
                             f"{','.join(map(str, allowed))}")
    return CpuPlacement(cores, len(cores), pin=True)


def engine_environment(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The engine process's environment: this one's, with OpenMP waiting passively by default."""
    environment = dict(os.environ if environ is None else environ)
    environment.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return environment


def leave_stop_signals_to_parent() -> None:
    """In the engine process and a worker rank: ignore SIGINT and SIGTERM. A terminal's Ctrl-C and a stop
    of the whole process group (`timeout`, systemd's default KillMode, `kill -TERM -PGID`) reach them as
    they reach the server, which drains first: running requests still need them. Their parent ends them
    when it is done (a shutdown message, a closed connection), and they exit on their own when it is
    gone (end of file on the pipe from it). Ignored signals stay ignored in the ranks they start."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)


def place_engine_threads(placement: CpuPlacement):
    """In the engine process, before any torch computation: its affinity and thread count; pinned, the
    compute threads one per core and the process's other threads on the cores it may use besides
    (returns the ThreadPinning: call move_other_threads on it once the I/O threads have started)."""
    if placement.pin and placement.cores:
        from serving.runner.cpu_threads import pin_compute_threads
        return pin_compute_threads(placement.cores)
    if placement.cores is not None and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, placement.cores)
    import torch
    torch.set_num_threads(placement.num_threads)
    return None


def name_os_thread(name: str) -> None:
    """The calling thread's name as `top -H`, `ps -L` and /proc show it (15 bytes at most): so the
    engine loop can be told apart from the server's threads and torch's workers. Linux only."""
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(15, name.encode()[:15], 0, 0, 0)  # PR_SET_NAME
    except (OSError, AttributeError):
        pass
