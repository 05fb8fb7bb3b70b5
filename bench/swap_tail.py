"""Tail latency under frequent priority changes: preemption by swap (block groups, single blocks) against
recompute, on a real server, a multi-turn workload.

    python -m bench.swap_tail --model /tmp/small --json results/swap-tail.json [--num-blocks 96]

For each mode, `pdserve serve --model DIR --scheduling-policy priority --preemption-mode M
[--block-allocation A] --num-gpu-blocks-override N` is started, driven by `pdserve bench serve` with
multi-turn conversations whose every turn carries a fresh random `priority` (--priority-levels: a
conversation's priority changes at every turn, so high-priority arrivals keep preempting running
low-priority requests), and stopped. The KV pool is kept small (--num-blocks) so that preemption is
frequent; the prefix cache is on in every mode (a recomputed request gets back what it still finds
cached, as vLLM V1's recompute does). Reported per mode: TTFT and TBT (inter-token latency) at P50,
P95, P99, mean E2EL, the server's preemptions by mode and swap counters (their change over the run,
which `pdserve bench serve` records), and the recompute / swap ratios of P99 TTFT and P99 TBT (the
issue's goal: >= 1.4x better P99 TTFT than recompute). The same workload (same seed) goes to every mode.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from bench.session import counter_total

MODES = {"recompute": ("--preemption-mode", "recompute"),
         "swap-groups": ("--preemption-mode", "swap", "--block-allocation", "groups"),
         "swap-blocks": ("--preemption-mode", "swap", "--block-allocation", "lru")}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.swap_tail", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--model", required=True, help="model directory to serve")
    parser.add_argument("--modes", default=",".join(MODES), help=f"of {', '.join(MODES)}")
    parser.add_argument("--num-blocks", type=int, default=96, help="KV blocks of 16 tokens (small: frequent preemption)")
    parser.add_argument("--num-conversations", type=int, default=24)
    parser.add_argument("--num-turns", type=int, default=3)
    parser.add_argument("--input-len", type=int, default=160, help="new prompt tokens per turn")
    parser.add_argument("--output-len", type=int, default=48)
    parser.add_argument("--request-rate", type=float, default=0.6, help="conversations per second")
    parser.add_argument("--priority-levels", type=int, default=4)
    parser.add_argument("--max-model-len", type=int, default=1024)
    parser.add_argument("--server-args", default="", help="more `pdserve serve` flags")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--result-dir", default=None, help="where the servers' logs and bench results go")
    parser.add_argument("--json", default=None, metavar="PATH")
    return parser


def run_mode(mode: str, args: argparse.Namespace, result_dir: Path) -> dict[str, Any]:
    import shlex

    from bench.cli import main as bench_main
    from bench.systems import RunningSystem, SystemSpec

    spec = SystemSpec(f"pdserve-{mode}", "pdserve", model=args.model, max_model_len=args.max_model_len,
                      extra_args=("--scheduling-policy", "priority", *MODES[mode], "--num-gpu-blocks-override",
                                  str(args.num_blocks), *shlex.split(args.server_args)))
    name = f"swap-tail-{mode}.json"
    with RunningSystem(spec, result_dir) as base_url:
        code = bench_main(["serve", "--base-url", base_url, "--model", args.model, "--dataset-name", "random",
                           "--num-prompts", str(args.num_conversations), "--num-turns", str(args.num_turns),
                           "--random-input-len", str(args.input_len), "--random-output-len", str(args.output_len),
                           "--random-range-ratio", "0.25", "--priority-levels", str(args.priority_levels),
                           "--request-rate", str(args.request_rate), "--max-model-len", str(args.max_model_len),
                           "--ignore-eos", "--seed", str(args.seed), "--save-result", "--result-dir",
                           str(result_dir), "--result-filename", name, "--disable-tqdm", "--label", spec.name])
    if code not in (0, 1):
        raise RuntimeError(f"pdserve bench serve against {spec.name} exited with {code}")
    result = json.loads((result_dir / name).read_text())
    return summarize(result)


def summarize(result: dict[str, Any]) -> dict[str, Any]:
    """Percentiles from the run's records; preemptions and swaps from the server's counters that
    `pdserve bench serve` recorded over the run (`server_counters`)."""
    counters = result.get("server_counters") or {}
    ok = [not e for e in result["errors"]]
    ttfts = np.array([t for t, good in zip(result["ttfts"], ok) if good and t is not None]) * 1e3
    tbts = np.array([x for itls, good in zip(result["itls"], ok) if good for x in itls]) * 1e3
    e2els = np.array([t for t, good in zip(result["latencies"], ok) if good]) * 1e3
    out = {"requests": len(ok), "failed": len(ok) - sum(ok)}
    for label, values in (("ttft", ttfts), ("tbt", tbts)):
        for q in (50, 95, 99):
            out[f"p{q}_{label}_ms"] = float(np.percentile(values, q)) if len(values) else 0.0
    out["mean_e2el_ms"] = float(e2els.mean()) if len(e2els) else 0.0
    for key in ("preemptions_swap", "preemptions_recompute", "swap_out_bytes", "swap_out_copies", "swap_in_moves",
                "host_prefix_hit_tokens"):
        out[key] = counter_total(counters, f"pdserve:kv_swap_{key}_total")
    out["num_preemptions"] = counter_total(counters, "pdserve:num_preemptions_total")
    return out


def format_table(results: dict[str, dict[str, Any]]) -> str:
    lines = [f"{'mode':<12} {'req':>4} {'preempt':>7} {'swaps':>5} {'TTFT p50':>9} {'p95':>8} {'p99':>8} "
             f"{'TBT p50':>8} {'p95':>7} {'p99':>7} {'E2EL':>8}  (ms)"]
    for mode, r in results.items():
        lines.append(f"{mode:<12} {r['requests']:>4} {r['num_preemptions']:>7.0f} {r['preemptions_swap']:>5.0f} "
                     f"{r['p50_ttft_ms']:>9.0f} {r['p95_ttft_ms']:>8.0f} {r['p99_ttft_ms']:>8.0f} "
                     f"{r['p50_tbt_ms']:>8.0f} {r['p95_tbt_ms']:>7.0f} {r['p99_tbt_ms']:>7.0f} {r['mean_e2el_ms']:>8.0f}")
    base = results.get("recompute")
    for mode, r in results.items():
        if base and mode != "recompute" and r["p99_ttft_ms"] and r["p99_tbt_ms"]:
            lines.append(f"recompute / {mode}: P99 TTFT {base['p99_ttft_ms'] / r['p99_ttft_ms']:.2f}x, "
                         f"P99 TBT {base['p99_tbt_ms'] / r['p99_tbt_ms']:.2f}x (goal: P99 TTFT >= 1.4x)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        print(f"unknown --modes {', '.join(unknown)}: choose from {', '.join(MODES)}")
        return 2
    result_dir = Path(args.result_dir or tempfile.mkdtemp(prefix="swap-tail-"))
    result_dir.mkdir(parents=True, exist_ok=True)
    results = {mode: run_mode(mode, args, result_dir) for mode in modes}
    print(format_table(results))
    if args.json:
        Path(args.json).write_text(json.dumps({"settings": vars(args), "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
