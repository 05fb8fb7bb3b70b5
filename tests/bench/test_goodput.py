"""Goodput bisection against simulated attainment curves whose knee is known."""
import math

import pytest

from bench.goodput import search_goodput


def _step(knee: float):
    return lambda rate: 1.0 if rate <= knee else 0.4


def _logistic(knee_90: float, width: float = 0.3):
    # attainment crosses 0.9 exactly at knee_90 and falls smoothly after it
    centre = knee_90 + width * math.log(9)
    return lambda rate: 1.0 / (1.0 + math.exp((rate - centre) / width))


def test_bisection_finds_a_step_knee_within_tolerance():
    search = search_goodput(_step(3.7), rate_low=1.0, rate_high=2.0, rel_tol=0.05, max_probes=20)
    assert search.max_rate <= 3.7 < search.upper_rate
    assert search.upper_rate - search.max_rate <= 0.05 * search.max_rate
    # bracketing doubled 2 -> 4 before bisecting; 1 and 2 passed, 4 failed
    assert [p.rate for p in search.probes[:3]] == [1.0, 2.0, 4.0]
    assert [p.passed for p in search.probes[:3]] == [True, True, False]
    assert all(p.passed == (p.rate <= 3.7) for p in search.probes)


def test_bisection_on_a_smooth_curve_and_per_device():
    search = search_goodput(_logistic(5.0), 0.5, 2.0, target=0.9, rel_tol=0.02, max_probes=20,
                            num_devices=2)
    assert search.max_rate == pytest.approx(5.0, rel=0.02)
    assert search.max_rate <= 5.0
    assert search.rate_per_device == pytest.approx(search.max_rate / 2)
    assert search.to_dict()["goodput_per_device"] == pytest.approx(search.max_rate / 2)


def test_lower_target_gives_higher_rate():
    curve = _logistic(5.0)
    strict = search_goodput(curve, 1.0, 2.0, target=0.99, rel_tol=0.01, max_probes=25)
    loose = search_goodput(curve, 1.0, 2.0, target=0.5, rel_tol=0.01, max_probes=25)
    assert strict.max_rate < 5.0 < loose.max_rate
    assert loose.max_rate == pytest.approx(5.0 + 0.3 * math.log(9), rel=0.01)  # where it crosses 0.5


def test_search_walks_down_when_the_first_rate_fails():
    search = search_goodput(_step(0.3), rate_low=2.0, rate_high=4.0, rel_tol=0.05, max_probes=20)
    assert [p.rate for p in search.probes[:4]] == [2.0, 1.0, 0.5, 0.25]
    assert search.max_rate <= 0.3 < search.upper_rate
    assert search.upper_rate - search.max_rate <= 0.05 * search.max_rate


def test_probe_budget_is_respected_and_reported():
    never_fails = search_goodput(lambda rate: 1.0, 1.0, 2.0, max_probes=4)
    assert len(never_fails.probes) == 4 and never_fails.hit_ceiling
    assert never_fails.max_rate == 8.0  # 1, 2, 4, 8 all passed
    always_fails = search_goodput(lambda rate: 0.0, 1.0, 2.0, max_probes=3)
    assert always_fails.max_rate == 0.0 and always_fails.upper_rate == 0.25


def test_bad_search_settings_are_rejected():
    with pytest.raises(ValueError, match="rate-low"):
        search_goodput(_step(1.0), 2.0, 1.0)
    with pytest.raises(ValueError, match="target-attainment"):
        search_goodput(_step(1.0), 1.0, 2.0, target=1.5)
