"""Metric definitions on synthetic timestamps, against values computed by hand.

The run used by most tests (times in seconds, duration 2.0):

    r1  start 0.00  ttft 0.10  gaps .02 .03 .05  -> e2el 0.20, 4 tokens, TPOT (0.20-0.10)/3
    r2  start 0.50  ttft 0.30  gap  .10          -> e2el 0.40, 2 tokens, TPOT 0.10
    r3  start 0.75  ttft 0.35                    -> e2el 0.35, 1 token,  no TPOT (0 for SLOs)
    r4  failed
"""
import math

import pytest

from bench.metrics import (compute_metrics, fairness_window_end_s, jain_index, latency_stats,
                           meets_slos, peak_concurrency, peak_output_tokens_per_s, percentile_key,
                           slo_attainment, tenant_stats)
from bench.records import RequestRecord
from tests.bench.helpers import make_record


def _run() -> list[RequestRecord]:
    return [
        make_record(0.00, 0.10, [0.02, 0.03, 0.05], num_prompt_tokens=10),
        make_record(0.50, 0.30, [0.10], num_prompt_tokens=20),
        make_record(0.75, 0.35, [], num_prompt_tokens=30),
        make_record(1.00, success=False, num_prompt_tokens=40),
    ]


def test_counts_and_throughputs():
    m = compute_metrics(_run(), duration_s=2.0, percentiles=[90, 99])
    assert (m.completed, m.failed) == (3, 1)
    assert m.total_input_tokens == 60  # the failed request's 40 prompt tokens are not counted
    assert m.total_output_tokens == 7
    assert m.request_throughput == pytest.approx(1.5)
    assert m.output_throughput == pytest.approx(3.5)
    assert m.total_token_throughput == pytest.approx(33.5)
    assert m.request_goodput is None and m.slo_attainment is None  # no SLO given


def test_latency_definitions_match_hand_computation():
    lat = compute_metrics(_run(), duration_s=2.0, percentiles=[90, 99]).latency
    # TTFT [100, 300, 350] ms
    assert lat["ttft"].mean_ms == pytest.approx(250.0)
    assert lat["ttft"].median_ms == pytest.approx(300.0)
    assert lat["ttft"].percentiles_ms[90] == pytest.approx(340.0)  # 300 + 0.8 * 50
    assert lat["ttft"].percentiles_ms[99] == pytest.approx(349.0)
    assert lat["ttft"].std_ms == pytest.approx(math.sqrt((150**2 + 50**2 + 100**2) / 3))
    # TPOT excludes the first token and the one-token request: [33.33, 100] ms
    assert lat["tpot"].mean_ms == pytest.approx((100 / 3 + 100) / 2)
    assert lat["tpot"].percentiles_ms[90] == pytest.approx(100 / 3 + 0.9 * (100 - 100 / 3))
    # ITL pools every gap: [20, 30, 50, 100] ms
    assert lat["itl"].mean_ms == pytest.approx(50.0)
    assert lat["itl"].median_ms == pytest.approx(40.0)
    assert lat["itl"].percentiles_ms[90] == pytest.approx(85.0)  # 50 + 0.7 * 50
    # E2EL [200, 400, 350] ms
    assert lat["e2el"].mean_ms == pytest.approx(950 / 3)
    assert lat["e2el"].median_ms == pytest.approx(350.0)
    assert lat["e2el"].percentiles_ms[99] == pytest.approx(399.0)


def test_tpot_uses_server_token_count_not_chunk_count():
    # 3 chunks but the usage said 5 tokens (a chunk can carry several): (0.5 - 0.1) / 4
    record = make_record(0.0, 0.1, [0.2, 0.2], num_output_tokens=5)
    assert record.tpot_s == pytest.approx(0.1)
    assert make_record(0.0, 0.1, [], num_output_tokens=1).tpot_s == 0.0


def test_goodput_and_attainment_need_every_slo():
    records = _run()
    slos = {"ttft": 360.0, "tpot": 50.0}
    # r1 meets both; r2 misses TPOT (100 ms); r3 has one token (TPOT 0) and TTFT 350 <= 360; r4 failed
    assert [meets_slos(r, slos) for r in records] == [True, False, True, False]
    m = compute_metrics(records, duration_s=2.0, percentiles=[99], slos_ms=slos)
    assert m.request_goodput == pytest.approx(1.0)  # 2 good / 2 s
    assert m.slo_attainment == pytest.approx(0.5)  # 2 good / 4 sent, failures included
    assert slo_attainment(records, {"ttft": 340.0}) == pytest.approx(0.5)  # r3 now misses
    assert slo_attainment(records, {"e2el": 399.0}) == pytest.approx(0.5)  # r2 (400 ms) misses
    assert meets_slos(make_record(0.0, 0.25), {"ttft": 250.0})  # the bound itself is met


def test_empty_samples_report_zero_like_vllm():
    stats = latency_stats([], [99])
    assert (stats.mean_ms, stats.median_ms, stats.percentiles_ms[99]) == (0.0, 0.0, 0.0)
    m = compute_metrics([make_record(success=False)], duration_s=1.0, percentiles=[99])
    assert m.completed == 0 and m.latency["ttft"].mean_ms == 0.0 and m.max_concurrent_requests == 0


def test_peaks():
    records = _run()
    # r2 [0.5, 0.9) overlaps r3 [0.75, 1.1); r1 [0, 0.2) is alone
    assert peak_concurrency(records) == 2
    # token chunks at .10 .12 .15 .20 .80 .90 fall in second 0, r3's at 1.10 in second 1
    assert peak_output_tokens_per_s(records) == 6.0
    # back-to-back requests ([0, 1) then [1, 2)) never overlap
    assert peak_concurrency([make_record(0.0, 0.5, [0.5]), make_record(1.0, 0.5, [0.5])]) == 1


def test_percentile_key_names_like_vllm():
    assert percentile_key(99) == "p99" and percentile_key(99.0) == "p99" and percentile_key(99.9) == "p99.9"
    d = compute_metrics(_run(), 2.0, [90, 99.9]).to_dict()
    assert {"p90_ttft_ms", "p99.9_tpot_ms", "median_itl_ms", "std_e2el_ms"} <= set(d)


def test_jain_index():
    assert jain_index([5.0, 5.0, 5.0]) == pytest.approx(1.0)
    assert jain_index([1.0, 0.0, 0.0]) == pytest.approx(1 / 3)
    assert jain_index([1.0, 3.0]) == pytest.approx(16 / 20)
    assert jain_index([]) == 1.0


def test_tenant_service_inside_fairness_window():
    # tenant a: tokens at 1, 2, 3 (3 tokens, 10 prompt); tenant b: tokens at 0.5, 1.0 (2 tokens, 4 prompt)
    records = [make_record(0.0, 1.0, [1.0, 1.0], num_prompt_tokens=10, tenant="a"),
               make_record(0.0, 0.5, [0.5], num_prompt_tokens=4, tenant="b")]
    assert fairness_window_end_s(records) == pytest.approx(1.0)  # b is done at 1.0
    stats = tenant_stats(records, {"a": 2.0, "b": 1.0}, {})
    # a by t=1: its prompt (10) and 1 of 3 chunks -> 10 + 2 * 1 = 12; b: 4 + 2 * 2 = 8
    assert stats["a"].service_tokens == pytest.approx(12.0)
    assert stats["b"].service_tokens == pytest.approx(8.0)
    assert stats["a"].service_rate == pytest.approx(12.0)  # per second of the 1 s window
    assert stats["a"].total_output_tokens == 3 and stats["b"].completed == 1
    m = compute_metrics(records, 3.0, [99], tenant_weights={"a": 2.0, "b": 1.0})
    # weight-normalised service [6, 8]: 14^2 / (2 * (36 + 64))
    assert m.jain_fairness_index == pytest.approx(196 / 200)
    assert compute_metrics(records, 3.0, [99]).jain_fairness_index == pytest.approx(400 / 416)


def test_duration_must_be_positive():
    with pytest.raises(ValueError, match="duration"):
        compute_metrics(_run(), 0.0, [99])
