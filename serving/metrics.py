"""Prometheus metrics of one served model, named like vLLM's with a `pdserve:` prefix.

Every metric lives in a registry owned by one `ServingMetrics` object (never the process-wide
default registry), so several servers can coexist in one process and tests start from zero.

Where each number comes from:
- TTFT, inter-token latency, end-to-end latency, token counts, finish reasons: measured by the API
  layer from each engine request's `RequestOutput` stream (`RequestMetrics`);
- queue time: `RequestOutput.queue_time_s` of the first output;
- gauges (running, waiting, swapped, KV usage) and the engine's cumulative counters (preemptions,
  prefix-cache queries and hits): `engine.get_stats()` at scrape time, counters advanced by the delta;
- per-client service under `--scheduling-policy vtc` (`pdserve:client_service_tokens{client}`):
  `EngineStats.extra["client_service"]` (summed over instances in disaggregated mode).
"""
from __future__ import annotations

import time
from typing import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client import generate_latest

from serving.engine.protocol import EngineStats, RequestOutput

# vLLM's buckets, extended below 10 ms because small models on CPU step that fast
_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5,
                0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
_REQUEST_TIME_BUCKETS = (0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0,
                         30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
FINISH_REASONS = ("stop", "length", "abort", "error")
# HELP text of histograms that instances report (EngineStats.extra["histograms"]), by name
_INSTANCE_HISTOGRAM_DOCS = {
    "kv_transfer_latency_seconds": "KV transfer latency per instance: begin to acknowledgement on a prefill "
                                   "instance, Reserve to Commit on a decode instance (successful transfers)."}
# an instance's kv_swap counters travel in its summed transfer map under this prefix (serving/instance)
KV_SWAP_PREFIX = "kv_swap:"
# EngineStats counter fields -> metric attribute names
# clients with a series of their own in pdserve:client_service_tokens; the rest are summed as "other"
MAX_CLIENT_SERIES = 32
_STATS_COUNTERS = {"num_preemptions": "num_preemptions",
                   "prefix_cache_queries": "prefix_cache_queries",
                   "prefix_cache_hits": "prefix_cache_hits"}


def _buckets_1_2_5(max_value: int) -> list[float]:
    """1, 2, 5, 10, 20, 50, ... up to max_value (vLLM's token-count buckets)."""
    buckets: list[float] = []
    exponent = 0
    while True:
        for mantissa in (1, 2, 5):
            value = mantissa * 10**exponent
            if value > max_value:
                return buckets
            buckets.append(float(value))
        exponent += 1


class ServingMetrics:
    """All metrics of one served model. Mutated by `RequestMetrics` (per request) and by
    `observe_engine_stats` (per scrape); read by `render`."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, model_name: str, max_model_len: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.registry = CollectorRegistry()
        self.clock = clock
        self._last_engine_counts: dict[str, int] = {}
        labels = ["model_name"]
        reg = self.registry

        def histogram(name: str, doc: str, buckets) -> Histogram:
            return Histogram(f"pdserve:{name}", doc, labels, buckets=buckets,
                             registry=reg).labels(model_name)

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(f"pdserve:{name}", doc, labels, registry=reg).labels(model_name)

        def counter(name: str, doc: str) -> Counter:
            return Counter(f"pdserve:{name}", doc, labels, registry=reg).labels(model_name)

        self.time_to_first_token = histogram(
            "time_to_first_token_seconds", "Time to first token in seconds.", _TTFT_BUCKETS)
        self.inter_token_latency = histogram(
            "inter_token_latency_seconds", "Time between consecutive outputs of a request.",
            _ITL_BUCKETS)
        self.e2e_request_latency = histogram(
            "e2e_request_latency_seconds", "Arrival to last output, in seconds.",
            _REQUEST_TIME_BUCKETS)
        self.request_queue_time = histogram(
            "request_queue_time_seconds", "Time a request waited before being scheduled.",
            _REQUEST_TIME_BUCKETS)
        token_buckets = _buckets_1_2_5(max_model_len)
        self.request_prompt_tokens = histogram(
            "request_prompt_tokens", "Prompt tokens per finished request.", token_buckets)
        self.request_generation_tokens = histogram(
            "request_generation_tokens", "Generated tokens per finished request.", token_buckets)
        self.num_requests_running = gauge("num_requests_running", "Requests in running batches.")
        self.num_requests_waiting = gauge("num_requests_waiting", "Requests waiting to be scheduled.")
        self.num_requests_swapped = gauge("num_requests_swapped", "Requests swapped out.")
        self.kv_cache_usage = gauge("kv_cache_usage_perc", "Fraction of KV blocks in use (0..1).")
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens of started requests.")
        self.generation_tokens = counter("generation_tokens", "Generated tokens.")
        self.num_preemptions = counter("num_preemptions", "Preemptions in the engine.")
        self.prefix_cache_queries = counter(
            "prefix_cache_queries", "Prompt tokens looked up in the prefix cache.")
        self.prefix_cache_hits = counter(
            "prefix_cache_hits", "Prompt tokens found in the prefix cache.")
        self._model_name = model_name
        self._request_success = Counter(
            "pdserve:request_success", "Finished requests by finish reason.",
            ["model_name", "finished_reason"], registry=reg)
        for reason in FINISH_REASONS:
            # created up front so every reason is exported (at 0) before it first happens
            self.request_success(reason)
        self._extra = _ExtraStatsCollector(model_name)
        reg.register(self._extra)

    def request_success(self, finished_reason: str) -> Counter:
        return self._request_success.labels(self._model_name, finished_reason)

    def track_request(self, arrival_s: float) -> "RequestMetrics":
        """Start measuring one engine request that arrived at `arrival_s` (on `self.clock`)."""
        return RequestMetrics(self, arrival_s)

    def observe_engine_stats(self, stats: EngineStats) -> None:
        """Set the gauges and advance the engine's cumulative counters by what changed."""
        self.num_requests_running.set(stats.num_running)
        self.num_requests_waiting.set(stats.num_waiting)
        self.num_requests_swapped.set(stats.num_swapped)
        self.kv_cache_usage.set(stats.kv_cache_usage)
        self._extra.latest = stats.extra or {}
        for field_name, attribute in _STATS_COUNTERS.items():
            count = getattr(stats, field_name)
            previous = self._last_engine_counts.get(field_name, 0)
            # a count that went down means the engine restarted: all of it is new
            delta = count - previous if count >= previous else count
            if delta > 0:
                getattr(self, attribute).inc(delta)
            self._last_engine_counts[field_name] = count

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _ExtraStatsCollector:
    """Mode-specific engine counters from EngineStats.extra (disaggregated: KV transfer, router,
    per-instance state), exported as they were at the last scrape:

        pdserve:kv_transfer_<name>_total     counters summed over instances (bytes, seconds, failures,
                                             retries, recompute fallbacks, ...)
        pdserve:kv_swap_<name>_total         preemptions by mode (preemptions_swap, preemptions_recompute),
                                             swaps in and out (moves, blocks, bytes, span copies, seconds,
                                             failures), host prefix-cache hits and offloads
        pdserve:cpu_cache_usage_perc         colocated: the host KV tier's usage (swap mode)
        pdserve:router_<name>_total          re-routes, decode failures, re-prefills, restarts, ...
        pdserve:engine_restarts_total        colocated: times the engine process was started again
        pdserve:instance_<name>{instance, role}   gauges: up, queue_depth, num_running, free blocks, ...
        pdserve:<histogram>{instance, role}       histograms an instance keeps, e.g.
                                             kv_transfer_latency_seconds (begin -> ack on a prefill
                                             instance, Reserve -> Commit on a decode instance)
        pdserve:client_service_tokens{client}     --scheduling-policy vtc: each client's service (prompt
                                             tokens x prefill weight + output tokens x decode weight,
                                             over its weight); the MAX_CLIENT_SERIES clients with the
                                             most, the rest summed as client="other". A client idle long
                                             enough to be forgotten (docs/fairness.md) drops out
    """

    def __init__(self, model_name: str) -> None:
        self.model_name = model_name
        self.latest: dict = {}

    def describe(self):  # no fixed metric names: skip the registry's duplicate check
        return []

    def collect(self):
        model = self.model_name
        groups = {group: dict(self.latest.get(group, {})) for group in ("kv_transfer", "kv_swap", "router", "engine")}
        for name in [n for n in groups["kv_transfer"] if n.startswith(KV_SWAP_PREFIX)]:  # an instance's (wire)
            value = groups["kv_transfer"].pop(name)
            key = name[len(KV_SWAP_PREFIX):]
            groups["kv_swap"][key] = groups["kv_swap"].get(key, 0.0) + value
        for group, values in groups.items():
            for name, value in sorted(values.items()):
                base = name[:-len("_total")] if name.endswith("_total") else name
                family = CounterMetricFamily(f"pdserve:{group}_{base}", f"{group} counter {base}",
                                             labels=["model_name"])
                family.add_metric([model], float(value))
                yield family
        if "host_kv_usage" in self.latest:
            family = GaugeMetricFamily("pdserve:cpu_cache_usage_perc", "Fraction of the host KV tier's blocks "
                                       "in use (--preemption-mode swap; vLLM V0's name).", labels=["model_name"])
            family.add_metric([model], float(self.latest["host_kv_usage"]))
            yield family
        instances = self.latest.get("instances", {})
        fields = sorted({k for info in instances.values() for k, v in info.items()
                         if isinstance(v, (int, float))})
        for field_name in fields:
            family = GaugeMetricFamily(f"pdserve:instance_{field_name}", f"per-instance {field_name}",
                                       labels=["model_name", "instance", "role"])
            for instance, info in sorted(instances.items()):
                if field_name in info:
                    family.add_metric([model, instance, str(info.get("role", ""))], float(info[field_name]))
            yield family
        service = self.latest.get("client_service")
        if service:
            family = GaugeMetricFamily("pdserve:client_service_tokens",
                                       "Service each client received under --scheduling-policy vtc, in weighted "
                                       "tokens over the client's weight.", labels=["model_name", "client"])
            for client, value in top_clients(service, MAX_CLIENT_SERIES):
                family.add_metric([model, client], float(value))
            yield family
        for name, per_instance in sorted(self.latest.get("histograms", {}).items()):
            if "bounds" in per_instance:  # one engine's own (not per instance)
                per_instance = {"": per_instance}
            family = HistogramMetricFamily(f"pdserve:{name}", _INSTANCE_HISTOGRAM_DOCS.get(name, name),
                                           labels=["model_name", "instance", "role"])
            for instance, h in sorted(per_instance.items()):
                buckets = [(repr(float(bound)), count) for bound, count in zip(h["bounds"], h["counts"])]
                family.add_metric([model, instance, str(h.get("role", ""))], buckets + [("+Inf", h["counts"][-1])],
                                  sum_value=h["sum"])
            yield family


def top_clients(service: dict[str, float], limit: int) -> list[tuple[str, float]]:
    """The `limit` clients with the most service, then the rest summed as "other" (a Prometheus label
    value per client would grow without bound)."""
    ranked = sorted(service.items(), key=lambda item: (-item[1], item[0]))
    top = dict(ranked[:limit])
    if len(ranked) > limit:
        top["other"] = top.get("other", 0.0) + sum(value for _, value in ranked[limit:])
    return list(top.items())


class RequestMetrics:
    """Latencies and counts of one engine request, from its output stream.

    Call `on_output` for every output in order, or `on_abort` if the stream is abandoned.
    """

    def __init__(self, metrics: ServingMetrics, arrival_s: float) -> None:
        self._metrics = metrics
        self._arrival_s = arrival_s
        self._last_token_s: float | None = None
        self._num_prompt_tokens = 0
        self._num_generated_tokens = 0
        self._queue_time_seen = False
        self._done = False

    def on_output(self, output: RequestOutput) -> None:
        if self._done:
            return
        m = self._metrics
        now = m.clock()
        if output.queue_time_s is not None and not self._queue_time_seen:
            self._queue_time_seen = True
            m.request_queue_time.observe(output.queue_time_s)
        if output.num_prompt_tokens and not self._num_prompt_tokens:
            self._num_prompt_tokens = output.num_prompt_tokens
            m.prompt_tokens.inc(output.num_prompt_tokens)
        if output.new_token_ids:
            if self._last_token_s is None:
                m.time_to_first_token.observe(now - self._arrival_s)
            else:
                # one sample per output: an engine step that emits several tokens is one interval
                m.inter_token_latency.observe(now - self._last_token_s)
            self._last_token_s = now
            self._num_generated_tokens += len(output.new_token_ids)
            m.generation_tokens.inc(len(output.new_token_ids))
        if output.finished:
            self._finish(output.finish_reason or "stop", now)

    def on_abort(self) -> None:
        """The stream was abandoned (the client went away)."""
        if not self._done:
            self._finish("abort", self._metrics.clock())

    def on_error(self) -> None:
        """The stream raised (rejected, engine dead, ...): counted, but not a latency sample."""
        if not self._done:
            self._done = True
            self._metrics.request_success("error").inc()

    def _finish(self, reason: str, now: float) -> None:
        self._done = True
        m = self._metrics
        m.e2e_request_latency.observe(now - self._arrival_s)
        m.request_prompt_tokens.observe(self._num_prompt_tokens)
        m.request_generation_tokens.observe(self._num_generated_tokens)
        m.request_success(reason).inc()
