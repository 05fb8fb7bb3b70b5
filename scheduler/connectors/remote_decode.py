"""Prefill side of disaggregation: a request computes its prompt here, sends the prompt's KV to the
decode instance named in `kv_peer`, and finishes at its first token (FINISHED_REMOTE_DECODE).

The send starts in the step that completes the prompt, and that step's forward pass is cut into layer
groups so each group's KV leaves while later layers compute. The blocks stay held (the scheduler's
move tracker keeps a finished request's blocks while its move is in flight) under a *lease* that this
policy owns: the send must end within lease_ttl_s, or the policy cancels it, counted and logged, and
the blocks come back once no copy reads them.
"""
from __future__ import annotations

import logging

from scheduler.kv_moves import CancelKV, MoveResult, SendKV
from scheduler.connectors.base import Scheduler
from scheduler.request import Request, RequestStatus
from scheduler.step import Segment, StepPlan

logger = logging.getLogger(__name__)


def split_layers(segments: list[Segment], num_layers: int, layers_per_group: int) -> list[Segment]:
    """Each segment cut into runs of layers_per_group layers (same rows, consecutive layer ranges)."""
    split = []
    for segment in segments:
        end = num_layers if segment.layer_end is None else segment.layer_end
        for start in range(segment.layer_start, end, layers_per_group):
            split.append(Segment(segment.request_ids, start, min(start + layers_per_group, end)))
    return split


class RemoteDecode:
    def __init__(self, lease_ttl_s: float, num_layers: int, layers_per_group: int = 1) -> None:
        if lease_ttl_s <= 0 or layers_per_group < 1:
            raise ValueError("the KV lease ttl must be positive and layers_per_group at least 1")
        self.lease_ttl_s = lease_ttl_s
        self.num_layers = num_layers
        self.layers_per_group = layers_per_group
        self.lease_deadlines: dict[str, float] = {}  # request id -> when its send must have ended
        self.num_sends = 0
        self.num_leases_expired = 0

    def admit(self, scheduler: Scheduler, request: Request) -> bool:
        if request.remote_prefill:
            raise ValueError("a prefill instance does not receive KV: remote_prefill is for decode instances")
        return False

    def before_schedule(self, scheduler: Scheduler, plan: StepPlan, now: float) -> None:
        for request_id, deadline in list(self.lease_deadlines.items()):
            if now > deadline:
                del self.lease_deadlines[request_id]
                self.num_leases_expired += 1
                logger.warning("KV lease of request %s expired after %gs without acknowledgement; "
                               "cancelling its send", request_id, self.lease_ttl_s)
                plan.kv_moves.append(CancelKV(request_id, f"KV lease expired after {self.lease_ttl_s:g}s"))

    def after_schedule(self, scheduler: Scheduler, plan: StepPlan, now: float) -> None:
        sends = False
        for request_id in plan.num_scheduled_tokens:
            request = scheduler.requests[request_id]
            if not request.kv_peer or request.num_computed_tokens < request.num_prompt_tokens:
                continue
            if scheduler.moves.has(request_id, "send"):
                continue  # sent already (a decode step after a stop string was missed, say)
            num_blocks = scheduler.kv.num_blocks_for(request.num_prompt_tokens)
            plan.kv_moves.append(SendKV(request_id, scheduler.kv.block_ids(request_id)[:num_blocks],
                                        request.num_prompt_tokens, request.kv_peer))
            self.lease_deadlines[request_id] = now + self.lease_ttl_s
            self.num_sends += 1
            sends = True
        if sends:
            plan.segments = split_layers(plan.segments, self.num_layers, self.layers_per_group)

    def finish_status(self, request: Request) -> RequestStatus | None:
        # decoding continues on the peer
        return RequestStatus.FINISHED_REMOTE_DECODE if request.kv_peer else None

    def on_move(self, scheduler: Scheduler, result: MoveResult, now: float) -> None:
        if result.kind == "send" and result.ended:
            self.lease_deadlines.pop(result.request_id, None)

    def on_finish(self, scheduler: Scheduler, request: Request) -> None:
        pass  # a lease outlives its request: it ends with the send

    def set_first_token(self, scheduler: Scheduler, request_id: str, token_id: int, now: float) -> None:
        pass

    def num_pending(self) -> int:
        return 0

    def counters(self) -> dict[str, float]:
        return {"num_sends": self.num_sends, "num_leases_expired": self.num_leases_expired,
                "num_leased": len(self.lease_deadlines)}
