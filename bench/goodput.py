"""Goodput search: the highest request rate at which SLO attainment stays at or above a target.

Bracket first (double the rate while it passes, halve it while it fails), then bisect the bracket
until it is narrower than `rel_tol` of the passing rate. Each probe is a full benchmark run, so the
probe count is capped. The search assumes attainment falls as the rate rises; noise near the knee
can move the answer by about one bracket width, so report it with the probes that led to it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable


@dataclass
class Probe:
    rate: float
    attainment: float
    passed: bool


@dataclass
class GoodputSearch:
    target: float
    max_rate: float  # highest probed rate that met the target; 0 when none did
    upper_rate: float | None  # lowest probed rate that missed it; None when none did
    probes: list[Probe] = field(default_factory=list)
    num_devices: int = 1

    @property
    def hit_ceiling(self) -> bool:
        """No probe failed: the true goodput is above max_rate (raise --max-probes or the rates)."""
        return self.upper_rate is None

    @property
    def rate_per_device(self) -> float:
        return self.max_rate / self.num_devices

    def to_dict(self) -> dict:
        return {"target_attainment": self.target, "max_rate": self.max_rate, "upper_rate": self.upper_rate,
                "hit_ceiling": self.hit_ceiling, "num_devices": self.num_devices,
                "goodput_per_device": self.rate_per_device,
                "probes": [vars(p).copy() for p in self.probes]}


def search_goodput(measure: Callable[[float], float], rate_low: float, rate_high: float,
                   target: float = 0.9, rel_tol: float = 0.05, max_probes: int = 10,
                   num_devices: int = 1) -> GoodputSearch:
    """`measure(rate)` runs the benchmark at `rate` and returns SLO attainment in [0, 1]."""
    if not 0 < rate_low < rate_high:
        raise ValueError(f"goodput search needs 0 < --rate-low < --rate-high, got {rate_low}, {rate_high}")
    if not 0 < target <= 1:
        raise ValueError(f"--target-attainment must be in (0, 1], got {target}")
    if max_probes < 2 or not 0 < rel_tol < 1 or num_devices < 1:
        raise ValueError("--max-probes must be at least 2, --rate-tolerance in (0, 1), --num-devices >= 1")
    search = GoodputSearch(target=target, max_rate=0.0, upper_rate=None, num_devices=num_devices)

    def passes(rate: float) -> bool:
        attainment = measure(rate)
        search.probes.append(Probe(rate, attainment, attainment >= target))
        return attainment >= target

    low, high = _bracket(passes, rate_low, rate_high, max_probes)
    while low is not None and high is not None and high - low > rel_tol * low \
            and len(search.probes) < max_probes:
        mid = (low + high) / 2
        if passes(mid):
            low = mid
        else:
            high = mid
    search.max_rate = low or 0.0
    search.upper_rate = high
    return search


def _bracket(passes: Callable[[float], bool], rate_low: float, rate_high: float,
             max_probes: int) -> tuple[float | None, float | None]:
    """(passing rate, failing rate) around the knee; either is None if probes ran out first."""
    num_probes = 1
    if passes(rate_low):
        low, high = rate_low, rate_high
        while num_probes < max_probes:
            num_probes += 1
            if not passes(high):
                return low, high
            low, high = high, high * 2
        return low, None
    low, high = rate_low / 2, rate_low
    while num_probes < max_probes:
        num_probes += 1
        if passes(low):
            return low, high
        low, high = low / 2, low
    return None, high
