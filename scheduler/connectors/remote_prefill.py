"""Decode side of disaggregation: a request's prompt KV is computed by a prefill instance and lands in
blocks reserved here.

One pending receive, owned by this policy from the request's arrival until it runs:

    admit: reserve blocks for prompt + 1 ──► RecvKV in the next plan ──started──► "accepted" (the
    router may now start the prefill, which sends to these blocks)
        │
        ├── recv finished (the commit may carry the first token) ─┐
        ├── recv failed: recompute here, or fail, by policy ──────┼─ + first token known ─► waiting
        └── first token known, the peer has not begun, handoff ───┘   (front: it holds its blocks)
            deadline passed ──► CancelKV ──► recv failed

The first token also arrives from the router (`set_first_token`); whichever source comes first
counts. The handoff deadline (first token known, no transfer begun after stall_timeout_s) is this
policy's; once a transfer is active, the KV receiver's progress timer owns stalls.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

from scheduler.kv_moves import ACTIVE, FAILED, FINISHED, STARTED, CancelKV, MoveResult, RecvKV
from scheduler.connectors.base import Scheduler
from scheduler.errors import NoKVSpaceError
from scheduler.request import Request, RequestStatus
from scheduler.step import StepPlan

logger = logging.getLogger(__name__)

FAILURE_POLICIES = ("recompute", "fail")


@dataclass
class _PendingRecv:
    request: Request
    block_ids: list[int]  # the prompt's blocks (the first output token's slot is not received)
    active: bool = False  # the peer began sending
    kv: str = "pending"  # "pending", "ok" (arrived) or "recompute" (will not arrive)
    failure: str = ""  # why it will not arrive
    first_token: int | None = None
    handoff_deadline: float | None = None


class RemotePrefill:
    def __init__(self, stall_timeout_s: float, failure_policy: str = "recompute") -> None:
        if failure_policy not in FAILURE_POLICIES:
            raise ValueError(f"failure policy must be one of {', '.join(FAILURE_POLICIES)}, got {failure_policy!r}")
        self.stall_timeout_s = stall_timeout_s
        self.failure_policy = failure_policy
        self.pending: dict[str, _PendingRecv] = {}
        self._due: list[RecvKV | CancelKV] = []
        self.num_received = 0
        self.num_recompute_fallbacks = 0
        self.num_failed_by_policy = 0
        self.num_never_sent = 0

    # ---- scheduler hooks ----
    def admit(self, scheduler: Scheduler, request: Request) -> bool:
        if request.kv_peer:
            raise ValueError("a decode instance does not send KV: kv_peer is for prefill instances")
        if not request.remote_prefill:
            return False
        kv = scheduler.kv
        num_tokens = request.num_prompt_tokens + 1  # room for the first token (sampled remotely)
        if not kv.can_allocate(request.request_id, num_tokens):
            raise NoKVSpaceError(f"no free KV blocks for {num_tokens} tokens on this decode instance")
        kv.allocate(request.request_id, num_tokens)
        request.status = RequestStatus.WAITING_FOR_REMOTE_KV
        block_ids = kv.block_ids(request.request_id)[:kv.num_blocks_for(request.num_prompt_tokens)]
        self.pending[request.request_id] = _PendingRecv(request, block_ids)
        self._due.append(RecvKV(request.request_id, block_ids, request.num_prompt_tokens))
        return True

    def before_schedule(self, scheduler: Scheduler, plan: StepPlan, now: float) -> None:
        plan.kv_moves.extend(self._due)
        self._due = []
        for request_id, pending in self.pending.items():
            if pending.handoff_deadline is not None and now > pending.handoff_deadline:
                pending.handoff_deadline = None
                self.num_never_sent += 1
                logger.warning("request %s: the prefill finished %.0fs ago and no KV has arrived; giving up "
                               "on the transfer", request_id, self.stall_timeout_s)
                plan.kv_moves.append(CancelKV(request_id, "no KV arrived after the prefill finished"))

    def after_schedule(self, scheduler: Scheduler, plan: StepPlan, now: float) -> None:
        pass

    def finish_status(self, request: Request) -> RequestStatus | None:
        return None

    def on_move(self, scheduler: Scheduler, result: MoveResult, now: float) -> None:
        pending = self.pending.get(result.request_id)
        if pending is None or result.kind != "recv":
            return
        if result.state == STARTED:
            scheduler.note_accepted(pending.request)
        elif result.state == ACTIVE:
            pending.active, pending.handoff_deadline = True, None
        elif result.state == FINISHED:
            pending.kv = "ok"
            self.num_received += 1
            if result.first_token_id is not None and pending.first_token is None:
                pending.first_token = result.first_token_id
            self._promote_if_ready(scheduler, pending)
        elif result.state == FAILED:
            self._on_failed(scheduler, pending, result.reason)

    def _on_failed(self, scheduler: Scheduler, pending: _PendingRecv, reason: str) -> None:
        request_id = pending.request.request_id
        if self.failure_policy == "recompute":
            logger.info("KV of request %s will not arrive (%s): it will be recomputed here", request_id, reason)
            pending.kv, pending.failure = "recompute", reason
            self._promote_if_ready(scheduler, pending)
            return
        logger.warning("KV of request %s will not arrive (%s): failing it", request_id, reason)
        self.num_failed_by_policy += 1
        scheduler.finish(pending.request, RequestStatus.FINISHED_ERROR,
                         error=f"the KV transfer from the prefill instance failed ({reason})")
        scheduler.note_finished(pending.request)

    def on_finish(self, scheduler: Scheduler, request: Request) -> None:
        self.pending.pop(request.request_id, None)
        # a receive not planned yet must never be: its blocks go back to the pool right now
        self._due = [move for move in self._due if move.request_id != request.request_id]

    def set_first_token(self, scheduler: Scheduler, request_id: str, token_id: int, now: float) -> None:
        pending = self.pending.get(request_id)
        if pending is None or pending.first_token is not None:
            return
        pending.first_token = token_id
        if pending.kv == "pending" and not pending.active:
            pending.handoff_deadline = now + self.stall_timeout_s  # the prefill is done: its KV must follow
        self._promote_if_ready(scheduler, pending)

    def _promote_if_ready(self, scheduler: Scheduler, pending: _PendingRecv) -> None:
        if pending.kv == "pending" or pending.first_token is None:
            return
        request = pending.request
        del self.pending[request.request_id]
        request.output_token_ids.append(pending.first_token)
        request.num_computed_tokens = request.num_prompt_tokens if pending.kv == "ok" else 0
        request.kv_transfer = "transferred" if pending.kv == "ok" else f"recomputed: {pending.failure}"
        if pending.kv == "recompute":
            self.num_recompute_fallbacks += 1
            logger.warning("request %s: its KV did not arrive (%s); recomputing the prompt", request.request_id,
                           pending.failure)
        request.status = RequestStatus.WAITING
        scheduler.enqueue_front(request)  # it holds its blocks already: use them first

    def num_pending(self) -> int:
        return len(self.pending)

    def counters(self) -> dict[str, float]:
        return {"num_kv_received": self.num_received, "num_recompute_fallbacks": self.num_recompute_fallbacks,
                "num_failed_by_policy": self.num_failed_by_policy, "num_never_sent": self.num_never_sent}
