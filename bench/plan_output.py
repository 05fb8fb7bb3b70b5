"""What `pdserve plan` writes: the deployment YAML (`pdserve serve --config` runs it as is), the report
(top plans, goodput per device, bottlenecks, P:D ratio) and a JSON of the whole search."""
from __future__ import annotations

from typing import Any

import yaml

from scheduler.planner import ClusterSpec, ModelShape, PlannerResult, Unit
from scheduler.planner.instances import InstancePlan


def role_keys(plan: InstancePlan, shape: ModelShape, dtype: str, block_size: int) -> dict[str, Any]:
    """The keys of one role: its parallel plan and the KV budget that gives the runtime the number of
    blocks the plan was simulated with. The budget is per rank (--kv-cache-memory-bytes), so it is the
    blocks times one rank's bytes per block: its share of the KV heads, its stage's layers."""
    bytes_per_block = shape.kv_layout(block_size, dtype, plan.tp, plan.pp).bytes_per_block
    return {"tensor_parallel_size": plan.tp, "pipeline_parallel_size": plan.pp,
            "kv_cache_memory_bytes": plan.num_blocks * bytes_per_block}


def deployment_dict(result: PlannerResult, shape: ModelShape, cluster: ClusterSpec, model: str | None,
                    dtype: str, block_size: int, max_model_len: int, launcher: str) -> dict[str, Any]:
    best = result.best
    plans = best.plans
    scheduler = plans[0].scheduler
    cpu = cluster.device == "cpu"
    devices_per_instance = max(p.num_devices for p in plans)
    deploy: dict[str, Any] = {"launcher": launcher}
    config: dict[str, Any] = {
        "model": {"model": model, "max_model_len": max_model_len, "dtype": dtype, "device": "cpu" if cpu else "cuda"},
        "cache": {"block_size": block_size},
        "scheduler": {"max_num_seqs": scheduler.max_num_seqs, "max_num_batched_tokens": scheduler.max_num_batched_tokens},
        "deploy": deploy,
    }
    if best.kind == "colocated":
        keys = role_keys(plans[0], shape, dtype, block_size)
        config["cache"]["kv_cache_memory_bytes"] = keys.pop("kv_cache_memory_bytes")
        config["parallel"] = keys
        deploy.update({"mode": "colocated", "num_replicas": result.num_units})
    else:
        (prefill, decode), (n_p, n_d) = plans, best.counts
        deploy.update({"mode": "disaggregated", "num_prefill": n_p * result.num_units,
                       "num_decode": n_d * result.num_units, "same_node": best.placement == "same node",
                       "prefill_overrides": role_keys(prefill, shape, dtype, block_size),
                       "decode_overrides": role_keys(decode, shape, dtype, block_size)})
    if cpu:
        deploy.update({"num_cpus_per_instance": devices_per_instance, "num_gpus_per_instance": 0})
    else:
        deploy.update({"num_cpus_per_instance": 1, "num_gpus_per_instance": devices_per_instance})
    if launcher == "ray" and cluster.nodes > 1:
        deploy.update({"ray_address": "auto", "internal_host": "0.0.0.0"})
    return config


def deployment_yaml(result: PlannerResult, settings_text: str, **kwargs: Any) -> str:
    best = result.best
    header = [f"# pdserve plan: {best.label}, x{result.num_units} = {result.num_devices} devices; simulated goodput "
              f"{best.goodput.rate * result.num_units:.3g} req/s ({best.per_device:.3g} req/s per device)",
              f"# {settings_text}",
              "# Start it: pdserve serve --config THIS_FILE   (the report beside it says why this plan)"]
    if any(p.tp > 1 or p.pp > 1 for p in best.plans):
        header.append("# tensor/pipeline parallelism > 1 is refused at start until the runtime implements it "
                      "(issue 'Tensor and pipeline parallelism')")
    body = yaml.safe_dump(deployment_dict(result, **kwargs), sort_keys=False, default_flow_style=False)
    return "\n".join(header) + "\n" + body


def _unit_row(rank: int, unit: Unit) -> str:
    utilization = {}
    failing = [p for p in unit.goodput.probes if p.rate == unit.goodput.upper]
    if failing:
        utilization = failing[0].utilization
    busy = ", ".join(f"{role} {100 * share:.0f}%" for role, share in sorted(utilization.items())) or "-"
    return (f"| {rank} | {unit.label} | {unit.num_devices} | {unit.goodput.rate:.3g} | {unit.per_device:.3g} | "
            f"{unit.goodput.bottleneck} | {busy} |")


def ratio_text(result: PlannerResult) -> str:
    disaggregated = [u for u in result.units if u.kind == "disaggregated" and u.goodput.rate > 0]
    colocated = [u for u in result.units if u.kind == "colocated" and u.goodput.rate > 0]
    if not disaggregated:
        tried = any(u.kind == "disaggregated" for u in result.units)
        return ("P:D ratio: no disaggregated plan met the SLOs." if tried else
                "P:D ratio: no disaggregated unit was simulated (none fits the cluster, or they were left out).")
    best = disaggregated[0]
    (p, d), (n_p, n_d) = best.plans, best.counts
    devices = f"{n_p * p.num_devices}:{n_d * d.num_devices} devices"
    text = (f"Recommended P:D ratio: {n_p}:{n_d} instances ({devices}; prefill {p.label}, decode {d.label}), "
            f"{best.per_device:.3g} req/s per device")
    if colocated:
        gain = best.per_device / colocated[0].per_device if colocated[0].per_device else float("inf")
        text += f", {gain:.2f}x the best colocated plan ({colocated[0].label}, {colocated[0].per_device:.3g})"
    return text + "."


def report_text(result: PlannerResult, header: list[str], top: int = 8) -> str:
    best = result.best
    lines = header + [
        f"Placement: {result.placement.placement} — {result.placement.reason}.",
        f"Chosen: {best.label} x{result.num_units} ({result.num_devices} devices): simulated goodput "
        f"{best.goodput.rate:.3g} req/s per unit, {best.per_device:.3g} req/s per device; bottleneck beyond it: "
        f"{best.goodput.bottleneck}.",
        f"Check: the whole deployment simulated with {result.verify_num_requests} requests at "
        f"{result.verify_rate:.3g} req/s: SLO attainment {100 * result.verify_attainment:.1f}% "
        f"({result.verify_wall_s:.1f} s of wall time).",
        ratio_text(result), "",
        "Top plans by simulated goodput per device (bottleneck: where requests missed their SLOs at the "
        "lowest failing rate probed; busy: mean busy share per role there):", "",
        "| # | plan | devices | goodput (req/s) | per device | bottleneck | busy |", "|---|---|---|---|---|---|---|"]
    lines += [_unit_row(i + 1, unit) for i, unit in enumerate(result.units[:top])]
    lines += ["", "Level 1 (each phase alone, one instance):", "",
              "| role | plan | KV blocks | goodput (req/s) | per device | latency model |", "|---|---|---|---|---|---|"]
    for role, scores in result.phases.items():
        for score in scores[:5]:
            plan = score.plan
            lines.append(f"| {role} | {plan.label} | {plan.num_blocks} | {score.goodput.rate:.3g} | "
                         f"{score.per_device:.3g} | {plan.latency_source} |")
    if result.skipped:
        shown = list(result.skipped.items())[:6]
        more = len(result.skipped) - len(shown)
        lines += ["", "Plans that cannot run: " + "; ".join(f"{k}: {v}" for k, v in shown)
                  + (f"; and {more} more" if more else "")]
    lines += ["", f"Search: {result.num_simulations} simulations in {result.search_wall_s:.1f} s of wall time."]
    return "\n".join(lines)


def result_json(result: PlannerResult) -> dict[str, Any]:
    def plan(p: InstancePlan) -> dict[str, Any]:
        return {"role": p.role, "tp": p.tp, "pp": p.pp, "num_blocks": p.num_blocks, "latency": p.latency_source}

    def probes(goodput) -> list[dict[str, Any]]:
        return [vars(p).copy() for p in goodput.probes]

    return {
        "best": result.best.label, "num_units": result.num_units, "num_devices": result.num_devices,
        "placement": vars(result.placement).copy(),
        "verify": {"rate": result.verify_rate, "attainment": result.verify_attainment,
                   "num_requests": result.verify_num_requests, "wall_s": result.verify_wall_s},
        "units": [{"label": u.label, "kind": u.kind, "plans": [plan(p) for p in u.plans], "counts": list(u.counts),
                   "devices": u.num_devices, "goodput": u.goodput.rate, "per_device": u.per_device,
                   "bottleneck": u.goodput.bottleneck, "probes": probes(u.goodput)} for u in result.units],
        "phases": {role: [{"plan": plan(s.plan), "goodput": s.goodput.rate, "per_device": s.per_device,
                           "probes": probes(s.goodput)} for s in scores] for role, scores in result.phases.items()},
        "skipped": result.skipped, "search_wall_s": result.search_wall_s, "num_simulations": result.num_simulations,
    }
