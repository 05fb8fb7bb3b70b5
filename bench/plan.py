"""`pdserve plan`: choose a deployment for SLOs by simulating goodput (DistServe's two-level search).

    pdserve plan --model DIR --cluster CLUSTER.yaml --latency-model LAT.json \\
        --dataset-name synthetic-chat --goodput ttft:250 tpot:100 --out plan.yaml [--request-rate 20]

Per phase, each TP x PP plan that fits is simulated alone; the best of each phase are combined into
units of n_p prefill + n_d decode instances (and colocated replicas compete too), each simulated whole
and bisected for its goodput per device; the best unit fills the cluster (or serves --request-rate).
Writes the deployment YAML (`pdserve serve --config plan.yaml` runs it), prints the report (top plans,
bottlenecks, P:D ratio) and, with --save-result, the report, a JSON of the search and a plot of
simulated attainment against rate per device for the top plans. The search itself is in
scheduler/planner/search.py.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tqdm import tqdm

from bench.cli_args import _add_workload_args
from bench.config import LoadConfig, WorkloadConfig, parse_slos, parse_tenants
from bench.datasets import build_workload
from bench.metrics import slo_attainment
from bench.plan_output import deployment_yaml, report_text, result_json
from bench.plots import plot_attainment
from bench.report import write_json
from bench.sim_inputs import (LengthSynthesizer, load_cluster, model_shape, prompt_overhead, sim_conversations,
                              tiled_conversations, to_request_records)
from scheduler.config import SchedulerConfig
from scheduler.latency_plans import LatencyModelSet
from scheduler.planner import ModelSetup, Planner, PlannerSettings


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pdserve plan", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    group = parser.add_argument_group("inputs")
    group.add_argument("--model", required=True, help="model directory (its config.json is what is read)")
    group.add_argument("--cluster", required=True, help="cluster YAML (deploy/clusters/example.yaml)")
    group.add_argument("--latency-model", nargs="+", required=True, metavar="FILE_OR_DIR",
                       help="latency models from `pdserve profile`, one JSON per TP x PP plan (or a directory)")
    group.add_argument("--goodput", nargs="+", required=True, metavar="KEY:MS",
                       help="the SLOs, e.g. --goodput ttft:250 tpot:100 (both are needed)")
    group.add_argument("--target-attainment", type=float, default=0.9, help="fraction meeting both SLOs")
    group.add_argument("--request-rate", type=float, default=None,
                       help="size the deployment for this rate (req/s); default: fill the cluster")
    group.add_argument("--arrival", default="poisson", choices=["poisson", "gamma", "constant"])
    group.add_argument("--burstiness", type=float, default=1.0)
    group = parser.add_argument_group("search")
    group.add_argument("--tp-sizes", default="1,2,4,8", help="tensor-parallel sizes to try")
    group.add_argument("--pp-sizes", default="1,2,4", help="pipeline-parallel sizes to try")
    group.add_argument("--top-k", type=int, default=2, help="plans per phase combined into units")
    group.add_argument("--max-probes", type=int, default=8, help="simulations per goodput bisection")
    group.add_argument("--verify-requests", type=int, default=10_000, help="requests in the final check")
    group.add_argument("--no-colocated", action="store_true", help="leave colocated replicas out")
    group.add_argument("--no-disaggregated", action="store_true", help="leave disaggregated plans out")
    group = parser.add_argument_group("deployment")
    group.add_argument("--out", default="plan.yaml", help="where to write the deployment YAML")
    group.add_argument("--launcher", default=None, choices=["local", "ray"],
                       help="default: local on one node, ray on several")
    group.add_argument("--dtype", default="auto", help="weights and KV dtype (auto: the latency model's)")
    group.add_argument("--block-size", type=int, default=16)
    group.add_argument("--max-num-seqs", type=int, default=128)
    group.add_argument("--max-num-batched-tokens", type=int, default=2048)
    group.add_argument("--tokenizer", default=None, help="tokenizer for text datasets (default: the model's)")
    group = parser.add_argument_group("output")
    group.add_argument("--save-result", action="store_true", help="also write the report, JSON and plot")
    group.add_argument("--result-dir", default="results")
    group.add_argument("--disable-tqdm", action="store_true")
    _add_workload_args(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    try:
        return _plan(args)
    except (ValueError, RuntimeError) as exc:
        print(f"pdserve plan: error: {exc}", file=sys.stderr)
        return 2


def _sizes(text: str, flag: str) -> tuple[int, ...]:
    try:
        sizes = tuple(sorted({int(x) for x in text.split(",") if x.strip()}))
    except ValueError:
        raise ValueError(f"{flag}: write whole numbers separated by commas, e.g. 1,2,4") from None
    if not sizes or min(sizes) < 1:
        raise ValueError(f"{flag} needs sizes of at least 1")
    return sizes


def _plan(args: argparse.Namespace) -> int:
    slos = parse_slos(args.goodput)
    if "ttft" not in slos or "tpot" not in slos:
        raise ValueError("the planner needs both SLOs: --goodput ttft:MS tpot:MS")
    shape = model_shape(args.model)
    cluster = load_cluster(args.cluster)
    latency = LatencyModelSet.load(args.latency_model)
    dtype = args.dtype if args.dtype != "auto" else (latency.dtype or ("float32" if cluster.device == "cpu" else "bfloat16"))
    max_model_len = min(args.max_model_len or shape.max_position_embeddings, shape.max_position_embeddings)
    tokenizer = None
    if args.tokenizer != "none":
        from bench.prompts import load_tokenizer
        tokenizer = load_tokenizer(args.tokenizer or args.model)
    workload_config = WorkloadConfig(
        dataset_name=args.dataset_name, dataset_path=args.dataset_path, num_prompts=args.num_prompts,
        random_input_len=args.random_input_len, random_output_len=args.random_output_len,
        random_range_ratio=args.random_range_ratio, output_len=args.output_len, num_turns=args.num_turns,
        think_time_s=args.think_time, tenants=parse_tenants(args.tenants), max_model_len=max_model_len, seed=args.seed)
    workload = build_workload(workload_config, LengthSynthesizer(tokenizer))
    base = sim_conversations(workload, LoadConfig(request_rate=1.0), args.seed, prompt_overhead(tokenizer))

    def conversations(rate: float, num_requests: int):
        return tiled_conversations(base, LoadConfig(request_rate=rate, arrival=args.arrival,
                                                    burstiness=args.burstiness), args.seed, num_requests)

    def attainment(records) -> float:
        return slo_attainment(to_request_records(records), slos) or 0.0

    settings = PlannerSettings(
        slos["ttft"] / 1e3, slos["tpot"] / 1e3, args.target_attainment,
        SchedulerConfig(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens),
        num_requests=args.num_prompts, verify_requests=args.verify_requests, request_rate=args.request_rate,
        tp_sizes=_sizes(args.tp_sizes, "--tp-sizes"), pp_sizes=_sizes(args.pp_sizes, "--pp-sizes"),
        top_k=args.top_k, max_probes=args.max_probes, include_colocated=not args.no_colocated,
        include_disaggregated=not args.no_disaggregated)
    setup = ModelSetup(shape, cluster, latency, dtype, args.block_size, max_model_len, enable_prefix_caching=True)
    with tqdm(disable=args.disable_tqdm, unit="plan", desc="planning", dynamic_ncols=True) as bar:
        def progress(message: str) -> None:
            bar.set_postfix_str(message)
            bar.update(1)
        result = Planner(setup, settings, conversations, attainment, progress).plan()
    launcher = args.launcher or ("local" if cluster.nodes == 1 else "ray")
    settings_text = (f"{shape.name} on {cluster.name} ({cluster.nodes}x{cluster.devices_per_node} {cluster.device}s); "
                     f"SLOs TTFT <= {slos['ttft']:g} ms, TPOT <= {slos['tpot']:g} ms for "
                     f"{100 * args.target_attainment:g}% of requests; workload {args.dataset_name}")
    text = deployment_yaml(result, settings_text, shape=shape, cluster=cluster, model=args.model, dtype=dtype,
                           block_size=args.block_size, max_model_len=max_model_len, launcher=launcher)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    mean_in = sum(c.turns[0].num_input_tokens for c in base) / len(base)
    mean_out = sum(c.turns[0].num_output_tokens for c in base) / len(base)
    header = [f"# Plan: {settings_text}", "",
              f"Workload: {args.dataset_name}, {len(base)} conversations (mean {mean_in:.0f} prompt / {mean_out:.0f} "
              f"output tokens), {args.arrival} arrivals; dtype {dtype}.",
              f"Deployment written to {args.out}.", ""]
    report = report_text(result, header)
    print(report)
    if args.save_result:
        _save(args, result, report)
    return 0


def _save(args: argparse.Namespace, result, report: str) -> None:
    out = Path(args.result_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = Path(args.out).stem
    (out / f"{stem}-report.md").write_text(report + "\n")
    print(f"report: {out / f'{stem}-report.md'}")
    print(f"result: {write_json(out / f'{stem}-search.json', result_json(result))}")
    series = {}
    for unit in result.units[:5]:
        series[f"{unit.label} ({unit.num_devices} dev)"] = [(p.rate / unit.num_devices, p.attainment)
                                                           for p in unit.goodput.probes]
    plot = plot_attainment(series, args.target_attainment, out / f"{stem}-attainment.png",
                           title="Simulated SLO attainment, top plans", xlabel="request rate per device (req/s)")
    print(f"plot: {plot}")


if __name__ == "__main__":
    sys.exit(main())
