"""Fairness between tenants under --scheduling-policy fcfs and vtc: per-tenant service, Jain's index of
service, per-tenant mean and P99 TTFT.

    python -m bench.fairness --json results/fairness.json                    # simulated (seconds)
    python -m bench.fairness --real --model DIR --json results/fairness.json  # also a real server

Two tenants, heavy sending three times the requests of light (--tenants heavy:3,light:1), at a rate
well past what the deployment serves, so that both keep requests waiting: FCFS then serves them in
proportion to what they send, VTC (docs/fairness.md) equally.

- Simulated: the discrete-event simulator (scheduler/simulator) drives the real Scheduler on a
  synthetic latency model (a 13B-class model on one GPU, as bench/sim_scale.py), deterministic.
- --real: for each policy, `pdserve serve --model DIR --scheduling-policy P` is started, driven with
  `pdserve bench serve --tenants heavy:3,light:1 --ignore-eos` (the tenant goes as the OpenAI `user`
  field), and stopped.

Service is bench's (bench/metrics.py): prompt tokens x 1 + output tokens x 2 per tenant, counted up
to the first moment a tenant has received all its tokens (while both still had work). Jain's index
here is over raw service (every client weighs 1 on the server), not over the traffic shares that
`pdserve bench`'s own jain_fairness_index divides by.
"""
from __future__ import annotations

import argparse
import json
import random
import shlex
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from bench.config import parse_tenants
from bench.metrics import jain_index, tenant_stats
from bench.records import RequestRecord
from bench.sim_inputs import to_request_records
from bench.sim_scale import LATENCY
from scheduler.config import SchedulerConfig
from scheduler.simulator import SimConversation, SimDeployment, SimInstanceSpec, SimTurn, Simulator

KV_BYTES_PER_TOKEN = 800 * 1024  # 13B-class, bf16: 40 layers x 2 x 5120 x 2 bytes
NUM_LAYERS = 40


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.fairness", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--policies", default="fcfs,vtc", help="scheduling policies to compare")
    parser.add_argument("--tenants", default="heavy:3,light:1", help="tenants and their traffic shares")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, metavar="PATH", help="write the results here")
    sim = parser.add_argument_group("simulated")
    sim.add_argument("--num-requests", type=int, default=3000)
    sim.add_argument("--request-rate", type=float, default=6.0, help="Poisson, requests/s (capacity ~2.5)")
    sim.add_argument("--prompt-len", default="128,1024", help="uniform range of prompt lengths")
    sim.add_argument("--output-len", default="64,512", help="uniform range of output lengths")
    sim.add_argument("--num-blocks", type=int, default=2000, help="KV blocks of 16 tokens")
    sim.add_argument("--max-num-seqs", type=int, default=64)
    real = parser.add_argument_group("real server (--real)")
    real.add_argument("--real", action="store_true", help="also run a real server for each policy")
    real.add_argument("--model", default=None, help="model directory to serve")
    real.add_argument("--real-request-rate", type=float, default=8.0, help="enough to overload the server")
    real.add_argument("--real-num-prompts", type=int, default=200)
    real.add_argument("--real-input-len", type=int, default=256)
    real.add_argument("--real-output-len", type=int, default=64)
    real.add_argument("--server-args", default="", help="more `pdserve serve` flags, e.g. '--max-num-seqs 8'")
    real.add_argument("--result-dir", default=None, help="server logs and bench JSON (default: a temp dir)")
    return parser


# ---- the simulated run ----
def workload(args: argparse.Namespace) -> list[SimConversation]:
    rng = random.Random(args.seed)
    tenants = parse_tenants(args.tenants)
    names, shares = [name for name, _ in tenants], [share for _, share in tenants]
    prompt, output = _range(args.prompt_len, "--prompt-len"), _range(args.output_len, "--output-len")
    now, conversations = 0.0, []
    for i in range(args.num_requests):
        turn = SimTurn(rng.randint(*prompt), rng.randint(*output))
        conversations.append(SimConversation(i, now, (turn,), tenant=rng.choices(names, shares)[0]))
        now += rng.expovariate(args.request_rate)
    return conversations


def simulate(policy: str, args: argparse.Namespace) -> dict[str, Any]:
    config = SchedulerConfig(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=2048, scheduling_policy=policy)
    spec = SimInstanceSpec("replica-0", "colocated", config, args.num_blocks, 16, 4096, LATENCY,
                           KV_BYTES_PER_TOKEN, NUM_LAYERS)
    sim = Simulator(SimDeployment((spec,)))
    result = sim.run(workload(args))
    out = summarize(to_request_records(result.records))
    out["duration_s"] = result.duration_s
    out["num_preemptions"] = result.instances["replica-0"].num_preemptions
    out["scheduler_service"] = sim.instances[0].scheduler.ordering.service()  # VTC's own counters ({} for fcfs)
    return out


def summarize(records: list[RequestRecord]) -> dict[str, Any]:
    """Per-tenant service (bench's definition), share, TTFT mean and P99; Jain's index of service."""
    stats = tenant_stats(records, {}, {})
    total = sum(t.service_tokens for t in stats.values()) or 1.0
    out: dict[str, Any] = {"tenants": {}}
    for name, t in stats.items():
        ttfts = [r.ttft_s * 1000 for r in records if r.tenant == name and r.success]
        out["tenants"][name] = {
            "requests": t.num_requests, "completed": t.completed, "service_tokens": t.service_tokens,
            "service_share": t.service_tokens / total,
            "mean_ttft_ms": float(np.mean(ttfts)) if ttfts else 0.0,
            "p99_ttft_ms": float(np.percentile(ttfts, 99)) if ttfts else 0.0}
    out["jain_index"] = jain_index([t.service_tokens for t in stats.values()])
    return out


# ---- the real server ----
def run_real(policy: str, args: argparse.Namespace, result_dir: Path) -> dict[str, Any]:
    from bench.cli import main as bench_main
    from bench.systems import RunningSystem, SystemSpec

    spec = SystemSpec(f"pdserve-{policy}", "pdserve", model=args.model,
                      extra_args=("--scheduling-policy", policy, *shlex.split(args.server_args)))
    name = f"fairness-{policy}.json"
    with RunningSystem(spec, result_dir) as base_url:
        code = bench_main(bench_argv(args, base_url, result_dir, name, spec.name))
    if code not in (0, 1):  # 1: some requests failed, which the figures show
        raise RuntimeError(f"pdserve bench serve against {spec.name} exited with {code}")
    out = summarize(records_from_result(json.loads((result_dir / name).read_text())))
    out["bench_result"] = str(result_dir / name)
    return out


def bench_argv(args: argparse.Namespace, base_url: str, result_dir: Path, name: str, label: str) -> list[str]:
    """`pdserve bench serve` flags: the tenants' requests (sent with `user`), every reply max length."""
    return ["serve", "--base-url", base_url, "--model", args.model, "--tenants", args.tenants,
            "--request-rate", str(args.real_request_rate), "--num-prompts", str(args.real_num_prompts),
            "--random-input-len", str(args.real_input_len), "--random-output-len", str(args.real_output_len),
            "--random-range-ratio", "0.5", "--ignore-eos", "--seed", str(args.seed), "--save-result",
            "--result-dir", str(result_dir), "--result-filename", name, "--disable-tqdm", "--label", label]


def records_from_result(result: dict[str, Any]) -> list[RequestRecord]:
    """The RequestRecords back from a `pdserve bench serve --save-result` file (its per-request lists)."""
    columns = ("request_tenants", "input_lens", "output_lens", "start_times", "queue_times", "ttfts", "itls",
               "latencies", "errors")
    return [RequestRecord(f"r{i}", tenant, num_prompt_tokens=num_input, num_output_tokens=num_output,
                          arrival_s=start - queued, start_s=start, success=not error and num_output > 0,
                          ttft_s=ttft, itl_s=list(itls), e2el_s=latency, error=error)
            for i, (tenant, num_input, num_output, start, queued, ttft, itls, latency, error)
            in enumerate(zip(*(result[column] for column in columns)))]


# ---- report ----
def format_table(results: dict[str, dict[str, Any]], title: str) -> str:
    header = f"{'policy':<8} {'tenant':<8} {'requests':>8} {'service':>11} {'share':>6} {'TTFT ms':>9} {'P99':>9}"
    lines = [f"== {title} ==", header]
    for policy, result in results.items():
        for tenant, t in sorted(result["tenants"].items()):
            lines.append(f"{policy:<8} {tenant:<8} {t['requests']:>8} {t['service_tokens']:>11.0f} "
                         f"{t['service_share']:>6.2f} {t['mean_ttft_ms']:>9.0f} {t['p99_ttft_ms']:>9.0f}")
        lines.append(f"{policy:<8} Jain's index of service: {result['jain_index']:.3f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    try:
        for policy in policies:
            SchedulerConfig(scheduling_policy=policy)
        if args.real and not args.model:
            raise ValueError("--real needs --model DIR (the model directory to serve)")
        output: dict[str, Any] = {"settings": vars(args), "simulated": {p: simulate(p, args) for p in policies}}
        print(format_table(output["simulated"], "simulated"))
        if args.real:
            result_dir = Path(args.result_dir or tempfile.mkdtemp(prefix="fairness-"))
            output["real"] = {p: run_real(p, args, result_dir) for p in policies}
            print(format_table(output["real"], f"real server ({args.model})"))
    except (ValueError, RuntimeError) as exc:
        print(f"bench.fairness: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(output, indent=2, default=str))
        print(f"result: {path}")
    return 0


def _range(text: str, flag: str) -> tuple[int, int]:
    try:
        low, high = (int(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"{flag} must be LOW,HIGH token counts, e.g. 128,1024; got {text!r}") from None
    if not 1 <= low <= high:
        raise ValueError(f"{flag}: need 1 <= LOW <= HIGH, got {text!r}")
    return low, high


if __name__ == "__main__":
    sys.exit(main())
