"""How much of a core each process and thread of a running server uses, from /proc (Linux).

    python -m bench.cpu_share --pid SERVER_PID [--seconds 30 | --until-exit LOADGEN_PID] [--json out.json]

Samples the CPU time (user + system) of the process, its descendants, and every one of their threads
at the start and the end of the window, and prints cores used (CPU seconds / wall seconds) per
process and per thread. The engine loop is the thread named `pdserve-engine` that was created first
in its process (torch's worker threads, created by it later, inherit the name): with the engine
thread (--no-engine-process) it lives in the server process; with the engine process it is that
process's main thread. Its share of a core is the fraction of the window it actually ran; the rest is
split from /proc/.../schedstat into time it was runnable but waited for a core (too many runnable
threads for the cores) and time it was blocked (the GIL, a lock, an OpenMP barrier, or no work).
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


def _run_delay_seconds(pid: int, tid: int) -> float:
    """Time spent runnable but waiting for a core (schedstat's second field), 0 if unknown."""
    schedstat = _read(f"/proc/{pid}/task/{tid}/schedstat")
    return int(schedstat.split()[1]) / 1e9 if schedstat else 0.0


def sample(pids: list[int]) -> dict[tuple[int, int], tuple[str, float, float]]:
    """(pid, tid) -> (thread name, CPU seconds so far, seconds waiting for a core so far)."""
    result = {}
    for pid in pids:
        try:
            tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
        except OSError:
            continue
        for tid in tids:
            stat, comm = _read(f"/proc/{pid}/task/{tid}/stat"), _read(f"/proc/{pid}/task/{tid}/comm")
            if stat and comm:
                result[(pid, tid)] = (comm.strip(), _cpu_seconds(stat), _run_delay_seconds(pid, tid))
    return result


def _wait(seconds: float, until_exit: int | None) -> None:
    if until_exit is None:
        time.sleep(seconds)
        return
    while _read(f"/proc/{until_exit}/stat") and _read(f"/proc/{until_exit}/stat").rsplit(")", 1)[1].split()[0] != "Z":
        time.sleep(0.1)


def measure(pid: int, seconds: float, until_exit: int | None = None) -> dict:
    pids = process_tree(pid)
    names = {p: (_read(f"/proc/{p}/comm") or "?").strip() for p in pids}
    before, started = sample(pids), time.monotonic()
    _wait(seconds, until_exit)
    after, wall = sample(pids), time.monotonic() - started
    threads = []
    for key, (name, cpu, delay) in after.items():
        _, cpu_before, delay_before = before.get(key, (name, 0.0, 0.0))
        running, waiting = (cpu - cpu_before) / wall, (delay - delay_before) / wall
        threads.append({"pid": key[0], "tid": key[1], "name": name, "cores": running,
                        "waiting_for_core": waiting, "blocked": max(0.0, 1 - running - waiting)})
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
    parser.add_argument("--until-exit", type=int, default=None,
                        help="instead of --seconds: measure until this process (e.g. the load generator) exits")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    result = measure(args.pid, args.seconds, args.until_exit)
    for process in result["processes"]:
        print(f"process {process['pid']:>7} {process['name']:<16} {process['cores']:.2f} cores")
    for thread in result["threads"][:10]:
        print(f"  thread {thread['tid']:>7} {thread['name']:<16} {thread['cores']:.2f}")
    loop = result["engine_loop"]
    if loop:
        print(f"engine loop (tid {loop['tid']}): ran {loop['cores']:.2f} of the time, waited for a core "
              f"{loop['waiting_for_core']:.2f}, blocked {loop['blocked']:.2f} (GIL, locks, barriers, idle)")
    print(f"total {result['total_cores']:.2f} cores over {result['wall_s']:.1f}s; load average "
          f"{result['load_average'][0]:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
