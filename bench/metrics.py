"""Benchmark metrics as pure functions of the per-request records, with `vllm bench serve`'s definitions.

- TTFT, ITL, E2EL: as measured by the client (bench/client.py); ITLs of all requests are pooled.
- TPOT (excluding the first token): (E2EL - TTFT) / (output tokens - 1), over requests with more than
  one output token; for SLO checks a one-token request has TPOT 0, as in vLLM.
- Throughputs divide totals over successful requests by the benchmark duration.
- A request is *good* when every given SLO holds (measured <= SLO); goodput = good requests / duration.
  SLO attainment = good requests / all requests sent (a failed request misses its SLO).
- Percentiles use numpy's linear interpolation; an empty list reports 0, as vLLM does.
- Per tenant, *service* counts prompt tokens once and output tokens twice (the Virtual Token Counter
  weights in DESIGN.md), delivered while every tenant still had work outstanding (up to the earliest
  time any tenant received its last token). Jain's index over service / tenant weight is 1 when each
  tenant got service in proportion to its weight and 1/n when one tenant got everything.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bench.records import RequestRecord

LATENCY_METRICS = ("ttft", "tpot", "itl", "e2el")
_SERVICE_WEIGHT_PROMPT = 1.0
_SERVICE_WEIGHT_OUTPUT = 2.0


@dataclass
class LatencyStats:
    mean_ms: float
    median_ms: float
    std_ms: float
    percentiles_ms: dict[float, float]


def percentile_key(p: float) -> str:
    """vLLM's name for a percentile: 99 -> "p99", 99.9 -> "p99.9"."""
    return f"p{int(p)}" if float(p).is_integer() else f"p{p}"


def latency_stats(values_s: list[float], percentiles: list[float]) -> LatencyStats:
    values = np.asarray(values_s if values_s else [0.0], dtype=np.float64) * 1000.0
    return LatencyStats(float(np.mean(values)), float(np.median(values)), float(np.std(values)),
                        {p: float(np.percentile(values, p)) for p in percentiles})


def meets_slos(record: RequestRecord, slos_ms: dict[str, float]) -> bool:
    if not record.success:
        return False
    measured_s = {"ttft": record.ttft_s, "tpot": record.tpot_s, "e2el": record.e2el_s}
    return all(measured_s[name] * 1000.0 <= limit for name, limit in slos_ms.items())


def slo_attainment(records: list[RequestRecord], slos_ms: dict[str, float]) -> float | None:
    """Fraction of all requests that met every SLO; None when no SLO is given or no request ran."""
    if not slos_ms or not records:
        return None
    return sum(meets_slos(r, slos_ms) for r in records) / len(records)


def jain_index(values: list[float]) -> float:
    """(sum x)^2 / (n * sum x^2); 1 for equal shares (also for all zero), 1/n for one taker."""
    squares = sum(v * v for v in values)
    if not values or squares == 0:
        return 1.0
    return sum(values) ** 2 / (len(values) * squares)


def peak_concurrency(records: list[RequestRecord]) -> int:
    """Most successful requests in flight at once (half-open intervals [start, start + e2el))."""
    events = []
    for r in records:
        if r.success:
            events += [(r.start_s, 1), (r.start_s + r.e2el_s, -1)]
    events.sort()  # at equal times -1 sorts first: an ending request frees its slot first
    current = peak = 0
    for _, delta in events:
        current += delta
        peak = max(peak, current)
    return peak


def peak_output_tokens_per_s(records: list[RequestRecord]) -> float:
    """Most token chunks received within one whole second of the run (1-second buckets, as vLLM)."""
    times = [t for r in records for t in r.token_times_s()]
    if not times:
        return 0.0
    origin = min(r.start_s for r in records if r.success)
    buckets = np.bincount(np.floor(np.asarray(times) - origin).astype(np.int64).clip(min=0))
    return float(buckets.max())


@dataclass
class TenantStats:
    weight: float
    num_requests: int
    completed: int
    total_input_tokens: int
    total_output_tokens: int
    service_tokens: float  # prompt x1 + output x2, inside the fairness window
    service_rate: float  # service_tokens per second of the window
    mean_ttft_ms: float
    mean_tpot_ms: float
    slo_attainment: float | None


def fairness_window_end_s(records: list[RequestRecord]) -> float:
    """Earliest time at which some tenant received its last token: before it, all tenants had work."""
    last_token_s: dict[str, float] = {}
    for r in records:
        times = r.token_times_s()
        if times:
            last_token_s[r.tenant] = max(last_token_s.get(r.tenant, 0.0), times[-1])
    return min(last_token_s.values()) if last_token_s else 0.0


def service_in_window(record: RequestRecord, window_end_s: float) -> float:
    times = record.token_times_s()
    if not times or times[0] > window_end_s:
        return 0.0
    num_chunks_in = sum(t <= window_end_s for t in times)
    num_output_in = record.num_output_tokens * num_chunks_in / len(times)
    return _SERVICE_WEIGHT_PROMPT * record.num_prompt_tokens + _SERVICE_WEIGHT_OUTPUT * num_output_in


def tenant_stats(records: list[RequestRecord], weights: dict[str, float],
                 slos_ms: dict[str, float]) -> dict[str, TenantStats]:
    window_end_s = fairness_window_end_s(records)
    window_start_s = min((r.arrival_s for r in records), default=0.0)
    window_s = max(window_end_s - window_start_s, 1e-9)
    by_tenant: dict[str, list[RequestRecord]] = {}
    for r in records:
        by_tenant.setdefault(r.tenant, []).append(r)
    stats = {}
    for tenant in sorted(by_tenant):
        group = by_tenant[tenant]
        done = [r for r in group if r.success]
        service = sum(service_in_window(r, window_end_s) for r in done)
        stats[tenant] = TenantStats(
            weight=weights.get(tenant, 1.0), num_requests=len(group), completed=len(done),
            total_input_tokens=sum(r.num_prompt_tokens for r in done),
            total_output_tokens=sum(r.num_output_tokens for r in done),
            service_tokens=service, service_rate=service / window_s,
            mean_ttft_ms=latency_stats([r.ttft_s for r in done], []).mean_ms,
            mean_tpot_ms=latency_stats([r.tpot_s for r in done if r.num_output_tokens > 1], []).mean_ms,
            slo_attainment=slo_attainment(group, slos_ms))
    return stats


@dataclass
class BenchmarkMetrics:
    duration_s: float
    completed: int
    failed: int
    total_input_tokens: int
    total_output_tokens: int
    request_throughput: float
    request_goodput: float | None
    output_throughput: float
    total_token_throughput: float
    max_output_tokens_per_s: float
    max_concurrent_requests: int
    slo_attainment: float | None
    latency: dict[str, LatencyStats]
    tenants: dict[str, TenantStats] = field(default_factory=dict)
    jain_fairness_index: float = 1.0

    def to_dict(self) -> dict[str, Any]:
        """Flat, JSON-ready, with `vllm bench serve`'s key names where it has one."""
        out: dict[str, Any] = {
            "duration": self.duration_s, "completed": self.completed, "failed": self.failed,
            "total_input_tokens": self.total_input_tokens, "total_output_tokens": self.total_output_tokens,
            "request_throughput": self.request_throughput, "request_goodput": self.request_goodput,
            "output_throughput": self.output_throughput,
            "total_token_throughput": self.total_token_throughput,
            "max_output_tokens_per_s": self.max_output_tokens_per_s,
            "max_concurrent_requests": self.max_concurrent_requests,
            "slo_attainment": self.slo_attainment,
        }
        for name, stats in self.latency.items():
            out[f"mean_{name}_ms"] = stats.mean_ms
            out[f"median_{name}_ms"] = stats.median_ms
            out[f"std_{name}_ms"] = stats.std_ms
            for p, value in stats.percentiles_ms.items():
                out[f"{percentile_key(p)}_{name}_ms"] = value
        out["tenants"] = {name: vars(t).copy() for name, t in self.tenants.items()}
        out["jain_fairness_index"] = self.jain_fairness_index
        return out


def compute_metrics(records: list[RequestRecord], duration_s: float, percentiles: list[float],
                    slos_ms: dict[str, float] | None = None,
                    tenant_weights: dict[str, float] | None = None) -> BenchmarkMetrics:
    """All metrics of one run. `duration_s` is the wall time from the first send to the last reply."""
    if not duration_s > 0 or not math.isfinite(duration_s):
        raise ValueError(f"benchmark duration must be positive and finite, got {duration_s}")
    slos_ms = slos_ms or {}
    done = [r for r in records if r.success]
    total_input = sum(r.num_prompt_tokens for r in done)
    total_output = sum(r.num_output_tokens for r in done)
    samples = {
        "ttft": [r.ttft_s for r in done],
        "tpot": [r.tpot_s for r in done if r.num_output_tokens > 1],
        "itl": [gap for r in done for gap in r.itl_s],
        "e2el": [r.e2el_s for r in done],
    }
    tenants = tenant_stats(records, tenant_weights or {}, slos_ms)
    return BenchmarkMetrics(
        duration_s=duration_s, completed=len(done), failed=len(records) - len(done),
        total_input_tokens=total_input, total_output_tokens=total_output,
        request_throughput=len(done) / duration_s,
        request_goodput=sum(meets_slos(r, slos_ms) for r in done) / duration_s if slos_ms else None,
        output_throughput=total_output / duration_s,
        total_token_throughput=(total_input + total_output) / duration_s,
        max_output_tokens_per_s=peak_output_tokens_per_s(records),
        max_concurrent_requests=peak_concurrency(records),
        slo_attainment=slo_attainment(records, slos_ms),
        latency={name: latency_stats(values, percentiles) for name, values in samples.items()},
        tenants=tenants,
        jain_fairness_index=jain_index([t.service_tokens / t.weight for t in tenants.values()]))
