"""How much of a core each process and thread of a running server uses, from /proc (Linux).

    python -m bench.cpu_share --pid SERVER_PID [--seconds 30] [--json out.json]

Samples the CPU time (user + system) of the process, its descendants, and every one of their threads
at the start and the end of the window, and prints cores used (CPU seconds / wall seconds) per
process and per thread. The engine loop is the thread named `pdserve-engine` that was created first
in its process (torch's worker threads, created by it later, inherit the name): with the engine
thread (--no-engine-process) it lives in the server process; with the engine process it is that
process's main thread. Its share of a core is the fraction of the window it actually ran: under a
load that always keeps the engine busy, what it lacks from 1.0 is time spent waiting for the GIL or
for a core.
"""
from __future__ import annotations

import argparse
import json
import os
import time

_TICKS = os.sysconf("SC_CLK_TCK")


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def _cpu_seconds(stat: str) -> float:
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS


def process_tree(pid: int) -> list[int]:
    """pid and its live descendants."""
    children: dict[int, list[int]] = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        stat = _read(f"/proc/{entry}/stat")
        if stat:
            children.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(entry))
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo.extend(children.get(current, []))
    return tree


def sample(pids: list[int]) -> dict[tuple[int, int], tuple[str, float]]:
    """(pid, tid) -> (thread name, CPU seconds so far)."""
    result = {}
    for pid in pids:
        try:
            tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
        except OSError:
            continue
        for tid in tids:
            stat, comm = _read(f"/proc/{pid}/task/{tid}/stat"), _read(f"/proc/{pid}/task/{tid}/comm")
            if stat and comm:
                result[(pid, tid)] = (comm.strip(), _cpu_seconds(stat))
    return result


def measure(pid: int, seconds: float) -> dict:
    pids = process_tree(pid)
    names = {p: (_read(f"/proc/{p}/comm") or "?").strip() for p in pids}
    before, started = sample(pids), time.monotonic()
    time.sleep(seconds)
    after, wall = sample(pids), time.monotonic() - started
    threads = []
    for key, (name, cpu) in after.items():
        threads.append({"pid": key[0], "tid": key[1], "name": name,
                        "cores": (cpu - before.get(key, (name, 0.0))[1]) / wall})
    processes = [{"pid": p, "name": names[p], "cores": sum(t["cores"] for t in threads if t["pid"] == p)}
                 for p in pids]
    loops = sorted((t for t in threads if t["name"] == "pdserve-engine"), key=lambda t: (t["pid"], t["tid"]))
    loop = loops[0] if loops else None
    return {"wall_s": wall, "processes": processes, "threads": sorted(threads, key=lambda t: -t["cores"]),
            "engine_loop": loop, "total_cores": sum(p["cores"] for p in processes),
            "load_average": os.getloadavg()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cpu_share")
    parser.add_argument("--pid", type=int, required=True, help="the server process")
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    result = measure(args.pid, args.seconds)
    for process in result["processes"]:
        print(f"process {process['pid']:>7} {process['name']:<16} {process['cores']:.2f} cores")
    for thread in result["threads"][:10]:
        print(f"  thread {thread['tid']:>7} {thread['name']:<16} {thread['cores']:.2f}")
    if result["engine_loop"]:
        print(f"engine loop (tid {result['engine_loop']['tid']}): {result['engine_loop']['cores']:.2f} of a core")
    print(f"total {result['total_cores']:.2f} cores; load average {result['load_average'][0]:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
