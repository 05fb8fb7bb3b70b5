"""An executor that computes nothing: the simulator's.

It keeps the same per-request bookkeeping a model runner keeps (so plans are checked the same way),
takes each step's duration from the fitted latency model (scheduler/latency_model.py), and returns a
dummy token for every request whose step reaches the end of its known tokens. The engine loop advances
its virtual clock by that duration, so a few hundred requests "run" in milliseconds of wall time
through the runtime's own scheduler, KV manager and policies.

A mixed step (prefill chunks beside decode rows) costs prefill(chunks) + decode(contexts), minus one
fixed overhead: the two fits each include the per-step constant. `latency_model` is anything with
those two methods and the two fixed terms (`prefill.a`, `decode.a`): a fitted `LatencyModel`, or a
`PlanLatency` that scales one to another TP x PP plan (scheduler/latency_plans.py).

KV moves end through a `MoveModel`, told when each move was planned and how long the step that
planned it lasts (a send streams its layers out while that step computes them); the default ends
each at once (started, active and finished in the step that issued it), which is what a colocated or
single-instance simulation needs. The simulator's transfer model (scheduler/simulator/transfer.py)
times them from link bandwidth instead.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from scheduler.kv_moves import ACTIVE, FINISHED, STARTED, CancelKV, KVMove, MoveResult
from scheduler.latency_model import LatencyModel
from scheduler.step import StepPlan, StepResult, is_decode_row


class MoveModel(Protocol):
    def start(self, move: KVMove, now: float, step_seconds: float) -> None:
        """A move was planned in a step that starts at virtual time `now` and lasts `step_seconds`."""

    def due(self, now: float) -> list[MoveResult]:
        """Results whose time has come by `now`."""


class InstantMoves:
    """Every move succeeds at once."""

    def __init__(self) -> None:
        self._due: list[MoveResult] = []

    def start(self, move: KVMove, now: float, step_seconds: float) -> None:
        if isinstance(move, CancelKV):
            return  # its move has ended already
        if move.kind == "recv":
            self._due += [MoveResult(move.request_id, move.kind, STARTED), MoveResult(move.request_id, move.kind, ACTIVE)]
        self._due.append(MoveResult(move.request_id, move.kind, FINISHED))

    def due(self, now: float) -> list[MoveResult]:
        due, self._due = self._due, []
        return due


@dataclass
class _State:
    num_tokens: int  # known tokens (prompt + outputs)
    num_computed_tokens: int


class LatencyModelExecutor:
    def __init__(self, latency_model: LatencyModel, token_id: int = 0, moves: MoveModel | None = None,
                 clock=None) -> None:
        self.latency_model = latency_model
        self.token_id = token_id
        self.moves = moves or InstantMoves()
        self.clock = clock  # read for move timing only; the engine loop advances it
        self.states: dict[str, _State] = {}
        self.busy_seconds = 0.0

    def execute(self, plan: StepPlan) -> StepResult:
        now = self.clock.now() if self.clock is not None else 0.0
        for request_id in plan.finished_request_ids + plan.preempted_request_ids:
            self.states.pop(request_id, None)
        for new in plan.new_requests:
            self.states[new.request_id] = _State(len(new.token_ids), new.num_computed_tokens)
        for delta in plan.cached_requests:
            state = self.states[delta.request_id]
            if state.num_computed_tokens != delta.num_computed_tokens:
                raise RuntimeError(f"plan and executor disagree on request {delta.request_id}: "
                                   f"{delta.num_computed_tokens} vs {state.num_computed_tokens} computed tokens")
            state.num_tokens += len(delta.new_token_ids)
        # one pass: classify each row as step_seconds does (before it advances), then advance it
        chunks, contexts, sampled = [], [], {}
        states, token_id = self.states, self.token_id
        for request_id, num_tokens in plan.num_scheduled_tokens.items():
            state = states[request_id]
            computed = state.num_computed_tokens
            if is_decode_row(num_tokens, computed, state.num_tokens):
                contexts.append(computed + 1)
            else:
                chunks.append(num_tokens)
            state.num_computed_tokens = computed = computed + num_tokens
            if computed >= state.num_tokens:
                sampled[request_id] = token_id
                state.num_tokens += 1
        seconds = self._seconds(chunks, contexts)
        self.busy_seconds += seconds
        for move in plan.kv_moves:
            self.moves.start(move, now, seconds)
        result = StepResult(sampled_token_ids=sampled, step_seconds=seconds)
        result.moves = self.moves.due(now + seconds)
        return result

    def step_seconds(self, plan: StepPlan) -> float:
        """The modelled duration of a plan (0 for one that computes nothing)."""
        chunks, contexts = [], []
        for request_id, num_tokens in plan.num_scheduled_tokens.items():
            state = self.states[request_id]
            if is_decode_row(num_tokens, state.num_computed_tokens, state.num_tokens):
                contexts.append(state.num_computed_tokens + 1)  # a decode row
            else:
                chunks.append(num_tokens)
        return self._seconds(chunks, contexts)

    def _seconds(self, chunks: list[int], contexts: list[int]) -> float:
        model = self.latency_model
        seconds = 0.0
        if chunks:
            seconds += model.prefill_time(chunks)
        if contexts:
            seconds += model.decode_time(contexts)
        if chunks and contexts:
            seconds -= min(model.prefill.a, model.decode.a)  # one step, one fixed overhead
        return max(seconds, 0.0)
