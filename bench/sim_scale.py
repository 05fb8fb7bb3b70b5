"""How the simulator and the planner scale: simulated requests per second of wall time against cluster
size and request count, and the planner's whole search time against cluster size.

    python -m bench.sim_scale --nodes 1,8,64 --requests 1000,10000 --json results/sim-scale.json
    python -m bench.sim_scale --planner --nodes 1,8,64

The latency model is a synthetic one shaped like a 13B model on a modern GPU (fixed, so runs compare);
the deployment of each size is what the planner would emit for it (disaggregated units of 1 prefill
TP2 + 2 decode TP1 packed on 8-GPU nodes, and colocated replicas for comparison); the workload is
synthetic-chat (ShareGPT-shaped lengths), Poisson, at a rate that loads the cluster to about 80% of
its simulated goodput. One process, one core.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from bench.config import LoadConfig, WorkloadConfig
from bench.datasets import build_workload
from bench.sim_inputs import LengthSynthesizer, sim_conversations, tiled_conversations
from scheduler.config import SchedulerConfig
from scheduler.latency_model import LatencyModel, PhaseCoefficients
from scheduler.latency_plans import LatencyModelSet
from scheduler.planner import ClusterSpec, ModelSetup, ModelShape, Planner, PlannerSettings
from scheduler.planner.placement import pack_first_fit
from scheduler.simulator import LinkSpec, SimDeployment, Simulator

# illustrative, not measured: a 13B dense model in bf16 on one 80 GB GPU
LATENCY = LatencyModel(PhaseCoefficients(0.015, 9e-5, 6e-9), PhaseCoefficients(0.020, 3e-7, 4e-4),
                       meta={"tp": 1, "pp": 1, "dtype": "bfloat16", "note": "synthetic, 13B-class on one GPU"})
SHAPE = ModelShape("13b-like", num_layers=40, hidden_size=5120, intermediate_size=13824, num_heads=40,
                   num_kv_heads=40, head_dim=128, vocab_size=32000, max_position_embeddings=4096)


def cluster(nodes: int) -> ClusterSpec:
    return ClusterSpec(nodes=nodes, devices_per_node=8, device_memory_gib=80, intra_node_bandwidth_gbps=3600,
                       inter_node_bandwidth_gbps=400, transfer_latency_ms=0.5, name=f"{nodes}x8 GPUs")


def setup_for(nodes: int) -> ModelSetup:
    return ModelSetup(SHAPE, cluster(nodes), LatencyModelSet({(1, 1): LATENCY}), "bfloat16", 16, 4096)


def disaggregated(nodes: int) -> SimDeployment:
    """Units of 1 prefill (TP2) + 2 decode (TP1): 4 devices each, 2 per node."""
    setup = setup_for(nodes)
    scheduler = SchedulerConfig(max_num_seqs=256, max_num_batched_tokens=4096)
    prefill = setup.instance_plan("prefill", 2, 1, scheduler)
    decode = setup.instance_plan("decode", 1, 1, scheduler)
    units = nodes * 2
    plans = [prefill] * units + [decode] * (2 * units)
    node_of = pack_first_fit([p.num_devices for p in plans], setup.cluster)
    names = [f"prefill-{i}" for i in range(units)] + [f"decode-{i}" for i in range(2 * units)]
    specs = tuple(setup.spec(n, p, node) for n, p, node in zip(names, plans, node_of))
    c = setup.cluster
    return SimDeployment(specs, LinkSpec(c.intra_node_bytes_per_s, c.inter_node_bytes_per_s, c.transfer_latency_ms / 1e3))


def workload(num: int, rate: float, seed: int = 0):
    config = WorkloadConfig(dataset_name="synthetic-chat", num_prompts=min(num, 5000), max_model_len=4096, seed=seed)
    base = sim_conversations(build_workload(config, LengthSynthesizer(None)), LoadConfig(request_rate=1.0), seed, 1)
    return tiled_conversations(base, LoadConfig(request_rate=rate), seed, num)


def simulator_speed(nodes_list: list[int], requests_list: list[int], rate_per_node: float) -> list[dict]:
    rows = []
    for nodes in nodes_list:
        deployment = disaggregated(nodes)
        for num in requests_list:
            conversations = workload(num, rate_per_node * nodes)
            started, cpu_started = time.perf_counter(), time.process_time()
            result = Simulator(deployment).run(conversations)
            wall, cpu = time.perf_counter() - started, time.process_time() - cpu_started
            tokens = sum(r.num_output_tokens for r in result.records)
            ok = sum(r.success for r in result.records)
            rows.append({"nodes": nodes, "devices": nodes * 8, "instances": len(deployment.instances),
                         "requests": num, "rate": rate_per_node * nodes, "wall_s": wall, "cpu_s": cpu,
                         "simulated_s": result.duration_s, "requests_per_cpu_s": num / cpu,
                         "tokens": tokens, "us_per_token": 1e6 * cpu / max(tokens, 1), "succeeded": ok,
                         "steps": sum(s.num_steps for s in result.instances.values()), "events": result.num_events})
            print(f"{nodes:>3} nodes ({len(deployment.instances)} instances), {num:>6} requests at "
                  f"{rate_per_node * nodes:g} req/s: {cpu:6.1f} s CPU ({wall:.1f} s wall), {num / cpu:6.0f} "
                  f"requests per CPU second, {1e6 * cpu / max(tokens, 1):5.1f} us/token, {ok}/{num} ok", flush=True)
    return rows


def planner_time(nodes_list: list[int], num_requests: int) -> list[dict]:
    rows = []
    for nodes in nodes_list:
        setup = setup_for(nodes)
        base = workload(num_requests, 1.0)

        def conversations(rate: float, num: int):
            return tiled_conversations(base, LoadConfig(request_rate=rate), 0, num)

        def attainment(records) -> float:
            good = 0
            for r in records:
                if r.success:
                    n = r.num_output_tokens
                    tpot = (r.token_times_s[-1] - r.token_times_s[0]) / (n - 1) if n > 1 else 0.0
                    good += r.token_times_s[0] - r.start_s <= 0.25 and tpot <= 0.1
            return good / len(records)

        settings = PlannerSettings(0.25, 0.1, scheduler=SchedulerConfig(max_num_seqs=256, max_num_batched_tokens=4096),
                                   num_requests=num_requests)
        started, cpu_started = time.perf_counter(), time.process_time()
        result = Planner(setup, settings, conversations, attainment).plan()
        wall, cpu = time.perf_counter() - started, time.process_time() - cpu_started
        rows.append({"nodes": nodes, "devices": nodes * 8, "wall_s": wall, "cpu_s": cpu,
                     "simulations": result.num_simulations,
                     "best": result.best.label, "num_units": result.num_units,
                     "per_device": result.best.per_device, "verify_requests": result.verify_num_requests,
                     "verify_wall_s": result.verify_wall_s, "verify_attainment": result.verify_attainment,
                     "placement": result.placement.placement})
        print(f"{nodes:>3} nodes: search {cpu:6.1f} s CPU ({wall:.1f} s wall; {result.num_simulations} simulations; the final check "
              f"{result.verify_wall_s:.1f} s with {result.verify_num_requests} requests): {result.best.label} "
              f"x{result.num_units}, {result.best.per_device:.3g} req/s per device, check "
              f"{100 * result.verify_attainment:.0f}%", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.sim_scale", description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", default="1,8,64", help="cluster sizes (8 GPUs per node)")
    parser.add_argument("--requests", default="1000,10000", help="request counts (simulator speed)")
    parser.add_argument("--rate-per-node", type=float, default=12.0, help="offered load per node (req/s)")
    parser.add_argument("--planner", action="store_true", help="time the planner's search instead")
    parser.add_argument("--planner-requests", type=int, default=400, help="requests per probe in the search")
    parser.add_argument("--json", default=None, help="write the rows here")
    args = parser.parse_args(argv)
    nodes = [int(n) for n in args.nodes.split(",")]
    if args.planner:
        rows = planner_time(nodes, args.planner_requests)
    else:
        rows = simulator_speed(nodes, [int(n) for n in args.requests.split(",")], args.rate_per_node)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
