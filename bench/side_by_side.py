"""Side-by-side runner: start each system in turn, run the same workload against it, stop it, and
write one table, one JSON file and one set of plots covering all of them.

The workload is built once (same seed, same prompts, same lengths, same arrival draws) and sent to
every system; only the served model name differs per system.
"""
from __future__ import annotations

import dataclasses
import math
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

from bench.plots import cdf_samples, plot_attainment, plot_latency_cdfs
from bench.report import rate_from_json, write_json
from bench.session import BenchSession, resolve_served_model
from bench.systems import RunningSystem, SystemSpec

_NAME_WIDTH = 24


@dataclasses.dataclass(frozen=True)
class SearchOptions:
    rate_low: float = 0.5
    rate_high: float = 2.0
    target: float = 0.9
    rel_tol: float = 0.05
    max_probes: int = 8


def run_comparison(specs: list[SystemSpec], session: BenchSession, rates: list[float],
                   search: SearchOptions | None) -> dict[str, dict[str, Any]]:
    """{system name: {"kind", "num_devices", "runs": [result...], "goodput": {...} | None,
    "error": "" or why it could not be benchmarked}}. A system that fails to start or to answer is
    reported and skipped, so one broken system does not cost the others' results."""
    outcomes: dict[str, dict[str, Any]] = {}
    for spec in specs:
        print(f"\n=== {spec.name}: starting ({spec.kind}) ===", flush=True)
        outcome: dict[str, Any] = {"kind": spec.kind, "num_devices": spec.devices, "runs": [],
                                   "goodput": None, "error": ""}
        try:
            system = RunningSystem(spec, session.output.result_dir)
            with system as base_url:
                _benchmark_system(spec, base_url, session, rates, search, outcome, system.cpu_seconds)
        except (RuntimeError, ValueError) as exc:
            outcome["error"] = str(exc)
            print(f"=== {spec.name}: failed: {exc}", flush=True)
        outcomes[spec.name] = outcome
        print(f"=== {spec.name}: stopped ===", flush=True)
    return outcomes


def _benchmark_system(spec: SystemSpec, base_url: str, session: BenchSession, rates: list[float],
                      search: SearchOptions | None, outcome: dict[str, Any],
                      cpu_seconds: Callable[[], float | None] = lambda: None) -> None:
    """Sweep the rates, then search goodput, appending to `outcome` as results arrive. Each swept run
    and probe records `cores_used`: the server's CPU seconds over the run's wall time (not for a URL)."""
    endpoint = dataclasses.replace(session.endpoint, base_url=base_url)
    model, _ = resolve_served_model(base_url, endpoint.api_key, spec.model)
    system_session = dataclasses.replace(
        session, endpoint=endpoint, model=model,
        info={**session.info, "label": spec.name, "base_url": base_url, "model_id": model})
    system_session.check_ready()
    def run_at(rate: float) -> dict[str, Any]:
        cpu_before, started = cpu_seconds(), time.monotonic()
        run = system_session.run_at(rate)
        cpu_after = cpu_seconds()
        if cpu_before is not None and cpu_after is not None:
            run["cores_used"] = (cpu_after - cpu_before) / max(time.monotonic() - started, 1e-9)
        return run

    for rate in rates:
        outcome["runs"].append(run_at(rate))
    if search is not None:
        found, probe_runs = system_session.search(search.rate_low, search.rate_high, search.target,
                                                  search.rel_tol, search.max_probes, spec.devices, run_at)
        outcome["runs"] += probe_runs
        outcome["goodput"] = found.to_dict()


def format_comparison_table(outcomes: dict[str, dict[str, Any]]) -> str:
    """One row per (system, rate) run, then one row per system's goodput search."""
    header = (f"{'system':<{_NAME_WIDTH}} {'rate':>7} {'req/s':>7} {'attain%':>8} {'TTFT ms':>9} "
              f"{'p99':>9} {'TPOT ms':>9} {'p99':>9} {'out tok/s':>10} {'cores':>6}")
    lines = ["{s:{c}^{n}}".format(s=" Side-by-side Serving Benchmark ", n=len(header), c="="), header]
    for name, outcome in outcomes.items():
        if outcome.get("error"):
            lines.append(f"{name[:_NAME_WIDTH]:<{_NAME_WIDTH}} not benchmarked: "
                         f"{outcome['error'].splitlines()[0][:60]}")
        for run in sorted(outcome["runs"], key=lambda r: rate_from_json(r["request_rate"])):
            rate = rate_from_json(run["request_rate"])
            attainment = run.get("slo_attainment")
            lines.append(
                f"{name[:_NAME_WIDTH]:<{_NAME_WIDTH}} {'inf' if math.isinf(rate) else f'{rate:.2f}':>7} "
                f"{run['request_throughput']:>7.2f} "
                f"{'-' if attainment is None else f'{100 * attainment:.1f}':>8} "
                f"{run['mean_ttft_ms']:>9.1f} {run.get('p99_ttft_ms', float('nan')):>9.1f} "
                f"{run['mean_tpot_ms']:>9.1f} {run.get('p99_tpot_ms', float('nan')):>9.1f} "
                f"{run['output_throughput']:>10.1f} "
                f"{'-' if run.get('cores_used') is None else format(run['cores_used'], '.2f'):>6}")
    searched = {n: o for n, o in outcomes.items() if o.get("goodput")}
    if searched:
        target = next(iter(searched.values()))["goodput"]["target_attainment"]
        lines += ["{s:{c}^{n}}".format(s=f" Goodput (SLO attainment >= {100 * target:g}%) ",
                                       n=len(header), c="-"),
                  f"{'system':<{_NAME_WIDTH}} {'max rate (req/s)':>17} {'devices':>8} {'per device':>11}"]
        for name, outcome in searched.items():
            found = outcome["goodput"]
            bound = ">=" if found["hit_ceiling"] else ""
            lines.append(f"{name[:_NAME_WIDTH]:<{_NAME_WIDTH}} {bound + format(found['max_rate'], '.3f'):>17} "
                         f"{found['num_devices']:>8} {found['goodput_per_device']:>11.3f}")
    lines.append("=" * len(header))
    return "\n".join(lines)


def write_comparison(outcomes: dict[str, dict[str, Any]], result_dir: Path, slos_ms: dict[str, float],
                     target: float | None, cdf_rate: float | None = None) -> list[Path]:
    """The JSON file and the two plots: attainment against rate, and TTFT/TPOT CDFs of each system's
    run at `cdf_rate` (the same rate for all, so the curves compare; else each one's highest rate)."""
    stem = result_dir / f"compare-{datetime.now():%Y%m%d-%H%M%S}"
    paths = [write_json(stem.with_suffix(".json"), {"slos_ms": slos_ms, "systems": outcomes})]
    series = {name: [(rate_from_json(r["request_rate"]), r["slo_attainment"]) for r in o["runs"]
                     if r.get("slo_attainment") is not None and not math.isinf(rate_from_json(r["request_rate"]))]
              for name, o in outcomes.items()}
    if any(series.values()):
        paths.append(plot_attainment(series, target, Path(f"{stem}-attainment.png")))
    cdfs = {}
    for name, outcome in outcomes.items():
        if outcome["runs"]:
            at_rate = [r for r in outcome["runs"] if rate_from_json(r["request_rate"]) == cdf_rate]
            top = at_rate[0] if at_rate else max(outcome["runs"],
                                                 key=lambda r: rate_from_json(r["request_rate"]))
            cdfs[f"{name} @ {top['request_rate']}"] = cdf_samples(top)
    if cdfs:
        paths.append(plot_latency_cdfs(cdfs, Path(f"{stem}-cdf.png"), slos_ms))
    return paths
