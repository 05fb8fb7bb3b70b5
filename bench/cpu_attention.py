"""CPU decode attention: this tree's compiled kernel against another revision's, and against reading
the same K/V bytes once.

    python -m bench.cpu_attention [--baseline-rev HEAD~1 | --baseline-tree DIR] [--batches 1,4,8] [--contexts 256,1024]
                                  [--layers 12] [--rounds 5] [--json out.json]

Each side's `pdkernels/csrc/cpu_decode_attention.cpp` (the baseline's from `git show REV:...`) is compiled
alone, with the flags pdkernels/cpu_native.py uses, into a temporary library and called through ctypes on
one thread (pin the process, e.g. `taskset -c 0`). The shapes are the small model's (12 query / 4 KV
heads, head_dim 64, block 16); every layer has its own K/V, so a call streams them from memory as a
decode step does. `read` is torch summing the same K and V tensors: what streaming the bytes once costs.
The sides alternate within each round; the table shows the median of the rounds' best-of-7 times. Both
outputs are checked against each other before anything is timed.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from pdkernels import cpu_native

SOURCE = "pdkernels/csrc/cpu_decode_attention.cpp"
HEADERS = ["pdkernels/csrc/vec.h", "pdkernels/csrc/kernels.h"]
Q_HEADS, KV_HEADS, HEAD_DIM, BLOCK = 12, 4, 64, 16


def _source(root: Path, tree: Path, rev: str | None, name: str) -> str:
    """`name` in the source tree, or at git revision `rev` (before 2026-12-03 the package was `kernels/`)."""
    if rev is None:
        path = tree / name
        return (path if path.exists() else tree / name.removeprefix("pd")).read_text()
    for path in (name, name.removeprefix("pd")):
        shown = subprocess.run(["git", "-C", str(root), "show", f"{rev}:{path}"], capture_output=True, text=True)
        if shown.returncode == 0:
            return shown.stdout
    raise SystemExit(f"{name} is not in revision {rev}: {shown.stderr.strip()}")


def compile_revision(rev: str | None, out_dir: Path, tree: Path | None = None, label: str = "tree") -> ctypes.CDLL:
    """The attention kernel of git revision `rev`, or of the source tree `tree` (default: this one), compiled
    alone under out_dir/label."""
    root = Path(__file__).resolve().parent.parent
    tree = tree or root
    src_dir = out_dir / label
    (src_dir / "pdkernels" / "csrc").mkdir(parents=True, exist_ok=True)
    for name in [SOURCE, *HEADERS]:
        (src_dir / name).write_text(_source(root, tree, rev, name))
    lib_path = src_dir / "attention.so"
    cxx = cpu_native.compiler()
    if cxx is None:
        raise SystemExit("no C++ compiler found (set CXX)")
    subprocess.run([cxx, *cpu_native.FLAGS, str(src_dir / SOURCE), "-o", str(lib_path)], check=True)
    lib = ctypes.CDLL(str(lib_path))
    lib.pdserve_decode_attention.restype = ctypes.c_int
    lib.pdserve_decode_attention.argtypes = [ctypes.c_void_p] * 7 + [ctypes.c_int64] * 5 + [ctypes.c_float,
                                                                                           ctypes.c_int]
    return lib


def case_inputs(batch: int, context: int, layers: int, gen: torch.Generator) -> dict:
    blocks = batch * context // BLOCK
    shape = (blocks, BLOCK, KV_HEADS, HEAD_DIM)
    order = torch.randperm(blocks, generator=gen).to(torch.int32)  # blocks scattered, as a pool hands them out
    return {"k": [torch.randn(shape, generator=gen) for _ in range(layers)],
            "v": [torch.randn(shape, generator=gen) for _ in range(layers)],
            "q": torch.randn(batch, Q_HEADS, HEAD_DIM, generator=gen),
            "tables": order.reshape(batch, context // BLOCK).contiguous(),
            "lens": torch.full((batch,), context, dtype=torch.int32)}


def run_layers(lib: ctypes.CDLL, inputs: dict, out: torch.Tensor) -> None:
    q, tables, lens = inputs["q"], inputs["tables"], inputs["lens"]
    for k, v in zip(inputs["k"], inputs["v"]):
        status = lib.pdserve_decode_attention(q.data_ptr(), k.data_ptr(), v.data_ptr(), tables.data_ptr(),
                                              tables.shape[1], lens.data_ptr(), out.data_ptr(), q.shape[0],
                                              Q_HEADS, KV_HEADS, HEAD_DIM, BLOCK, HEAD_DIM ** -0.5, 1)
        if status != 0:
            raise RuntimeError(f"pdserve_decode_attention returned {status}")


def best_of(fn, calls: int = 7) -> float:
    times = []
    for _ in range(calls):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline-rev", default="HEAD", help="git revision whose kernel is the baseline")
    parser.add_argument("--baseline-tree", default=None,
                        help="a source tree (a checkout of pdserve) whose kernel is the baseline, instead of a revision")
    parser.add_argument("--batches", default="1,4,8")
    parser.add_argument("--contexts", default="256,1024")
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args(argv)
    if any(int(c) % BLOCK for c in args.contexts.split(",")):
        parser.error(f"--contexts must be multiples of the block size ({BLOCK})")
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        baseline = (compile_revision(None, Path(tmp), Path(args.baseline_tree), "baseline") if args.baseline_tree
                    else compile_revision(args.baseline_rev, Path(tmp), label="baseline"))
        libs = {"baseline": baseline, "tree": compile_revision(None, Path(tmp))}
        for batch in map(int, args.batches.split(",")):
            for context in map(int, args.contexts.split(",")):
                inputs = case_inputs(batch, context, args.layers, gen)
                outs = {name: torch.empty_like(inputs["q"]) for name in libs}
                for name, lib in libs.items():
                    run_layers(lib, inputs, outs[name])
                torch.testing.assert_close(outs["tree"], outs["baseline"], atol=2e-5, rtol=2e-5)
                fns = {name: (lambda lib=lib, out=outs[name]: run_layers(lib, inputs, out))
                       for name, lib in libs.items()}
                fns["read"] = lambda: [t.sum() for t in inputs["k"] + inputs["v"]]
                samples = {name: [] for name in fns}
                for _ in range(args.rounds):
                    for name, fn in fns.items():
                        samples[name].append(best_of(fn))
                ms = {name: statistics.median(values) * 1e3 for name, values in samples.items()}
                mbytes = 2 * args.layers * batch * context * KV_HEADS * HEAD_DIM * 4 / 1e6
                rows.append({"batch": batch, "context": context, "kv_mb": mbytes, **{f"{k}_ms": v for k, v in ms.items()},
                             "speedup": ms["baseline"] / ms["tree"], "tree_over_read": ms["tree"] / ms["read"]})
                print(f"{batch:3d} x {context:5d}  K/V {mbytes:6.1f} MB  baseline {ms['baseline']:7.2f} ms  "
                      f"tree {ms['tree']:7.2f} ms  read {ms['read']:6.2f} ms  speedup {rows[-1]['speedup']:.2f}x  "
                      f"tree/read {rows[-1]['tree_over_read']:.2f}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"baseline": args.baseline_tree or args.baseline_rev, "layers": args.layers,
                                               "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
