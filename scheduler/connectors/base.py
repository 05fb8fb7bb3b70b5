"""The connector-policy interface and its null object (colocated serving)."""
from __future__ import annotations

from typing import Protocol

from kvcache.kv_manager import KVCacheManager
from scheduler.kv_moves import MoveResult, MoveTracker
from scheduler.request import Request, RequestStatus
from scheduler.step import StepPlan


class Scheduler(Protocol):
    """What a connector policy may use of the scheduler that composes it (scheduler/scheduler.py)."""
    kv: KVCacheManager
    requests: dict[str, Request]
    moves: MoveTracker

    def enqueue_front(self, request: Request) -> None: ...

    def finish(self, request: Request, status: RequestStatus, error: str | None = None) -> None: ...

    def note_accepted(self, request: Request) -> None: ...

    def note_finished(self, request: Request) -> None: ...


class ConnectorPolicy(Protocol):
    """Hooks the Scheduler calls at fixed points of a step; each may mutate the scheduler through its
    narrow interface (the `Scheduler` protocol above)."""

    def admit(self, scheduler: Scheduler, request: Request) -> bool:
        """A request was added: True if this policy holds it until it can run (it is not queued)."""

    def before_schedule(self, scheduler: Scheduler, plan: StepPlan, now: float) -> None:
        """Start of a step: put moves that are due (registrations, cancellations) into the plan."""

    def after_schedule(self, scheduler: Scheduler, plan: StepPlan, now: float) -> None:
        """The step's tokens and segments are chosen: add moves they start (and reshape segments)."""

    def finish_status(self, request: Request) -> RequestStatus | None:
        """A token was appended and no stop condition hit: a status that ends the request here."""

    def on_move(self, scheduler: Scheduler, result: MoveResult, now: float) -> None:
        """A move started, progressed or ended (the scheduler has already updated its bookkeeping)."""

    def on_finish(self, scheduler: Scheduler, request: Request) -> None:
        """The request finished (any reason): forget it (its moves are the scheduler's to cancel)."""

    def set_first_token(self, scheduler: Scheduler, request_id: str, token_id: int, now: float) -> None:
        """The first output token, sampled elsewhere (a remote prefill)."""

    def num_pending(self) -> int:
        """Requests this policy holds (not running, not queued)."""

    def counters(self) -> dict[str, float]: ...


class NullConnector:
    """Colocated serving: every request is computed here and nothing moves."""

    def admit(self, scheduler: Scheduler, request: Request) -> bool:
        if request.remote_prefill or request.kv_peer:
            raise ValueError("this instance moves no KV (colocated); it cannot serve a disaggregated request")
        return False

    def before_schedule(self, scheduler: Scheduler, plan: StepPlan, now: float) -> None:
        pass

    def after_schedule(self, scheduler: Scheduler, plan: StepPlan, now: float) -> None:
        pass

    def finish_status(self, request: Request) -> RequestStatus | None:
        return None

    def on_move(self, scheduler: Scheduler, result: MoveResult, now: float) -> None:
        pass

    def on_finish(self, scheduler: Scheduler, request: Request) -> None:
        pass

    def set_first_token(self, scheduler: Scheduler, request_id: str, token_id: int, now: float) -> None:
        pass

    def num_pending(self) -> int:
        return 0

    def counters(self) -> dict[str, float]:
        return {}
