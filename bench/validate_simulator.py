"""Simulated against measured: for each deployment (colocated, 1P1D), serve it for real, run the workload
at several rates with `pdserve bench serve`, replay each measured run through the simulation of the same
deployment YAML (`pdserve simulate --compare`), and print attainment per rate side by side.

    python -m bench.validate_simulator --model DIR \\
        --latency-model colocated=LAT_2THREADS.json --latency-model 1p1d=LAT_1THREAD.json \\
        --dataset-name random --random-input-len 256 --random-output-len 32 --random-range-ratio 0.5 \\
        --num-prompts 40 --request-rate 0.5,1,2,4 --goodput ttft:2000 tpot:200 --result-dir results/sim-validation

Every flag it does not know goes to `pdserve bench serve` unchanged (workload, rates, SLOs, --seed).

Every served engine traces its steps (`--step-trace-dir`, scheduler/step_trace.py), and each rate is also
simulated with a latency model fitted *in place*: from the steps the same deployment took during the
*other* rates' runs (leave one rate out, so no run is priced by its own steps). Both simulations are
reported: the profile's (one runner alone on an idle machine) and the in-place one (the step cost the
instances really had, with their neighbours). --latency-model is then optional.
Each system's deployment YAML is written into the result directory first, and the same file is served
and simulated. The goal (the issue's): attainment within 5 percentage points at every rate, goodput
within 10%. Latency models must be profiled with the torch threads each instance gets: the colocated
engine uses both cores, a 1P1D instance one (`pdserve profile --threads 1`).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

from bench.systems import RunningSystem, SystemSpec

SYSTEMS = {
    "colocated": {"deploy": {"mode": "colocated"}, "cache": {"kv_cache_memory_bytes": "2GiB"}},
    "1p1d": {"deploy": {"mode": "disaggregated", "num_prefill": 1, "num_decode": 1, "num_cpus_per_instance": 1},
             "cache": {"kv_cache_memory_bytes": "1GiB"}},
    # one colocated engine over two tensor-parallel ranks (a plan the simulator prices from a tp=2 profile,
    # or scales from a tp=1 one)
    "colocated-tp2": {"deploy": {"mode": "colocated"}, "parallel": {"tensor_parallel_size": 2},
                      "cache": {"kv_cache_memory_bytes": "1GiB"}},
    # two pipeline stages with plans in flight (priced from a pp=2 profile of a lone plan, or scaled; in
    # place, from the plans the engine ran: their own work through the stages and their stage holds)
    "colocated-pp2": {"deploy": {"mode": "colocated"}, "parallel": {"pipeline_parallel_size": 2},
                      "cache": {"kv_cache_memory_bytes": "1GiB"}},
    # a KV pool too small for the load, preempting by swap (priced from the profile's swap cost; run it
    # with --max-model-len 1024, which the pool must hold)
    "colocated-swap": {"deploy": {"mode": "colocated"}, "scheduler": {"preemption_mode": "swap"},
                       "cache": {"kv_cache_memory_bytes": "24MiB", "swap_space": 1}},
}


def deployment_yaml(system: str, model: str, max_model_len: int) -> dict:
    """What is served and simulated. Prefix caching is off: every rate replays the same prompts."""
    spec = SYSTEMS[system]
    deployment = {"model": {"model": model, "max_model_len": max_model_len},
                  "cache": {**spec["cache"], "enable_prefix_caching": False},
                  "deploy": dict(spec["deploy"])}
    for section in ("parallel", "scheduler"):
        if section in spec:
            deployment[section] = dict(spec[section])
    return deployment


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.validate_simulator", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--model", required=True, help="model directory (served and simulated)")
    parser.add_argument("--latency-model", action="append", default=[], metavar="SYSTEM=FILE",
                        help="profiled latency model per system, e.g. colocated=lat2.json (repeat per system); "
                             "without one a system is simulated with its in-place fit only")
    parser.add_argument("--systems", default="colocated,1p1d",
                        help="comma list of colocated, 1p1d, colocated-tp2, colocated-pp2, colocated-swap")
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--cluster", default="deploy/clusters/cpu.yaml", help="links for the simulated transfers")
    parser.add_argument("--result-dir", default="results/sim-validation")
    parser.add_argument("--target-attainment", type=float, default=0.9)
    parser.add_argument("--resimulate", action="store_true",
                        help="serve nothing: simulate again the measured runs and traces already in "
                             "--result-dir/SYSTEM/ (a changed simulator or fit against the same measurements)")
    args, bench_args = parser.parse_known_args(argv)
    latency = dict(item.split("=", 1) for item in args.latency_model)
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = [s for s in systems if s not in SYSTEMS]
    if unknown:
        parser.error(f"systems {unknown}: each must be one of {', '.join(SYSTEMS)}")
    out = Path(args.result_dir)
    summary = {}
    for system in systems:
        summary[system] = validate(system, args, bench_args, latency.get(system), out / system)
    lines = ["| system | rate | measured attainment | simulated (profile) | Δ (pp) | simulated (in place) | Δ (pp) "
             "| mean TPOT ms measured / profile / in place |", "|---|---|---|---|---|---|---|---|"]
    for system, result in summary.items():
        for rate, row in sorted(result["rows"].items()):
            m = row["measured"]["slo_attainment"]
            cells = [f"{system}", f"{rate:g}", f"{100 * m:.1f}%"]
            for key in ("profile", "in_place"):
                sim = row.get(key)
                cells += ([f"{100 * sim['slo_attainment']:.1f}%", f"{100 * (sim['slo_attainment'] - m):+.1f}"]
                          if sim else ["-", "-"])
            tpots = [row["measured"]] + [row.get(k) for k in ("profile", "in_place")]
            cells.append(" / ".join(f"{t['mean_tpot_ms']:.1f}" if t else "-" for t in tpots))
            lines.append("| " + " | ".join(cells) + " |")
    for system, result in summary.items():
        for key, text in result["goodput"].items():
            lines.append(f"\n{system} ({key}): {text}")
    text = "\n".join(lines)
    print(text)
    (out / "summary.md").write_text(text + "\n")
    print(f"summary: {out / 'summary.md'}")
    return 0


def validate(system: str, args: argparse.Namespace, bench_args: list[str], latency: str | None, out: Path) -> dict:
    """Serve, measure, then simulate every rate with the profile (if given) and with the in-place fit of
    the other rates' steps. Returns {"rows": {rate: {"measured", "profile", "in_place"}}, "goodput": {...}}.
    With --resimulate the measurements already in `out` are simulated again."""
    from bench.sim_compare import goodput_summary
    from bench.simulate import main as simulate_main
    from scheduler import step_trace
    from scheduler.latency_model import LatencyModel

    trace_dir = out / "trace"
    config_path = out / f"{system}.yaml"
    if args.resimulate:
        if not (config_path.exists() and trace_dir.is_dir()):
            raise RuntimeError(f"--resimulate needs {config_path} and {trace_dir} from an earlier run")
    else:
        serve_and_measure(system, args, bench_args, out, config_path, trace_dir)
    measured = sorted(str(p) for p in out.glob("measured*.json"))
    if not measured:
        raise RuntimeError(f"no measured result was written for {system} in {out}")

    def simulate(latency_model: str, files: list[str], filename: str) -> dict:
        simulate_main(["--config", str(config_path), "--latency-model", latency_model, "--cluster", args.cluster,
                       "--compare", *files, "--save-result", "--result-dir", str(out), "--result-filename",
                       filename, "--target-attainment", str(args.target_attainment), "--disable-tqdm"])
        return json.loads((out / filename).read_text())

    rows: dict[float, dict] = {}
    goodput: dict[str, str] = {}
    if latency:
        compared = simulate(latency, measured, "compare.json")
        for row in compared["rows"]:
            rows.setdefault(row["rate"], {})["measured"] = row["measured"]
            rows[row["rate"]]["profile"] = row["simulated"]
        if compared.get("goodput"):
            goodput["profile"] = compared["goodput"]["text"]
    parallel = SYSTEMS[system].get("parallel", {})
    tp, pp = parallel.get("tensor_parallel_size", 1), parallel.get("pipeline_parallel_size", 1)
    swap = LatencyModel.load(latency).meta.get("swap") if latency else None  # the copies' cost is no step's
    # in place: each rate priced by the steps of the other rates' runs
    windows = {}
    for path in measured:
        result = json.loads(Path(path).read_text())
        windows[path] = (result["started_at"], result["started_at"] + result["duration"])
    in_place_rows = []
    for path in measured:
        others = [step for other, (start, end) in windows.items() if other != path
                  for step in step_trace.read([trace_dir], since=start, until=end)]
        name = Path(path).stem
        meta = {"system": system, "left_out": name, "tp": tp, "pp": pp}
        if swap:  # the profile's
            meta["swap"] = swap
        model = (step_trace.fit_pipelined if pp > 1 else step_trace.fit)(others, meta=meta)
        model_path = out / f"latency-in-place-without-{name}.json"
        model.save(str(model_path))
        compared = simulate(str(model_path), [path], f"compare-in-place-{name}.json")
        row = compared["rows"][0]
        rows.setdefault(row["rate"], {})["measured"] = row["measured"]
        rows[row["rate"]]["in_place"] = row["simulated"]
        in_place_rows.append(row)
    summary = goodput_summary(sorted(in_place_rows, key=lambda row: row["rate"]), args.target_attainment)
    if summary:
        goodput["in place"] = summary["text"]
    (out / "validation.json").write_text(json.dumps({"rows": {str(k): v for k, v in rows.items()},
                                                     "goodput": goodput}, indent=2))
    print(f"plot: {plot_validation(rows, args.target_attainment, out / 'validation-attainment.png', system)}")
    return {"rows": rows, "goodput": goodput}


def serve_and_measure(system: str, args: argparse.Namespace, bench_args: list[str], out: Path, config_path: Path,
                      trace_dir: Path) -> None:
    """Write the deployment YAML, serve it with step tracing on and run the workload at every rate
    (`pdserve bench serve`), leaving measured*.json and trace/ in `out`."""
    from bench.cli import main as bench_main

    out.mkdir(parents=True, exist_ok=True)
    deployment = deployment_yaml(system, args.model, args.max_model_len)
    deployment["deploy"]["step_trace_dir"] = str(trace_dir.resolve())
    config_path.write_text(yaml.safe_dump(deployment, sort_keys=False))
    spec = SystemSpec(f"pdserve-{system}", "pdserve", model=args.model, max_model_len=args.max_model_len,
                      extra_args=("--config", str(config_path)))
    with RunningSystem(spec, out) as base_url:
        code = bench_main(["serve", "--base-url", base_url, "--model", args.model, "--save-result", "--result-dir",
                           str(out), "--result-filename", "measured.json", "--label", f"measured-{system}",
                           "--ignore-eos", "--max-model-len", str(args.max_model_len), *bench_args])
    if code not in (0, 1):
        raise RuntimeError(f"pdserve bench serve failed on {system} (exit {code})")


def plot_validation(rows: dict[float, dict], target: float, path: Path, system: str) -> Path:
    """Attainment against rate: measured, simulated with the profile, simulated with the in-place fit."""
    from bench.plots import plot_attainment
    labels = {"measured": "measured", "profile": "simulated (profile)", "in_place": "simulated (in place)"}
    series = {label: [(float(rate), row[key]["slo_attainment"]) for rate, row in rows.items()
                      if row.get(key) and row[key]["slo_attainment"] is not None]
              for key, label in labels.items()}
    return plot_attainment(series, target, path, title=f"{system}: measured vs simulated SLO attainment")


if __name__ == "__main__":
    sys.exit(main())
