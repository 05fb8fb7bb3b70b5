"""Arrival processes checked statistically: mean gap 1/rate and the coefficient of variation each
process should have (Poisson 1, gamma 1/sqrt(burstiness), constant 0). With 40 000 gaps the standard
error of the mean is below 1% (0.5% for Poisson), so the tolerances below are several sigma wide."""
import math

import numpy as np
import pytest

from bench.arrivals import arrival_times, interarrival_gaps
from bench.config import LoadConfig

NUM = 40_000


def _gap_stats(gaps: np.ndarray) -> tuple[float, float]:
    return float(gaps.mean()), float(gaps.std() / gaps.mean())


def test_poisson_mean_and_cv():
    gaps = interarrival_gaps("poisson", NUM + 1, 4.0, 1.0, np.random.default_rng(1))
    mean, cv = _gap_stats(gaps)
    assert mean == pytest.approx(0.25, rel=0.03)
    assert cv == pytest.approx(1.0, abs=0.03)


@pytest.mark.parametrize("burstiness", [0.25, 4.0])
def test_gamma_mean_and_cv(burstiness):
    gaps = interarrival_gaps("gamma", NUM + 1, 2.0, burstiness, np.random.default_rng(2))
    mean, cv = _gap_stats(gaps)
    assert mean == pytest.approx(0.5, rel=0.04)
    assert cv == pytest.approx(1 / math.sqrt(burstiness), rel=0.05)


def test_burstier_is_burstier():
    rng = np.random.default_rng(3)
    cv_bursty = _gap_stats(interarrival_gaps("gamma", NUM, 1.0, 0.5, rng))[1]
    cv_smooth = _gap_stats(interarrival_gaps("gamma", NUM, 1.0, 2.0, rng))[1]
    assert cv_bursty > 1.2 > 0.8 > cv_smooth


def test_constant_rate_and_infinite_rate():
    times = arrival_times(LoadConfig(request_rate=5.0, arrival="constant"), 4, np.random.default_rng(0))
    np.testing.assert_allclose(times, [0.0, 0.2, 0.4, 0.6])
    times = arrival_times(LoadConfig(request_rate=math.inf), 3, np.random.default_rng(0))
    np.testing.assert_array_equal(times, [0.0, 0.0, 0.0])


def test_arrivals_start_at_zero_sorted_and_seeded():
    load = LoadConfig(request_rate=3.0, arrival="gamma", burstiness=0.5)
    first = arrival_times(load, 50, np.random.default_rng(7))
    again = arrival_times(load, 50, np.random.default_rng(7))
    other = arrival_times(load, 50, np.random.default_rng(8))
    assert first[0] == 0.0 and np.all(np.diff(first) >= 0)
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)


def test_trace_replay_shifts_and_scales():
    load = LoadConfig(arrival="trace", trace_time_scale=0.5)
    times = arrival_times(load, 3, np.random.default_rng(0), [10.0, 11.0, 14.0])
    np.testing.assert_allclose(times, [0.0, 0.5, 2.0])
    with pytest.raises(ValueError, match="timestamp"):
        arrival_times(load, 2, np.random.default_rng(0), [1.0, None])
    with pytest.raises(ValueError, match="non-decreasing"):
        arrival_times(load, 2, np.random.default_rng(0), [2.0, 1.0])


def test_load_config_rejects_what_it_cannot_do():
    with pytest.raises(ValueError, match="--arrival gamma"):
        LoadConfig(request_rate=1.0, arrival="poisson", burstiness=0.5)
    with pytest.raises(ValueError, match="--request-rate"):
        LoadConfig(request_rate=0.0)
    with pytest.raises(ValueError, match="--max-concurrency"):
        LoadConfig(max_concurrency=0)
