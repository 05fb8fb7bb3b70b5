"""Token-length distributions of the synthetic workloads.

The three presets are shaped like the workloads DistServe evaluates (chat: ShareGPT, code: HumanEval,
summarisation: LongBench): right-skewed log-normal lengths with the means those datasets have. They are
shaped like, not fitted to, the real data; pass the real ShareGPT file with `--dataset-name sharegpt`
when you have it. Lengths are clipped to [min, max] and the log-normal's location is solved so that
the *clipped* mean equals the target mean.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


def _normal_cdf(z: float) -> float:
    return 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))


def clipped_lognormal_mean(mu: float, sigma: float, low: float, high: float) -> float:
    """E[clip(X, low, high)] for X ~ LogNormal(mu, sigma), in closed form."""
    alpha = (math.log(low) - mu) / sigma
    beta = (math.log(high) - mu) / sigma
    inner = math.exp(mu + sigma**2 / 2) * (_normal_cdf(beta - sigma) - _normal_cdf(alpha - sigma))
    return low * _normal_cdf(alpha) + inner + high * (1.0 - _normal_cdf(beta))


@dataclass(frozen=True)
class LengthDistribution:
    """Log-normal token lengths with a given mean after clipping to [min_len, max_len]."""
    mean: float
    sigma: float  # spread of log(length); 0 gives the constant `mean`
    min_len: int = 4
    max_len: int | None = None  # None: 8 x mean

    def __post_init__(self) -> None:
        if self.sigma < 0 or self.min_len < 1 or not self.mean >= self.min_len:
            raise ValueError(f"length distribution needs sigma >= 0 and mean >= min_len >= 1, got {self}")
        if self.max_len is not None and self.max_len <= self.mean:
            raise ValueError(f"max_len ({self.max_len}) must exceed the mean ({self.mean})")

    @property
    def upper(self) -> int:
        return self.max_len if self.max_len is not None else int(8 * self.mean)

    def location(self) -> float:
        """The mu whose clipped log-normal mean equals `mean` (bisection; the mean rises with mu)."""
        low_mu = math.log(self.min_len) - 10 * self.sigma
        high_mu = math.log(self.upper) + 10 * self.sigma
        for _ in range(100):
            mid = (low_mu + high_mu) / 2
            if clipped_lognormal_mean(mid, self.sigma, self.min_len, self.upper) < self.mean:
                low_mu = mid
            else:
                high_mu = mid
        return (low_mu + high_mu) / 2

    def sample(self, rng: np.random.Generator, num_samples: int) -> np.ndarray:
        """Integer lengths, shape [num_samples]."""
        if self.sigma == 0:
            return np.full(num_samples, int(round(self.mean)), dtype=np.int64)
        raw = rng.lognormal(mean=self.location(), sigma=self.sigma, size=num_samples)
        return np.rint(np.clip(raw, self.min_len, self.upper)).astype(np.int64)


@dataclass(frozen=True)
class WorkloadShape:
    input_len: LengthDistribution
    output_len: LengthDistribution


# Means from the DistServe paper's workload table; spreads chosen to give ShareGPT its long tail and
# the code and summarisation sets their narrower spread.
WORKLOAD_SHAPES = {
    "synthetic-chat": WorkloadShape(LengthDistribution(755, 0.9), LengthDistribution(200, 1.0)),
    "synthetic-code": WorkloadShape(LengthDistribution(171, 0.5), LengthDistribution(98, 0.6)),
    "synthetic-summarization": WorkloadShape(LengthDistribution(1738, 0.5), LengthDistribution(91, 0.5)),
}


def uniform_lengths(rng: np.random.Generator, num_samples: int, length: int,
                    range_ratio: float) -> np.ndarray:
    """`vllm bench serve --dataset-name random` lengths: uniform integers in
    [length*(1-r), length*(1+r)], at least 1; r = 0 gives exactly `length`. Shape [num_samples]."""
    low = max(1, int(math.floor(length * (1 - range_ratio))))
    high = max(low, int(math.ceil(length * (1 + range_ratio))))
    return rng.integers(low, high + 1, size=num_samples, dtype=np.int64)
