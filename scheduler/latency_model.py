"""The step-latency model that the simulator and the placement planner use (DistServe's form):

    prefill(batch) = a + b * sum(len) + c * sum(len^2)          (seconds)
    decode(batch)  = a + b * sum(context) + c * batch_size      (seconds)

fitted per model x hardware x parallelism from profiled steps (`pdserve profile`).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import numpy as np


@dataclass(frozen=True)
class PhaseCoefficients:
    a: float
    b: float
    c: float
    r2: float = float("nan")  # goodness of fit on the profiled samples


@dataclass(frozen=True)
class SwapCost:
    """What a swap's copies cost (`pdserve profile` times the engine's own swap worker): every byte at
    the host link's speed, plus a fixed cost per copy (one per run of consecutive blocks and layer)."""
    bytes_per_s: float
    seconds_per_copy: float

    def seconds(self, num_blocks: int, num_runs: int, block_bytes: int, num_layers: int) -> float:
        """num_blocks blocks of block_bytes (every layer's K and V) in num_runs runs of num_layers layers."""
        return num_blocks * block_bytes / self.bytes_per_s + num_runs * num_layers * self.seconds_per_copy


@dataclass(frozen=True)
class LatencyModel:
    prefill: PhaseCoefficients
    decode: PhaseCoefficients
    meta: dict = field(default_factory=dict)  # model, device, dtype, tp, pp, ...

    def prefill_time(self, prompt_lens: list[int]) -> float:
        p = self.prefill  # plain Python: a step's handful of lengths is cheaper than a numpy round trip
        return p.a + p.b * float(sum(prompt_lens)) + p.c * float(sum(n * n for n in prompt_lens))

    def decode_time(self, context_lens: list[int]) -> float:
        d = self.decode
        return d.a + d.b * float(sum(context_lens)) + d.c * len(context_lens)

    def stage_model(self) -> "LatencyModel | None":
        """A pipeline plan's busiest stage per step (`meta["stage"]`, fitted by `pdserve profile
        --pipeline-parallel-size` from the stages' own compute time), or None: how long a plan holds a
        stage, where prefill_time / decode_time are a lone plan's latency through all of them."""
        stage = self.meta.get("stage")
        if not stage:
            return None
        return LatencyModel(PhaseCoefficients(**stage["prefill"]), PhaseCoefficients(**stage["decode"]))

    def swap_cost(self) -> SwapCost | None:
        """The swap copies' cost profiled beside the steps (`meta["swap"]`), or None."""
        swap = self.meta.get("swap")
        return SwapCost(swap["bytes_per_s"], swap["seconds_per_copy"]) if swap else None

    def save(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(asdict(self), f, indent=2)

    @classmethod
    def load(cls, path: str) -> "LatencyModel":
        with open(path) as f:
            data = json.load(f)
        try:
            return cls(PhaseCoefficients(**data["prefill"]), PhaseCoefficients(**data["decode"]),
                       data.get("meta", {}))
        except (KeyError, TypeError) as e:
            raise ValueError(f"{path} is not a latency model written by `pdserve profile`: {e}") from e


def fit_weighted(features: np.ndarray, seconds: np.ndarray) -> PhaseCoefficients:
    """Least squares on relative error (each row weighted by 1/seconds): a plain fit lets the few long
    steps of a profile (big batches) decide the coefficients and misses the short ones (one decode row,
    a short prompt) by 50-100%, while a serving run is mostly short steps.

    That fit follows the typical step: with step times skewed to the right (a served step is now and
    then much slower), it prices them below their mean, by 3-10% on the 2-core CPU box's traces. A
    queue's growth follows the mean (the busy time), so the coefficients are then scaled by the mean of
    measured / predicted over the steps: each step counts once, so one slow long step does not move the
    short ones much, and a skew shared by all of them is priced in."""
    weights = 1.0 / np.maximum(seconds, 1e-9)
    coef, *_ = np.linalg.lstsq(features * weights[:, None], seconds * weights, rcond=None)
    predicted = features @ coef
    if (predicted > 0).all():
        scale = float(np.mean(seconds / predicted))
        coef, predicted = coef * scale, predicted * scale
    total = ((seconds - seconds.mean()) ** 2).sum()
    r2 = 1.0 - ((seconds - predicted) ** 2).sum() / total if total > 0 else float("nan")
    return PhaseCoefficients(*(float(x) for x in coef), r2=float(r2))


def fit_prefill(batches: list[list[int]], seconds: list[float]) -> PhaseCoefficients:
    """batches: prompt lengths of each profiled prefill step."""
    x = np.array([[1.0, sum(b), sum(l * l for l in b)] for b in batches])
    return fit_weighted(x, np.asarray(seconds, dtype=np.float64))


def fit_decode(batches: list[list[int]], seconds: list[float]) -> PhaseCoefficients:
    """batches: context lengths of each profiled decode step."""
    x = np.array([[1.0, sum(b), len(b)] for b in batches])
    return fit_weighted(x, np.asarray(seconds, dtype=np.float64))
