"""Scheduling policies as small objects behind one interface each, composed by the Scheduler.

- a priority policy orders running requests and names the victim when blocks run out;
- a preemption policy decides what happens to the victim's KV (recompute drops it; a swapping
  policy would copy it to a second tier and keep its block table valid).
"""
from __future__ import annotations

from typing import Protocol

from kvcache.kv_manager import KVCacheManager
from scheduler.request import Request, RequestStatus


class PriorityPolicy(Protocol):
    def lowest(self, running: list[Request]) -> Request: ...


class FcfsPriority:
    """First come, first served: the latest admitted running request is preempted first."""

    def lowest(self, running: list[Request]) -> Request:
        return running[-1]


class PreemptionPolicy(Protocol):
    def preempt(self, request: Request, kv: KVCacheManager) -> None:
        """Release the request's device blocks and mark it preempted. Mutates request and kv."""


class RecomputePreemption:
    """Drop the KV; the request is prefilled again (prompt + outputs so far) when resumed.
    Its full blocks stay in the prefix cache until evicted, so a resume often recomputes little."""

    def preempt(self, request: Request, kv: KVCacheManager) -> None:
        kv.free(request.request_id)
        request.num_computed_tokens = 0
        request.status = RequestStatus.PREEMPTED
