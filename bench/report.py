"""Result files and the stdout table, in the layout and key names of `vllm bench serve`."""
from __future__ import annotations

import json
import math
import re
from datetime import datetime
from pathlib import Path
from typing import Any

from bench.metrics import percentile_key
from bench.runner import RunResult

METRIC_HEADERS = {
    "ttft": ("TTFT", "Time to First Token"),
    "tpot": ("TPOT", "Time per Output Token (excl. 1st token)"),
    "itl": ("ITL", "Inter-token Latency"),
    "e2el": ("E2EL", "End-to-end Latency"),
}
_ROW = "{:<40} {:<10}"
_ROW_FLOAT = "{:<40} {:<10.2f}"


def rate_to_json(rate: float) -> float | str:
    """JSON has no infinity; write "inf" as vLLM's flag does."""
    return "inf" if math.isinf(rate) else rate


def rate_from_json(rate: float | str) -> float:
    return float(rate)


def run_result_dict(run: RunResult, info: dict[str, Any], save_detailed: bool = False) -> dict[str, Any]:
    """Everything about one run: settings (`info`), metrics and the per-request measurements."""
    load = run.spec.load
    records = run.records
    result: dict[str, Any] = {
        "date": datetime.now().strftime("%Y%m%d-%H%M%S"),
        "started_at": run.started_at,  # the run's wall-clock start (epoch seconds; matches step traces)
        **info,
        "request_rate": rate_to_json(load.request_rate),
        "arrival": load.arrival,
        "burstiness": load.burstiness,
        "max_concurrency": load.max_concurrency,
        "goodput_slos_ms": dict(run.spec.slos_ms),
        "percentiles": list(run.spec.percentiles),
        "num_requests": len(records),
        **run.metrics.to_dict(),
        "input_lens": [r.num_prompt_tokens for r in records],
        "output_lens": [r.num_output_tokens if r.success else 0 for r in records],
        "ttfts": [r.ttft_s for r in records],
        "tpots": [r.tpot_s for r in records],
        "itls": [r.itl_s for r in records],
        "latencies": [r.e2el_s for r in records],
        "start_times": [r.start_s for r in records],
        "queue_times": [r.queue_s for r in records],
        "request_tenants": [r.tenant for r in records],
        "errors": [r.error for r in records],
    }
    if save_detailed:
        result["generated_texts"] = [r.generated_text for r in records]
    return result


def format_result_table(result: dict[str, Any], percentile_metrics: tuple[str, ...] = tuple(METRIC_HEADERS),
                        title: str = "Serving Benchmark Result") -> str:
    """The `vllm bench serve` table for one run, with SLO attainment and tenants appended."""
    rate = rate_from_json(result["request_rate"])
    lines = ["{s:{c}^{n}}".format(s=f" {title} ", n=50, c="="),
             _ROW.format("Successful requests:", result["completed"]),
             _ROW.format("Failed requests:", result["failed"])]
    if result.get("max_concurrency") is not None:
        lines.append(_ROW.format("Maximum request concurrency:", result["max_concurrency"]))
    if not math.isinf(rate):
        lines.append(_ROW_FLOAT.format("Request rate configured (RPS):", rate))
    lines += [_ROW_FLOAT.format("Benchmark duration (s):", result["duration"]),
              _ROW.format("Total input tokens:", result["total_input_tokens"]),
              _ROW.format("Total generated tokens:", result["total_output_tokens"]),
              _ROW_FLOAT.format("Request throughput (req/s):", result["request_throughput"])]
    if result.get("request_goodput") is not None:
        lines.append(_ROW_FLOAT.format("Request goodput (req/s):", result["request_goodput"]))
    lines += [_ROW_FLOAT.format("Output token throughput (tok/s):", result["output_throughput"]),
              _ROW_FLOAT.format("Peak output token throughput (tok/s):", result["max_output_tokens_per_s"]),
              _ROW_FLOAT.format("Peak concurrent requests:", result["max_concurrent_requests"]),
              _ROW_FLOAT.format("Total token throughput (tok/s):", result["total_token_throughput"])]
    for name in percentile_metrics:
        short, header = METRIC_HEADERS[name]
        lines += ["{s:{c}^{n}}".format(s=header, n=50, c="-"),
                  _ROW_FLOAT.format(f"Mean {short} (ms):", result[f"mean_{name}_ms"]),
                  _ROW_FLOAT.format(f"Median {short} (ms):", result[f"median_{name}_ms"])]
        for p in result["percentiles"]:
            key = percentile_key(p)
            lines.append(_ROW_FLOAT.format(f"{key.upper()} {short} (ms):", result[f"{key}_{name}_ms"]))
    lines += _slo_lines(result) + _tenant_lines(result) + ["=" * 50]
    return "\n".join(lines)


def _slo_lines(result: dict[str, Any]) -> list[str]:
    if result.get("slo_attainment") is None:
        return []
    slos = " ".join(f"{k}:{v:g}" for k, v in result["goodput_slos_ms"].items())
    return ["{s:{c}^{n}}".format(s="SLO Attainment", n=50, c="-"),
            _ROW.format("SLOs (ms):", slos),
            _ROW_FLOAT.format("SLO attainment (%):", 100.0 * result["slo_attainment"])]


def _tenant_lines(result: dict[str, Any]) -> list[str]:
    tenants = result.get("tenants") or {}
    if len(tenants) < 2:
        return []
    lines = ["{s:{c}^{n}}".format(s="Tenants", n=50, c="-")]
    for name, t in tenants.items():
        lines += [_ROW.format(f"{name} completed / requests:", f"{t['completed']} / {t['num_requests']}"),
                  _ROW_FLOAT.format(f"{name} service rate (tok/s):", t["service_rate"]),
                  _ROW_FLOAT.format(f"{name} mean TTFT (ms):", t["mean_ttft_ms"])]
    lines.append(_ROW_FLOAT.format("Jain's fairness index:", result["jain_fairness_index"]))
    return lines


def result_stem(label: str, model: str, rate: float, max_concurrency: int | None) -> str:
    """vLLM's file name, `{label}-{rate}qps[-concurrency{n}]-{model}-{date}`, made filesystem-safe."""
    concurrency = f"-concurrency{max_concurrency}" if max_concurrency is not None else ""
    model_base = model.rstrip("/").split("/")[-1]
    stem = f"{label}-{rate:g}qps{concurrency}-{model_base}-{datetime.now():%Y%m%d-%H%M%S}"
    return re.sub(r"[^A-Za-z0-9._+-]", "_", stem)


def write_json(path: Path, data: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, allow_nan=False) + "\n")
    return path
