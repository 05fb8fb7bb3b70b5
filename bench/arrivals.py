"""Arrival times of conversations: Poisson, gamma (bursty), constant rate, or replayed from a trace.

Times are seconds after the benchmark starts; the first arrival is at 0 so no run opens with idle
time. The process is left as drawn (no rescaling to hit num/rate exactly), so its mean and coefficient
of variation are the textbook ones: mean gap 1/rate, CV 1 (Poisson), 1/sqrt(burstiness) (gamma), 0
(constant).
"""
from __future__ import annotations

import math

import numpy as np

from bench.config import LoadConfig


def interarrival_gaps(arrival: str, num_requests: int, rate: float, burstiness: float,
                      rng: np.random.Generator) -> np.ndarray:
    """Gaps in seconds between consecutive arrivals, shape [num_requests - 1]."""
    num_gaps = max(num_requests - 1, 0)
    if math.isinf(rate):
        return np.zeros(num_gaps)
    if arrival == "constant":
        return np.full(num_gaps, 1.0 / rate)
    if arrival == "poisson":
        return rng.exponential(scale=1.0 / rate, size=num_gaps)
    if arrival == "gamma":
        # shape k, scale 1/(rate*k): mean 1/rate whatever the burstiness, CV 1/sqrt(k)
        return rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=num_gaps)
    raise ValueError(f"no synthetic gaps for arrival {arrival!r}; use poisson, gamma or constant")


def arrival_times(load: LoadConfig, num_requests: int, rng: np.random.Generator,
                  trace_times_s: list[float | None] | None = None) -> np.ndarray:
    """Send time of each conversation in seconds after the start, shape [num_requests], sorted."""
    if load.arrival == "trace":
        return trace_arrival_times(trace_times_s, load.trace_time_scale, num_requests)
    gaps = interarrival_gaps(load.arrival, num_requests, load.request_rate, load.burstiness, rng)
    return np.concatenate([[0.0], np.cumsum(gaps)]) if num_requests else np.zeros(0)


def trace_arrival_times(trace_times_s: list[float | None] | None, time_scale: float,
                        num_requests: int) -> np.ndarray:
    """Replay timestamps from the dataset, shifted so the first is 0 and scaled by time_scale."""
    if not trace_times_s or len(trace_times_s) != num_requests or any(t is None for t in trace_times_s):
        raise ValueError("--arrival trace needs a timestamp on every request: use --dataset-name jsonl "
                         "with a \"timestamp\" (seconds) on each line")
    times = np.asarray(trace_times_s, dtype=np.float64)
    if np.any(np.diff(times) < 0):
        raise ValueError("trace timestamps must be non-decreasing in file order; sort the file by "
                         "\"timestamp\"")
    return (times - times[0]) * time_scale
