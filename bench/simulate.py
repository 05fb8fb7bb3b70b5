"""`pdserve simulate`: run a workload through a simulated deployment and report it as `pdserve bench` does.

    pdserve simulate --config DEPLOY.yaml --latency-model LAT.json [--cluster CLUSTER.yaml] \\
        --dataset-name synthetic-chat --num-prompts 1000 --request-rate 1,2,4 --goodput ttft:1000 tpot:100
    pdserve simulate --config DEPLOY.yaml --latency-model LAT.json --compare RESULT.json [RESULT.json ...]

The deployment is the YAML `pdserve serve --config` reads; the workload and load flags are those of
`pdserve bench serve` (same seed, same requests, same arrival draws); the output is the same result
table, JSON (--save-result) and plots, from the same metric code, with "simulated" in the label.
`--compare` replays the requests of measured runs (`pdserve bench serve --save-result` files: their
send times, prompt and output lengths) through the simulation and prints both side by side.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

import yaml
from tqdm import tqdm

from bench.cli_args import _add_load_args, _add_output_args, _add_workload_args
from bench.config import EndpointConfig, LoadConfig, WorkloadConfig, parse_slos, parse_tenants
from bench.datasets import build_workload
from bench.metrics import compute_metrics
from bench.plots import cdf_samples, plot_attainment, plot_latency_cdfs
from bench.report import format_result_table, rate_from_json, result_stem, run_result_dict, write_json
from bench.runner import RunResult, RunSpec
from bench.sim_inputs import (LengthSynthesizer, load_cluster, prompt_overhead, sim_conversations, sim_deployment,
                              to_request_records)
from scheduler.latency_plans import LatencyModelSet
from scheduler.simulator import SimConversation, SimDeployment, SimResult, Simulator


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pdserve simulate", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    group = parser.add_argument_group("deployment")
    group.add_argument("--config", required=True, help="deployment YAML (what `pdserve serve --config` reads)")
    group.add_argument("--latency-model", nargs="+", required=True, metavar="FILE_OR_DIR",
                       help="latency models from `pdserve profile` (one JSON per TP x PP plan, or a directory)")
    group.add_argument("--cluster", default=None,
                       help="cluster YAML (nodes, bandwidths; deploy/clusters/example.yaml); default: this machine")
    group.add_argument("--model", default=None, help="model directory (default: the deployment's)")
    group.add_argument("--tokenizer", default=None,
                       help="tokenizer for text datasets and the server's BOS (default: the model's; 'none')")
    group.add_argument("--endpoint", default="/v1/completions",
                       help="the endpoint measured runs use (the chat template adds prompt tokens)")
    group.add_argument("--compare", nargs="+", default=None, metavar="RESULT.json",
                       help="replay these measured runs (pdserve bench serve --save-result) and compare")
    group.add_argument("--target-attainment", type=float, default=0.9, help="for goodput in --compare")
    _add_workload_args(parser)
    _add_load_args(parser)
    _add_output_args(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    try:
        deployment, tokenizer, model_dir = _deployment(args)
        if args.compare:
            from bench.sim_compare import compare_main
            return compare_main(args, deployment)
        return _sweep(args, deployment, tokenizer, model_dir)
    except (ValueError, RuntimeError) as exc:
        print(f"pdserve simulate: error: {exc}", file=sys.stderr)
        return 2


def _deployment(args: argparse.Namespace) -> tuple[SimDeployment, Any, str]:
    from serving.config import Config
    from serving.engine.engine import resolve_model_dir

    try:
        config = Config.load(args.config, {"model": args.model} if args.model else None)
    except OSError as e:
        raise ValueError(f"cannot read the deployment {args.config}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ValueError(f"{args.config} is not valid YAML ({e}); see deploy/1p1d.yaml") from None
    latency = LatencyModelSet.load(args.latency_model)
    cluster = load_cluster(args.cluster) if args.cluster else None
    deployment = sim_deployment(config, latency, cluster, args.max_concurrency)
    model_dir = resolve_model_dir(config.model.model)
    tokenizer = None
    if args.tokenizer != "none":
        from bench.prompts import load_tokenizer
        tokenizer = load_tokenizer(args.tokenizer or config.model.tokenizer or model_dir)
    return deployment, tokenizer, model_dir


def simulate_run(deployment: SimDeployment, conversations: list[SimConversation], show_progress: bool = True,
                 desc: str = "simulating") -> SimResult:
    num_requests = sum(len(c.turns) for c in conversations)
    with tqdm(total=num_requests, disable=not show_progress, unit="req", desc=desc, dynamic_ncols=True) as bar:
        return Simulator(deployment).run(conversations, on_done=lambda record: bar.update(1))


def sim_result_dict(result: SimResult, spec: RunSpec, info: dict[str, Any], tenant_weights: dict[str, float],
                    deployment: SimDeployment) -> dict[str, Any]:
    """bench's result dict of one run (same keys), plus what only a simulation knows under `simulation`."""
    records = to_request_records(result.records)
    duration = max(result.duration_s, 1e-6)
    metrics = compute_metrics(records, duration, list(spec.percentiles), spec.slos_ms, tenant_weights)
    out = run_result_dict(RunResult(spec, records, duration, metrics), info)
    transfer = result.transfer
    out["simulation"] = {
        "wall_s": result.wall_s, "num_events": result.num_events,
        "simulated_requests_per_wall_s": len(records) / max(result.wall_s, 1e-9),
        "num_devices": deployment.num_devices, "max_router_queue": result.max_router_queue,
        "instances": {name: vars(stats).copy() for name, stats in result.instances.items()},
        "kv_transfer": vars(transfer).copy(),
    }
    # as a measured run against a server counts them (bench/session.py: its /metrics, during the run)
    out["num_preemptions"] = sum(stats.num_preemptions for stats in result.instances.values())
    return out


def _sweep(args: argparse.Namespace, deployment: SimDeployment, tokenizer: Any, model_dir: str) -> int:
    rates = [float(r) for r in str(args.request_rate).split(",") if r.strip()]
    arrival = args.arrival or ("poisson" if args.burstiness == 1.0 else "gamma")
    workload_config = WorkloadConfig(
        dataset_name=args.dataset_name, dataset_path=args.dataset_path, num_prompts=args.num_prompts,
        random_input_len=args.random_input_len, random_output_len=args.random_output_len,
        random_range_ratio=args.random_range_ratio, output_len=args.output_len, num_turns=args.num_turns,
        think_time_s=args.think_time, tenants=parse_tenants(args.tenants), prompt_format=args.prompt_format,
        max_model_len=args.max_model_len, seed=args.seed)
    slos = parse_slos(args.goodput)
    percentiles = tuple(float(p) for p in args.metric_percentiles.split(","))
    workload = build_workload(workload_config, LengthSynthesizer(tokenizer))
    if workload.num_dropped:
        print(f"note: {workload.num_dropped} conversations did not fit --max-model-len {args.max_model_len} and "
              "were left out")
    overhead = prompt_overhead(tokenizer, args.endpoint.endswith("chat/completions"))
    label = args.label or "simulated"
    info = {"label": label, "backend": "simulated", "endpoint": args.endpoint, "base_url": None,
            "model_id": model_dir, "tokenizer_id": None, "dataset_name": args.dataset_name,
            "num_prompts": len(workload.conversations), "num_turns": args.num_turns,
            "prompt_format": args.prompt_format, "ignore_eos": True, "seed": args.seed,
            "tenant_weights": workload.tenant_weights, "deployment": args.config,
            "latency_model": list(args.latency_model), "cluster": args.cluster}
    results = []
    for rate in rates:
        load = LoadConfig(request_rate=rate, arrival=arrival, burstiness=args.burstiness,
                          max_concurrency=args.max_concurrency, trace_time_scale=args.trace_time_scale)
        conversations = sim_conversations(workload, load, args.seed, overhead)
        result = simulate_run(deployment, conversations, not args.disable_tqdm, f"rate {rate:g}/s")
        spec = RunSpec(EndpointConfig(endpoint=args.endpoint), model_dir, load, slos, percentiles, args.seed)
        out = sim_result_dict(result, spec, info, workload.tenant_weights, deployment)
        sim = out["simulation"]
        print(format_result_table(out, title="Simulated Serving Benchmark Result"))
        print(f"simulated {out['num_requests']} requests on {sim['num_devices']} device(s) in {sim['wall_s']:.2f} s "
              f"of wall time ({sim['simulated_requests_per_wall_s']:.0f} requests/s)", flush=True)
        results.append(out)
    if args.save_result:
        _save(args, results, slos, model_dir, label)
    return 0


def _save(args: argparse.Namespace, results: list[dict[str, Any]], slos: dict[str, float], model: str,
          label: str) -> None:
    result_dir = Path(args.result_dir)
    many = len(results) > 1

    def stem(rate: float) -> str:
        if args.result_filename:
            return Path(args.result_filename).stem + (f"-{rate:g}qps" if many else "")
        return result_stem(label, model, rate, args.max_concurrency)

    for result in results:
        rate = rate_from_json(result["request_rate"])
        print(f"result: {write_json(result_dir / f'{stem(rate)}.json', result)}")
    base = result_dir / stem(max(rate_from_json(r["request_rate"]) for r in results))
    cdfs = {f"{rate_from_json(r['request_rate']):g} req/s": cdf_samples(r) for r in results}
    print(f"plot: {plot_latency_cdfs(cdfs, Path(f'{base}-cdf.png'), slos)}")
    points = [(rate_from_json(r["request_rate"]), r["slo_attainment"]) for r in results
              if r["slo_attainment"] is not None and not math.isinf(rate_from_json(r["request_rate"]))]
    if points:
        print(f"plot: {plot_attainment({label: points}, None, Path(f'{base}-attainment.png'))}")


if __name__ == "__main__":
    sys.exit(main())
