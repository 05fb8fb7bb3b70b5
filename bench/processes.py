"""Memory (RSS) and open file descriptors of a server's processes over time, read from /proc (Linux).

A server is its own process plus the instance processes it started (`serving.instance.main
--name NAME`, the local launcher's children), looked up again at every sample: an instance that was
restarted keeps its name and shows a new pid. Ray actors are not the server's children and are not
seen here.
"""
from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field

import numpy as np

SERVER = "api-server"
_INSTANCE_MODULE = b"serving.instance.main"
_SECONDS_PER_HOUR = 3600.0


@dataclass(frozen=True)
class Sample:
    time_s: float  # since the sampler started
    pid: int
    rss_bytes: int
    num_fds: int


def read_rss_bytes(pid: int) -> int | None:
    """VmRSS of pid, None once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024  # reported in kB
    except (OSError, ValueError, IndexError):
        return None
    return None


def count_fds(pid: int) -> int | None:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def server_processes(server_pid: int) -> dict[str, int]:
    """{"api-server": server_pid, instance name: pid, ...} for the live instance processes it started."""
    processes = {SERVER: server_pid}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as f:
                state, parent = f.read().rsplit(")", 1)[1].split()[:2]
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except (OSError, ValueError):
            continue
        if int(parent) != server_pid or state == "Z" or _INSTANCE_MODULE not in argv:
            continue
        name = argv[argv.index(b"--name") + 1].decode() if b"--name" in argv[:-1] else f"pid-{entry}"
        processes[name] = int(entry)
    return processes


def group_cpu_seconds(pgid: int) -> float:
    """User + system CPU seconds of the live processes in process group pgid (a server started in a
    session of its own: its API process, engine processes, instances, vLLM's workers), and of the
    children they have reaped. The difference over a run divided by its wall time is the cores it used."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # after the name: state ppid pgrp session ... utime(14) stime(15) cutime(16) cstime(17), 1-based
        if int(fields[2]) == pgid:
            total += sum(int(v) for v in fields[11:15])
    return total / ticks


@dataclass
class ProcessSampler:
    """Samples every `interval_s` on a daemon thread between start() and stop(); `series` maps a
    process name to its samples."""
    server_pid: int
    interval_s: float
    series: dict[str, list[Sample]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.interval_s <= 0:
            raise ValueError(f"--sample-interval must be positive, got {self.interval_s}")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="soak-sampler", daemon=True)
        self._origin = time.monotonic()

    def start(self) -> "ProcessSampler":
        self._origin = time.monotonic()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self.sample_once()  # the state at the end

    def sample_once(self) -> None:
        now = time.monotonic() - self._origin
        for name, pid in server_processes(self.server_pid).items():
            rss, fds = read_rss_bytes(pid), count_fds(pid)
            if rss is not None and fds is not None:
                self.series.setdefault(name, []).append(Sample(now, pid, rss, fds))

    def _run(self) -> None:
        while True:
            self.sample_once()
            if self._stop.wait(self.interval_s):
                return


def summarize(samples: list[Sample]) -> dict:
    """Start, max and end of RSS and of open FDs, with least-squares slopes per hour over the whole run
    and over its second half (`late_`: warm-up excluded; what a leak looks like), and the samples."""
    times = np.array([s.time_s for s in samples], dtype=np.float64)
    late = times >= (times[0] + times[-1]) / 2
    out: dict = {"pids": sorted({s.pid for s in samples}), "num_samples": len(samples)}
    for key in ("rss_bytes", "num_fds"):
        values = np.array([getattr(s, key) for s in samples], dtype=np.float64)
        out[key] = {"start": int(values[0]), "max": int(values.max()), "end": int(values[-1]),
                    "slope_per_hour": _slope_per_hour(times, values),
                    "late_slope_per_hour": _slope_per_hour(times[late], values[late])}
    out["samples"] = {"time_s": times.tolist(), "rss_bytes": [s.rss_bytes for s in samples],
                      "num_fds": [s.num_fds for s in samples], "pid": [s.pid for s in samples]}
    return out


def _slope_per_hour(times_s: np.ndarray, values: np.ndarray) -> float:
    if times_s.size < 2 or np.ptp(times_s) == 0:
        return 0.0
    return float(np.polyfit(times_s, values, 1)[0]) * _SECONDS_PER_HOUR
