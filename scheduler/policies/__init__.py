"""Scheduling policies as small objects behind one interface each, composed by the Scheduler:

    ordering     which waiting request goes next, which running one is preempted (FCFS, priority,
                 VTC fairness)
    prefill      how a prompt is shaped into steps (chunked; layered prefill plugs in here)
    preemption   what happens to a victim's KV (recompute, or swap to a host tier)

`make_ordering` / `make_prefill_shaping` / `make_preemption` build them from SchedulerConfig.
"""
from scheduler.policies.fairness import VtcOrdering
from scheduler.policies.ordering import FcfsOrdering, OrderingPolicy, PriorityOrdering, make_ordering
from scheduler.policies.prefill import ChunkedPrefill, PrefillShaping, make_prefill_shaping
from scheduler.policies.preemption import PreemptionPolicy, RecomputePreemption, SwapPreemption, make_preemption

__all__ = ["OrderingPolicy", "FcfsOrdering", "PriorityOrdering", "VtcOrdering", "make_ordering", "PrefillShaping",
           "ChunkedPrefill", "make_prefill_shaping", "PreemptionPolicy", "RecomputePreemption",
           "SwapPreemption", "make_preemption"]
