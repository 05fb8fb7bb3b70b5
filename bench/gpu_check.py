"""Every check that needs a GPU, in one command: on any CUDA host, or on a lent machine without network.

    python -m bench.gpu_check --out DIR [--only NAME,..] [--budget-s 540] [--model-dir DIR]

Each step runs as its own process under a time limit, most important first, its output in DIR/NAME.txt;
DIR/summary.txt lists every step's status and seconds (with the GPU, torch, Triton and CUDA versions),
DIR/results.tar.gz holds the JSON results; the exit status is 1 when a step failed. Steps whose turn
comes after --budget-s are reported "not run". The steps:

  gpu_tests      every gpu-marked test: the engine against transformers on the GPU, CUDA graphs against
                 --enforce-eager, the swap worker over PCIe and greedy output under heavy swapping,
                 one-sided KV writes into a GPU pool (CUDA IPC), transfers through payloads and slabs,
                 a 1P1D deployment on one GPU
  kernel_tests   tests/pdkernels compiled for the GPU (the CPU suite runs them under Triton's interpreter)
  swap           python -m bench.swap --device cuda: block groups against single blocks over PCIe
  offline        python -m bench.offline_throughput, small model, bfloat16, CUDA graphs (the default)
  offline_eager  the same with --enforce-eager: the graphs' gain is offline / offline_eager
  kernels        python -m bench.kernels: attention, KV copies, norms against torch and the device's bandwidth

`make gpu-check` runs it with the project's virtual environment. On a machine that cannot install
packages (the lent H200s: no network; their python3 holds torch, Triton and most of what pdserve needs),
`make gpu-wheels` downloads here the wheels that image lacks or holds too old (grpcio and protobuf at
least the versions the generated gRPC code was made with, pyzmq) into .whl/, which travels with the
tree; there:

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl \\
        && PYTHONPATH=/tmp/site:. python3 -m bench.gpu_check --out $OUT --json-dir /tmp/gpu-json
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Step:
    name: str
    args: tuple[str, ...]
    timeout_s: int


def gpu_test_files(root: Path = Path("tests")) -> list[str]:
    """The test files with gpu-marked tests, outside tests/pdkernels (its own step). Named rather than
    collected by marker: collecting all of tests/ imports modules that need what a GPU machine's image
    may lack (the HTTP server's and Ray's packages)."""
    return sorted(str(path) for path in root.rglob("test_*.py")
                  if "pdkernels" not in path.parts and "mark.gpu" in path.read_text())


def steps(py: str, out: Path, model_dir: str) -> list[Step]:
    """out: where the JSON results go."""
    pytest = (py, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "--timeout", "240")
    offline = (py, "-m", "bench.offline_throughput", "--model", model_dir, "--dtype", "bfloat16", "--batch-sizes",
               "1,8,32,64", "--input-len", "128", "--output-len", "64", "--skip-transformers")
    return [
        Step("gpu_tests", (*pytest, "-m", "gpu", *gpu_test_files()), 300),
        Step("kernel_tests", (*pytest, "tests/pdkernels"), 240),
        Step("swap", (py, "-m", "bench.swap", "--device", "cuda", "--json", str(out / "swap_groups.json")), 90),
        Step("offline", (*offline, "--json", str(out / "offline_bf16.json")), 150),
        Step("offline_eager", (*offline, "--enforce-eager", "--json", str(out / "offline_bf16_eager.json")), 150),
        Step("kernels", (py, "-m", "bench.kernels", "--out", str(out / "kernels.json")), 150),
    ]


def environment(py: str) -> tuple[bool, str]:
    """(whether `py` sees a CUDA device, a line naming the GPU and the versions, or the import error)"""
    probe = ("import torch, triton; p = torch.cuda.get_device_properties(0) if torch.cuda.is_available() else None; "
             "print(f'torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton.__version__}, '"
             "f'GPU: {p.name if p else None}')")
    done = subprocess.run([py, "-c", probe], capture_output=True, text=True, timeout=120)
    text = (done.stdout or done.stderr).strip()
    line = text.splitlines()[-1] if text else "unknown"
    return done.returncode == 0 and not line.endswith("GPU: None"), line


def run_step(step: Step, out: Path, env: dict[str, str]) -> tuple[str, float]:
    started = time.monotonic()
    with open(out / f"{step.name}.txt", "w") as log:
        log.write("$ " + " ".join(step.args) + "\n")
        log.flush()
        try:
            code = subprocess.run(step.args, stdout=log, stderr=subprocess.STDOUT, env=env,
                                  timeout=step.timeout_s).returncode
            status = "passed" if code == 0 else f"failed (exit {code})"
        except subprocess.TimeoutExpired:
            status = f"failed (over {step.timeout_s} s)"
    return status, time.monotonic() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="directory for the logs, summary and results")
    parser.add_argument("--only", default=None, help="comma-separated step names (default: all, in order)")
    parser.add_argument("--budget-s", type=float, default=540.0,
                        help="start no step after this many seconds (the lent machines give 15 minutes in all)")
    parser.add_argument("--json-dir", default=None, help="where the JSON results go before they are packed into "
                        "results.tar.gz (default: --out; the lent machines return at most 8 files)")
    parser.add_argument("--model-dir", default=None, help="the small model (made with make-model when absent)")
    parser.add_argument("--python", default=sys.executable)
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (os.getcwd(), env.get("PYTHONPATH", "")) if p)
    model_dir = args.model_dir or str(Path("build/models/small").resolve())
    json_dir = Path(args.json_dir) if args.json_dir else out
    json_dir.mkdir(parents=True, exist_ok=True)
    chosen = steps(args.python, json_dir, model_dir)
    if args.only:
        names = args.only.split(",")
        unknown = sorted(set(names) - {s.name for s in chosen})
        if unknown:
            parser.error(f"unknown step(s) {', '.join(unknown)}; the steps: {', '.join(s.name for s in chosen)}")
        chosen = [s for s in chosen if s.name in names]
    if any(s.name.startswith("offline") for s in chosen) and not Path(model_dir, "config.json").exists():
        subprocess.run([args.python, "-c", f"from serving.models.make_model import make_model; "
                        f"make_model('small', {model_dir!r})"], check=True, env=env, timeout=300)
    has_gpu, described = environment(args.python)
    if not has_gpu:  # every gpu-marked test would be skipped and "pass"
        print(f"gpu_check needs a CUDA device that {args.python} can use: {described}", file=sys.stderr)
        return 2
    lines = [f"gpu_check: {described}", f"{'step':<14} {'status':<28} {'seconds':>8}"]
    failed = False
    for step in chosen:
        if time.monotonic() - started > args.budget_s:
            lines.append(f"{step.name:<14} {'not run (budget)':<28} {'':>8}")
            continue
        status, seconds = run_step(step, out, env)
        failed |= status != "passed"
        lines.append(f"{step.name:<14} {status:<28} {seconds:>8.1f}")
        print(lines[-1], flush=True)
    (out / "summary.txt").write_text("\n".join(lines) + "\n")
    with tarfile.open(out / "results.tar.gz", "w:gz") as tar:
        for path in sorted(json_dir.glob("*.json")):
            tar.add(path, arcname=path.name)
    print("\n".join(lines))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
