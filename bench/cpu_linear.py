"""CPU linear layers: plain `F.linear` against the packed-weight paths torch ships, per shape and M.

    python -m bench.cpu_linear [--threads 1] [--ms 1,2,3,4,8,16,32,64,128,512] [--repeats 5]
                               [--shapes qkv,o,gate_up,down,lm_head] [--hot] [--json out.json]

Shapes are the small model's (`pdserve make-model --size small`): qkv 768->1280, o 768->768, gate_up
768->4096, down 2048->768, lm_head 768->32000. Methods:

    linear        F.linear: MKL sgemm, which re-packs the weight on every call for 2 <= M
    onednn[h]     torch.ops.mkldnn._reorder_linear_weight(w, h) once, then mkldnn._linear_pointwise:
                  a oneDNN matmul on a weight already in the layout oneDNN picks for batch h (what
                  vLLM's CPU build does with its own oneDNN handler, and what inductor's freezing pass
                  emits for dynamic M). Here h = 1 keeps the plain layout and every h >= 2 tried (16,
                  128) gives the same blocked one (AB16b64a with AVX-512): one packed copy serves all M
    mkl[M]        torch.ops.mkl._mkl_reorder_linear_weight(w, M) + mkl._mkl_linear: MKL packed GEMM;
                  the pack is for one M only (inductor uses it for static shapes), so it is re-packed
                  here for every M and its pack time is reported, not counted
    w@xT          torch.mm(w, x.T): the weight as the (non-transposed) A operand; at M = 1 also
                  "w@xT pad2", the row repeated to M = 2
    x@wT          torch.mm(x, wT) on a copy of the weight stored transposed, [K, N]: at M = 1 MKL's
                  gemv over rows of wT (axpy form) instead of dot products over rows of w
    tiled         pdserve's small-M kernel (pdkernels/cpu_native.py) on the weight tiled once into runs
                  of 32 columns, M <= 8 (what PackedLinear runs for 1-8 rows)

By default each method cycles through enough copies of the weight to exceed the last-level cache
several times over, so every call streams its weight from memory as a decode step does (`--hot`
reuses one copy: cache-resident, the usual micro-benchmark). Methods are interleaved within each
repetition and the table shows medians, so machine noise hits every method alike. Times are this
process's CPU time (`--clock cpu`, the default: on a shared machine it leaves out the time other jobs
hold the core; use it with one thread) or wall time (`--clock wall`). Every result is checked against
a float64 reference before it is timed.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from typing import Callable

import torch
import torch.nn.functional as F

SHAPES = {"qkv": (768, 1280), "o": (768, 768), "gate_up": (768, 4096), "down": (2048, 768),
          "lm_head": (768, 32000)}  # name -> (in_features K, out_features N)
_STREAM_BYTES = 160 * 2**20  # several times a 32 MiB L3: every pass streams from DRAM
_TOLERANCE = 1e-3  # max |diff| / max |ref| for float32 against the float64 reference


def _onednn_pack(weight: torch.Tensor, hint: int) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight, hint)


def _methods(weights: list[torch.Tensor], m: int, hints: list[int], with_mkl: bool
             ) -> dict[str, tuple[list, Callable]]:
    """name -> (per-copy prepared weights, fn(x, prepared, original) -> [M, N])."""
    methods: dict[str, tuple[list, Callable]] = {
        "linear": (weights, lambda x, w, orig: F.linear(x, w)),
    }
    for hint in hints:
        packed = [_onednn_pack(w, hint) for w in weights]
        methods[f"onednn[{hint}]"] = (
            packed, lambda x, w, orig: torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], ""))
    if with_mkl:
        packed = [torch.ops.mkl._mkl_reorder_linear_weight(w, m) for w in weights]
        methods["mkl[M]"] = (packed, lambda x, w, orig: torch.ops.mkl._mkl_linear(x, w, orig, None, m))
    methods["w@xT"] = (weights, lambda x, w, orig: torch.mm(w, x.t()).t())
    methods["x@wT"] = ([w.t().contiguous() for w in weights], lambda x, wt, orig: torch.mm(x, wt))
    from pdkernels import cpu_native
    lib = cpu_native.library()
    if lib is not None and m <= cpu_native.MAX_ROWS:
        methods["tiled"] = ([cpu_native.tile_weight(w) for w in weights],
                            lambda x, t, orig: cpu_native.linear(lib, x, t, None, orig.shape[0]))
    if m == 1:  # the M = 2 kernel of w@xT streams faster than MKL's gemv: pad one row to two
        methods["w@xT pad2"] = (weights, lambda x, w, orig: torch.mm(w, torch.cat([x, x]).t())[:, :1].t())
    return methods


def bench_shape(k: int, n: int, ms: list[int], hints: list[int], repeats: int, hot: bool,
                with_mkl: bool, clock: Callable[[], float]) -> list[dict]:
    weight_bytes = n * k * 4
    num_copies = 1 if hot else max(2, math.ceil(_STREAM_BYTES / weight_bytes))
    gen = torch.Generator().manual_seed(n * 7 + k)
    weights = [torch.randn(n, k, generator=gen) / math.sqrt(k) for _ in range(num_copies)]
    rows = []
    for m in ms:
        x = torch.randn(m, k, generator=gen)
        reference = F.linear(x.double(), weights[0].double())                          # [M, N]
        started = time.perf_counter()
        methods = _methods(weights, m, hints, with_mkl)
        prepare_s = time.perf_counter() - started
        errors = {}
        for name, (prepared, fn) in methods.items():
            out = fn(x, prepared[0], weights[0])
            errors[name] = ((out.double() - reference).abs().max() / reference.abs().max()).item()
            if not errors[name] < _TOLERANCE:
                raise AssertionError(f"{name} differs from the float64 reference by {errors[name]:.2e} "
                                     f"(K={k} N={n} M={m})")
        samples: dict[str, list[float]] = {name: [] for name in methods}
        num_calls = max(num_copies, 4)
        for _ in range(repeats + 1):  # the first round warms every path up and is dropped
            for name, (prepared, fn) in methods.items():
                started = clock()
                for i in range(num_calls):
                    fn(x, prepared[i % num_copies], weights[i % num_copies])
                samples[name].append((clock() - started) / num_calls)
        medians = {name: statistics.median(s[1:]) for name, s in samples.items()}
        rows.append({"K": k, "N": n, "M": m, "copies": num_copies, "ms": {k_: v * 1e3 for k_, v in medians.items()},
                     "rel_err": errors, "prepare_s": prepare_s,
                     "stream_gbs": {name: weight_bytes / t / 1e9 for name, t in medians.items()}})
        del methods
    return rows


def print_table(name: str, rows: list[dict]) -> None:
    methods = list(dict.fromkeys(m for row in rows for m in row["ms"]))
    print(f"\n{name}: K={rows[0]['K']} -> N={rows[0]['N']} ({rows[0]['N'] * rows[0]['K'] * 4 / 2**20:.1f} MiB, "
          f"{rows[0]['copies']} copies cycled)   ms per call (x = linear / method; GB/s = weight bytes / time)")
    print(f"{'M':>5} " + " ".join(f"{m:>18}" for m in methods) + f" {'best':>12}")
    for row in rows:
        base = row["ms"]["linear"]
        cells = [f"{row['ms'][m]:8.3f} {base / row['ms'][m]:4.2f}x" + f"{row['stream_gbs'][m]:4.0f}"
                 if m in row["ms"] else "-" for m in methods]
        best = min(row["ms"], key=lambda m: row["ms"][m])
        print(f"{row['M']:>5} " + " ".join(f"{c:>18}" for c in cells) + f" {best:>12}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (pin with taskset as well)")
    parser.add_argument("--ms", default="1,2,3,4,8,16,32,64,128,512")
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--clock", choices=["cpu", "wall"], default="cpu",
                        help="process CPU time (default; one thread) or wall time")
    parser.add_argument("--hints", default="1,128", help="batch-size hints the oneDNN weight is packed for")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--hot", action="store_true", help="one weight copy (cache-resident) instead of streaming")
    parser.add_argument("--no-mkl", action="store_true", help="leave out MKL packed GEMM (it packs per M)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    ms = [int(m) for m in args.ms.split(",")]
    hints = [int(h) for h in args.hints.split(",")]
    with_mkl = not args.no_mkl and torch.backends.mkl.is_available()
    print(f"torch {torch.__version__} threads={torch.get_num_threads()} mkl={torch.backends.mkl.is_available()} "
          f"mkldnn={torch.backends.mkldnn.is_available()} capability={torch.backends.cpu.get_cpu_capability()} "
          f"affinity={sorted(os.sched_getaffinity(0))} load={os.getloadavg()[0]:.2f} "
          f"{'hot (one copy)' if args.hot else 'streaming'} clock={args.clock}")
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    results = {}
    for name in args.shapes.split(","):
        k, n = SHAPES[name]
        results[name] = bench_shape(k, n, ms, hints, args.repeats, args.hot, with_mkl, clock)
        print_table(name, results[name])
    print(f"\nload after: {os.getloadavg()[0]:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
