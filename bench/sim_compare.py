"""`pdserve simulate --compare`: measured runs and their simulated replay, side by side.

Each measured result (`pdserve bench serve --save-result`) is replayed request for request: the same
send times, the server's prompt token counts and the measured output lengths (a failed request gets
the mean output length of the others), through the simulated deployment, and both go through the same
metric code with the measured run's SLOs. Goodput is read off each attainment-vs-rate curve: the rate
where it crosses the target, interpolated linearly between the probed rates.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from bench.config import EndpointConfig, LoadConfig
from bench.plots import plot_attainment
from bench.report import rate_from_json, write_json
from bench.runner import RunSpec
from scheduler.simulator import SimConversation, SimDeployment, SimTurn

_FIELDS = (("slo_attainment", "attainment", 100.0, "%"), ("mean_ttft_ms", "mean TTFT", 1.0, "ms"),
           ("p99_ttft_ms", "p99 TTFT", 1.0, "ms"), ("mean_tpot_ms", "mean TPOT", 1.0, "ms"),
           ("p99_tpot_ms", "p99 TPOT", 1.0, "ms"), ("request_throughput", "req/s", 1.0, ""),
           ("num_preemptions", "preemptions", 1.0, ""))  # measured: the server's counter, where it has one


def replay_conversations(result: dict[str, Any]) -> list[SimConversation]:
    """The measured run's requests, each a one-turn conversation at its measured send time."""
    starts, inputs, outputs = result["start_times"], result["input_lens"], result["output_lens"]
    errors = result.get("errors") or [""] * len(starts)
    good = [n for n, error in zip(outputs, errors) if not error and n > 0]
    fallback = max(1, round(sum(good) / len(good))) if good else 1
    order = sorted(range(len(starts)), key=lambda i: (starts[i], i))
    return [SimConversation(k, float(starts[i]), (SimTurn(max(1, int(inputs[i])),
                                                          int(outputs[i]) if not errors[i] and outputs[i] > 0
                                                          else fallback),))
            for k, i in enumerate(order)]


def crossing_rate(points: list[tuple[float, float]], target: float) -> tuple[float, bool]:
    """(goodput, capped): where attainment crosses the target, interpolated; capped when even the highest
    rate passes (the goodput is at least that)."""
    points = sorted(points)
    passing = [(r, a) for r, a in points if a >= target]
    if not passing:
        return 0.0, False
    if points[-1][1] >= target:
        return points[-1][0], True
    last = max(passing)
    after = [(r, a) for r, a in points if r > last[0] and a < target]
    r1, a1 = last
    r2, a2 = after[0]
    return r1 + (a1 - target) / (a1 - a2) * (r2 - r1), False


def compare_main(args: argparse.Namespace, deployment: SimDeployment) -> int:
    from bench.simulate import sim_result_dict, simulate_run

    rows = []
    for path in args.compare:
        measured = json.loads(Path(path).read_text())
        rate = rate_from_json(measured["request_rate"])
        slos = measured.get("goodput_slos_ms") or {}
        load = LoadConfig(request_rate=rate, arrival="trace")
        spec = RunSpec(EndpointConfig(endpoint=measured.get("endpoint", "/v1/completions")),
                       measured.get("model_id") or "", load, slos, tuple(measured.get("percentiles", (90, 99))))
        result = simulate_run(deployment, replay_conversations(measured), not args.disable_tqdm, f"replay {rate:g}/s")
        simulated = sim_result_dict(result, spec, {"label": "simulated", "replay_of": path}, {}, deployment)
        rows.append({"rate": rate, "file": path, "measured": _pick(measured), "simulated": _pick(simulated),
                     "wall_s": simulated["simulation"]["wall_s"]})
    rows.sort(key=lambda row: row["rate"])
    print(format_comparison(rows))
    summary = goodput_summary(rows, args.target_attainment)
    if summary:
        print(summary["text"])
    if args.save_result:
        out = Path(args.result_dir)
        name = Path(args.result_filename).stem if args.result_filename else "sim-compare"
        path = write_json(out / f"{name}.json", {"deployment": args.config, "latency_model": list(args.latency_model),
                                                  "rows": rows, "goodput": summary})
        print(f"result: {path}")
        series = {kind: [(row["rate"], row[kind]["slo_attainment"]) for row in rows
                         if row[kind]["slo_attainment"] is not None] for kind in ("measured", "simulated")}
        plot = plot_attainment(series, args.target_attainment, out / f"{name}-attainment.png",
                               title="SLO attainment: measured vs simulated")
        print(f"plot: {plot}")
    return 0


def _pick(result: dict[str, Any]) -> dict[str, Any]:
    return {key: result.get(key) for key, *_ in _FIELDS}


def format_comparison(rows: list[dict[str, Any]]) -> str:
    header = ["rate"] + [f"{name} meas/sim" for _, name, _, _ in _FIELDS] + ["Δ attainment (pp)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [f"{row['rate']:g}"]
        for key, _, scale, unit in _FIELDS:
            m, s = row["measured"][key], row["simulated"][key]
            cells.append(f"{_fmt(m, scale)} / {_fmt(s, scale)}{unit}")
        m, s = row["measured"]["slo_attainment"], row["simulated"]["slo_attainment"]
        cells.append(f"{100 * (s - m):+.1f}" if m is not None and s is not None else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _fmt(value: Any, scale: float) -> str:
    if isinstance(value, int):
        return str(value)
    return "-" if value is None else f"{value * scale:.1f}" if scale != 1.0 else f"{value:.1f}" if value >= 10 else f"{value:.3g}"


def goodput_summary(rows: list[dict[str, Any]], target: float) -> dict[str, Any] | None:
    if len(rows) < 2 or any(row["measured"]["slo_attainment"] is None for row in rows):
        return None
    measured = crossing_rate([(r["rate"], r["measured"]["slo_attainment"]) for r in rows], target)
    simulated = crossing_rate([(r["rate"], r["simulated"]["slo_attainment"]) for r in rows], target)
    error = (simulated[0] - measured[0]) / measured[0] if measured[0] > 0 else None
    worst = max(abs(r["simulated"]["slo_attainment"] - r["measured"]["slo_attainment"]) for r in rows)

    def show(value: tuple[float, bool]) -> str:
        return f">= {value[0]:.3g}" if value[1] else f"{value[0]:.3g}"

    text = (f"goodput at {100 * target:g}% attainment: measured {show(measured)} req/s, simulated {show(simulated)} "
            f"req/s" + (f" ({100 * error:+.1f}%)" if error is not None else "")
            + f"; largest attainment gap {100 * worst:.1f} pp")
    return {"target": target, "measured": measured[0], "measured_capped": measured[1], "simulated": simulated[0],
            "simulated_capped": simulated[1], "relative_error": error, "max_attainment_gap": worst, "text": text}
