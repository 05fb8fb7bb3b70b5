"""What a busy neighbour costs a 1P1D instance's steps on the 2-core CPU box (docs/benchmarks.md,
"Simulator and planner", 2026-12-03). For each stored 1P1D validation run (its measured-and-traces
tarball unpacked into DIR), one-prompt prefill steps (ms per prompt token) and one-row decode steps (ms)
split by how much of the step the *other* instance spent computing (< 20%: idle, >= 80%: busy).

    python docs/results/simulator/validation/neighbour-slowdown-2026-12-03/neighbour.py DIR [DIR ...]
"""
import bisect
import glob
import json
import statistics
import sys


def steps(path):
    rows = [json.loads(line) for line in open(path) if line.strip()]
    return sorted(rows, key=lambda row: row["t"])


def busy_share(other, starts, begin, end):
    i, overlap = max(0, bisect.bisect_left(starts, begin) - 1), 0.0
    while i < len(other) and other[i]["t"] < end:
        overlap += max(0.0, min(end, other[i]["t"] + other[i]["s"]) - max(begin, other[i]["t"]))
        i += 1
    return overlap / (end - begin)


def split(own, other, keep, value):
    starts = [row["t"] for row in other]
    idle, busy = [], []
    for row in own:
        if keep(row):
            share = busy_share(other, starts, row["t"], row["t"] + row["s"])
            (idle if share < 0.2 else busy if share >= 0.8 else []).append(value(row))
    return idle, busy


for directory in sys.argv[1:]:
    prefill = steps(glob.glob(f"{directory}/trace/prefill-*.jsonl")[0])
    decode = steps(glob.glob(f"{directory}/trace/decode-*.jsonl")[0])
    p_idle, p_busy = split(prefill, decode, lambda r: len(r["prefill"]) == 1 and not r["decode"],
                           lambda r: r["s"] / r["prefill"][0] * 1e3)
    d_idle, d_busy = split(decode, prefill, lambda r: len(r["decode"]) == 1 and not r["prefill"],
                           lambda r: r["s"] * 1e3)
    mean = statistics.mean
    print(f"{directory}: prefill ms/token idle {mean(p_idle):.3f} (n={len(p_idle)}) busy {mean(p_busy):.3f} "
          f"(n={len(p_busy)}) x{mean(p_busy) / mean(p_idle):.3f}; one-row decode ms idle {mean(d_idle):.1f} "
          f"(n={len(d_idle)}) busy {mean(d_busy):.1f} (n={len(d_busy)}) x{mean(d_busy) / mean(d_idle):.3f}")
