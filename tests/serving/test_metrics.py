"""Prometheus metrics: per-request latencies from the output stream (on a fake clock), gauges and
counter deltas from engine stats, one registry per app."""
from __future__ import annotations

import pytest

from serving.api import build_app
from serving.config import ServerConfig
from serving.engine.protocol import EngineStats, RequestOutput
from serving.metrics import ServingMetrics
from tests.serving.fake_engine import FakeEngine, asgi_client

MODEL = "m"
LABELS = {"model_name": MODEL}


class FakeClock:
    def __init__(self) -> None:
        self.now_s = 100.0

    def __call__(self) -> float:
        return self.now_s


def _sample(metrics: ServingMetrics, name: str, **labels) -> float | None:
    return metrics.registry.get_sample_value(name, {**LABELS, **labels})


def _output(num_new_tokens: int, *, finished=False, reason=None, queue_time_s=None):
    return RequestOutput(request_id="r-0", new_token_ids=[7] * num_new_tokens,
                         new_text="x" * num_new_tokens, finished=finished, finish_reason=reason,
                         num_prompt_tokens=12, queue_time_s=queue_time_s)


def test_request_latencies_from_the_output_stream():
    clock = FakeClock()
    metrics = ServingMetrics(MODEL, max_model_len=512, clock=clock)
    tracker = metrics.track_request(arrival_s=clock.now_s)
    clock.now_s += 0.5
    tracker.on_output(_output(1, queue_time_s=0.2))
    clock.now_s += 0.25
    tracker.on_output(_output(2))
    clock.now_s += 0.75
    tracker.on_output(_output(1, finished=True, reason="stop"))

    assert _sample(metrics, "pdserve:time_to_first_token_seconds_sum") == 0.5
    assert _sample(metrics, "pdserve:time_to_first_token_seconds_count") == 1
    assert _sample(metrics, "pdserve:inter_token_latency_seconds_sum") == 1.0
    assert _sample(metrics, "pdserve:inter_token_latency_seconds_count") == 2
    assert _sample(metrics, "pdserve:e2e_request_latency_seconds_sum") == 1.5
    assert _sample(metrics, "pdserve:request_queue_time_seconds_sum") == 0.2
    assert _sample(metrics, "pdserve:request_queue_time_seconds_count") == 1
    assert _sample(metrics, "pdserve:prompt_tokens_total") == 12
    assert _sample(metrics, "pdserve:generation_tokens_total") == 4
    assert _sample(metrics, "pdserve:request_prompt_tokens_sum") == 12
    assert _sample(metrics, "pdserve:request_generation_tokens_sum") == 4
    assert _sample(metrics, "pdserve:request_success_total", finished_reason="stop") == 1
    assert _sample(metrics, "pdserve:request_success_total", finished_reason="length") == 0


def test_abort_counts_once_and_ignores_later_outputs():
    clock = FakeClock()
    metrics = ServingMetrics(MODEL, max_model_len=512, clock=clock)
    tracker = metrics.track_request(arrival_s=clock.now_s)
    tracker.on_output(_output(1))
    tracker.on_abort()
    tracker.on_abort()
    tracker.on_output(_output(1, finished=True, reason="stop"))
    assert _sample(metrics, "pdserve:request_success_total", finished_reason="abort") == 1
    assert _sample(metrics, "pdserve:request_success_total", finished_reason="stop") == 0
    assert _sample(metrics, "pdserve:e2e_request_latency_seconds_count") == 1


def test_engine_stats_set_gauges_and_advance_counters_by_delta():
    metrics = ServingMetrics(MODEL, max_model_len=512)
    metrics.observe_engine_stats(EngineStats(num_running=3, num_waiting=5, num_swapped=1,
                                             kv_cache_usage=0.25, num_preemptions=2,
                                             prefix_cache_queries=100, prefix_cache_hits=40))
    metrics.observe_engine_stats(EngineStats(num_running=1, kv_cache_usage=0.5, num_preemptions=2,
                                             prefix_cache_queries=150, prefix_cache_hits=70))
    assert _sample(metrics, "pdserve:num_requests_running") == 1
    assert _sample(metrics, "pdserve:num_requests_waiting") == 0
    assert _sample(metrics, "pdserve:kv_cache_usage_perc") == 0.5
    assert _sample(metrics, "pdserve:num_preemptions_total") == 2
    assert _sample(metrics, "pdserve:prefix_cache_queries_total") == 150
    assert _sample(metrics, "pdserve:prefix_cache_hits_total") == 70
    # an engine restart resets its counters; ours never go down
    metrics.observe_engine_stats(EngineStats(prefix_cache_queries=10))
    assert _sample(metrics, "pdserve:prefix_cache_queries_total") == 160


def test_token_buckets_follow_1_2_5_up_to_max_model_len():
    metrics = ServingMetrics(MODEL, max_model_len=120)
    metrics.track_request(0.0).on_abort()
    bounds = [s.labels["le"] for s in metrics.registry.collect() for s in s.samples
              if s.name == "pdserve:request_prompt_tokens_bucket"]
    assert bounds == ["1.0", "2.0", "5.0", "10.0", "20.0", "50.0", "100.0", "+Inf"]


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.mark.anyio
async def test_metrics_endpoint_counts_requests_and_scrapes_stats():
    engine = FakeEngine(name=MODEL)
    app = build_app(engine, ServerConfig())
    other = build_app(FakeEngine(name=MODEL), ServerConfig())  # coexists: its own registry
    async with asgi_client(app) as client:
        await client.post("/v1/completions", json={"model": MODEL, "prompt": "abc", "n": 2,
                                                   "max_tokens": 3})
        await client.post("/v1/completions", json={"model": MODEL, "prompt": "abc",
                                                   "max_tokens": 5, "stop": "c",
                                                   "temperature": 0})
        engine.stats = EngineStats(num_running=4, prefix_cache_hits=9)
        r = await client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    assert 'pdserve:request_success_total{finished_reason="length",model_name="m"} 2.0' in text
    assert 'pdserve:request_success_total{finished_reason="stop",model_name="m"} 1.0' in text
    assert 'pdserve:time_to_first_token_seconds_count{model_name="m"} 3.0' in text
    assert 'pdserve:prompt_tokens_total{model_name="m"} 9.0' in text
    assert 'pdserve:generation_tokens_total{model_name="m"} 9.0' in text
    assert 'pdserve:num_requests_running{model_name="m"} 4.0' in text
    assert 'pdserve:prefix_cache_hits_total{model_name="m"} 9.0' in text
    for name in ("inter_token_latency_seconds", "e2e_request_latency_seconds",
                 "request_queue_time_seconds", "num_requests_waiting", "kv_cache_usage_perc",
                 "prefix_cache_queries_total", "num_preemptions_total"):
        assert f"pdserve:{name}" in text
    untouched = other.state.metrics
    assert untouched.registry.get_sample_value("pdserve:prompt_tokens_total", LABELS) == 0


def test_mode_specific_stats_are_exported():
    from serving.engine.protocol import EngineStats
    from serving.metrics import ServingMetrics

    metrics = ServingMetrics("m", 128)
    extra = {"kv_transfer": {"num_bytes_sent": 4096, "num_failed": 1, "num_recompute_fallbacks": 2},
             "router": {"num_reroutes_total": 3}, "engine": {"restarts_total": 2},
             "instances": {"prefill-0": {"role": "prefill", "up": 1, "queue_depth": 5, "num_running": 2},
                           "decode-0": {"role": "decode", "up": 0, "queue_depth": 0, "num_running": 0}}}
    metrics.observe_engine_stats(EngineStats(extra=extra))
    text = metrics.render().decode()
    assert 'pdserve:kv_transfer_num_bytes_sent_total{model_name="m"} 4096.0' in text
    assert 'pdserve:kv_transfer_num_recompute_fallbacks_total{model_name="m"} 2.0' in text
    assert 'pdserve:router_num_reroutes_total{model_name="m"} 3.0' in text
    assert 'pdserve:engine_restarts_total{model_name="m"} 2.0' in text
    assert 'pdserve:instance_queue_depth{instance="prefill-0",model_name="m",role="prefill"} 5.0' in text
    assert 'pdserve:instance_up{instance="decode-0",model_name="m",role="decode"} 0.0' in text
    # a colocated engine has no extra stats: nothing mode-specific is exported
    metrics.observe_engine_stats(EngineStats())
    assert "kv_transfer" not in metrics.render().decode()


def test_instance_histograms_are_exported_per_instance():
    """pdserve:kv_transfer_latency_seconds as each instance reports it (Stats RPC -> the router's
    aggregate -> /metrics), with the instance and its role as labels."""
    from serving.instance import wire
    from serving.instance._proto import instance_pb2 as pb
    from serving.router.stats import aggregate_stats

    class State:  # what the router's pool keeps per instance
        def __init__(self, name, role, histogram):
            self.name, self.role, self.up, self.num_restarts = name, role, True, 0
            stats = wire.stats_to_proto(EngineStats(extra={"histograms": {"kv_transfer_latency_seconds": histogram}}))
            self.stats = pb.StatsResponse.FromString(stats.SerializeToString())  # as it crosses the wire

    decode = {"bounds": [0.01, 0.1], "counts": [1, 3, 4], "sum": 0.9, "count": 4}
    prefill = {"bounds": [0.01, 0.1], "counts": [0, 2, 2], "sum": 0.1, "count": 2}
    stats = aggregate_stats([State("decode-0", "decode", decode), State("prefill-0", "prefill", prefill)], {})
    metrics = ServingMetrics(MODEL, 128)
    metrics.observe_engine_stats(stats)
    name = "pdserve:kv_transfer_latency_seconds"
    decode_labels = {"instance": "decode-0", "role": "decode"}
    assert _sample(metrics, f"{name}_bucket", le="0.01", **decode_labels) == 1
    assert _sample(metrics, f"{name}_bucket", le="0.1", **decode_labels) == 3
    assert _sample(metrics, f"{name}_bucket", le="+Inf", **decode_labels) == 4
    assert _sample(metrics, f"{name}_count", **decode_labels) == 4
    assert _sample(metrics, f"{name}_sum", **decode_labels) == pytest.approx(0.9)
    assert _sample(metrics, f"{name}_count", instance="prefill-0", role="prefill") == 2
