"""EngineStats of a disaggregated deployment: the sum over instances, and what only it has.

`extra` holds (all numbers; *_total are cumulative counters, the rest gauges):

    kv_transfer   {counter: total over instances}: num_bytes_sent, seconds_sending,
                  num_bytes_received, seconds_receiving, num_failed, num_retries,
                  num_recompute_fallbacks, num_failed_by_policy, ...
    router        num_reroutes_total, num_decode_failures_total, num_reprefills_total,
                  num_kv_waits_total, num_instance_failures_total, num_instance_restarts_total
    instances     {name: {role, up, queue_depth, num_queued_prefill_tokens, num_running,
                          num_free_blocks, num_total_blocks, num_restarts}}
    histograms    {metric: {instance name: {role, bounds, counts (cumulative, +Inf last), sum, count}}}
                  e.g. kv_transfer_latency_seconds, per instance (not summed: roles measure differently)
    client_service  {client: service summed over instances} (--scheduling-policy vtc: prefill instances
                  count prompts and first tokens, decode instances the rest)
"""
from __future__ import annotations

from serving.engine.protocol import EngineStats


def aggregate_stats(instances: list, router_counters: dict[str, int]) -> EngineStats:
    stats = EngineStats()
    num_used = num_total = 0
    transfer: dict[str, float] = {}
    per_instance = {}
    histograms: dict[str, dict] = {}
    client_service: dict[str, float] = {}
    for state in instances:
        s = state.stats
        per_instance[state.name] = {
            "role": state.role, "up": int(state.up), "queue_depth": s.num_waiting + s.num_remote_waiting,
            "num_queued_prefill_tokens": s.num_queued_prefill_tokens, "num_running": s.num_running,
            "num_free_blocks": s.num_free_blocks, "num_total_blocks": s.num_total_blocks,
            "num_restarts": state.num_restarts}
        for name, value in s.transfer.items():
            transfer[name] = transfer.get(name, 0) + value
        for name, h in s.histograms.items():
            histograms.setdefault(name, {})[state.name] = {
                "role": state.role, "bounds": list(h.bounds), "counts": list(h.counts), "sum": h.sum,
                "count": h.count}
        for client, value in s.client_service.items():
            client_service[client] = client_service.get(client, 0.0) + value
        # counters keep a down instance's last figures; gauges count only what is up
        stats.num_preemptions += s.num_preemptions
        stats.prefix_cache_queries += s.prefix_cache_queries
        stats.prefix_cache_hits += s.prefix_cache_hits
        if not state.up:
            continue
        stats.num_running += s.num_running
        stats.num_waiting += s.num_waiting
        stats.num_swapped += s.num_swapped
        num_used += s.num_total_blocks - s.num_free_blocks
        num_total += s.num_total_blocks
    stats.kv_cache_usage = num_used / num_total if num_total else 0.0
    router = {f"{name}_total": value for name, value in router_counters.items()}
    stats.extra = {"kv_transfer": transfer, "router": router, "instances": per_instance, "histograms": histograms,
                   "client_service": client_service}
    return stats
