"""Preemption policies: what happens to a victim's KV when the pool runs out.

`RecomputePreemption` drops it: the request is prefilled again (prompt + outputs so far) when
resumed, and its full blocks stay in the prefix cache until evicted, so a resume often recomputes
little. A swapping policy copies the blocks to a host tier instead: it returns SwapOut moves, and the
scheduler keeps the blocks until the moves end.
"""
from __future__ import annotations

from typing import Protocol

from kvcache.kv_manager import KVCacheManager
from scheduler.kv_moves import KVMove
from scheduler.request import Request, RequestStatus


class PreemptionPolicy(Protocol):
    name: str

    def preempt(self, request: Request, kv: KVCacheManager) -> list[KVMove]:
        """Take the request's device blocks back (or say how to move them off the device) and mark it
        preempted. Mutates request and kv; returns the moves to plan."""


class RecomputePreemption:
    name = "recompute"

    def preempt(self, request: Request, kv: KVCacheManager) -> list[KVMove]:
        kv.free(request.request_id)
        request.num_computed_tokens = 0
        request.status = RequestStatus.PREEMPTED
        return []


_POLICIES = {"recompute": RecomputePreemption}
PREEMPTION_MODES = tuple(_POLICIES)


def make_preemption(mode: str) -> PreemptionPolicy:
    if mode not in _POLICIES:
        raise ValueError(f"--preemption-mode must be one of {', '.join(_POLICIES)}, got {mode!r}")
    return _POLICIES[mode]()
