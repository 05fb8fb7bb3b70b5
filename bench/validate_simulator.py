"""Simulated against measured: for each deployment (colocated, 1P1D), serve it for real, run the workload
at several rates with `pdserve bench serve`, replay each measured run through the simulation of the same
deployment YAML (`pdserve simulate --compare`), and print attainment per rate side by side.

    python -m bench.validate_simulator --model DIR \\
        --latency-model colocated=LAT_2THREADS.json --latency-model 1p1d=LAT_1THREAD.json \\
        --dataset-name random --random-input-len 256 --random-output-len 32 --random-range-ratio 0.5 \\
        --num-prompts 40 --request-rate 0.5,1,2,4 --goodput ttft:2000 tpot:200 --result-dir results/sim-validation

Every flag it does not know goes to `pdserve bench serve` unchanged (workload, rates, SLOs, --seed).
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
}


def deployment_yaml(system: str, model: str, max_model_len: int) -> dict:
    """What is served and simulated. Prefix caching is off: every rate replays the same prompts."""
    spec = SYSTEMS[system]
    return {"model": {"model": model, "max_model_len": max_model_len},
            "cache": {**spec["cache"], "enable_prefix_caching": False},
            "deploy": dict(spec["deploy"])}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.validate_simulator", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--model", required=True, help="model directory (served and simulated)")
    parser.add_argument("--latency-model", action="append", required=True, metavar="SYSTEM=FILE",
                        help="latency model per system, e.g. colocated=lat2.json (repeat per system)")
    parser.add_argument("--systems", default="colocated,1p1d", help="comma list of colocated, 1p1d")
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--cluster", default="deploy/clusters/cpu.yaml", help="links for the simulated transfers")
    parser.add_argument("--result-dir", default="results/sim-validation")
    parser.add_argument("--target-attainment", type=float, default=0.9)
    args, bench_args = parser.parse_known_args(argv)
    latency = dict(item.split("=", 1) for item in args.latency_model)
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = [s for s in systems if s not in SYSTEMS or s not in latency]
    if unknown:
        parser.error(f"systems {unknown}: each must be one of {', '.join(SYSTEMS)} and have --latency-model SYSTEM=FILE")
    out = Path(args.result_dir)
    summary = {}
    for system in systems:
        summary[system] = validate(system, args, bench_args, latency[system], out / system)
    lines = ["| system | rate | measured attainment | simulated | Δ (pp) |", "|---|---|---|---|---|"]
    for system, result in summary.items():
        for row in result["rows"]:
            m, s = row["measured"]["slo_attainment"], row["simulated"]["slo_attainment"]
            lines.append(f"| {system} | {row['rate']:g} | {100 * m:.1f}% | {100 * s:.1f}% | {100 * (s - m):+.1f} |")
    for system, result in summary.items():
        if result.get("goodput"):
            lines.append(f"\n{system}: {result['goodput']['text']}")
    text = "\n".join(lines)
    print(text)
    (out / "summary.md").write_text(text + "\n")
    print(f"summary: {out / 'summary.md'}")
    return 0


def validate(system: str, args: argparse.Namespace, bench_args: list[str], latency: str, out: Path) -> dict:
    from bench.cli import main as bench_main
    from bench.simulate import main as simulate_main

    out.mkdir(parents=True, exist_ok=True)
    config_path = out / f"{system}.yaml"
    config_path.write_text(yaml.safe_dump(deployment_yaml(system, args.model, args.max_model_len), sort_keys=False))
    spec = SystemSpec(f"pdserve-{system}", "pdserve", model=args.model, max_model_len=args.max_model_len,
                      extra_args=("--config", str(config_path)))
    with RunningSystem(spec, out) as base_url:
        code = bench_main(["serve", "--base-url", base_url, "--model", args.model, "--save-result", "--result-dir",
                           str(out), "--result-filename", "measured.json", "--label", f"measured-{system}",
                           "--ignore-eos", "--max-model-len", str(args.max_model_len), *bench_args])
    if code not in (0, 1):
        raise RuntimeError(f"pdserve bench serve failed on {system} (exit {code})")
    measured = sorted(str(p) for p in out.glob("measured*.json"))
    if not measured:
        raise RuntimeError(f"no measured result was written for {system} in {out}")
    simulate_main(["--config", str(config_path), "--latency-model", latency, "--cluster", args.cluster,
                   "--compare", *measured, "--save-result", "--result-dir", str(out), "--result-filename",
                   "compare.json", "--target-attainment", str(args.target_attainment), "--disable-tqdm"])
    return json.loads((out / "compare.json").read_text())


if __name__ == "__main__":
    sys.exit(main())
