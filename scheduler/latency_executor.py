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

With pipeline_depth > 1 (a plan of pp pipeline stages) it is a pipelined executor, as the runtime's
stage group is (serving/runner/tensor_parallel.py): `submit` / `collect`, up to pp plans in flight. The
latency model then gives a plan's latency through all the stages alone (what `pdserve profile
--pipeline-parallel-size` measures), and its `stage_model()` (profiled beside it) how long the plan
holds its busiest stage; every stage is taken to hold it that long (without a stage model: an equal
share of the latency). The plan moves on through the stages at an equal share of its latency each,
and a stage takes the next plan once it is done with the last: a hold shorter than the share leaves
the stage free while the plan is handed on; a longer one (an engine whose own work per plan, on stage
0, outlasts the plan's compute: an in-place fit sees that, `step_trace.fit_pipelined`) keeps the next
plan waiting without delaying this one. A plan's result (its sampled tokens and the moves' reports)
comes back when it leaves its last stage. So a lone plan costs the whole latency, and a full pipeline
delivers a plan per stage hold, each with the share of the running requests the scheduler gives it.
As in the runtime, whose engine thread computes stage 0 inside `submit`, a submit keeps the engine
until its plan has passed stage 0 (EngineCore advances its clock by that): the engine makes its next
plan then, with what arrived meanwhile, not at once. (Planning at once, ahead of the real engine, the
simulated one put fewer requests in each plan and stalled its pipeline behind big prefills: decode
43% too slow at 2 req/s on PP = 2, docs/benchmarks.md.)

Swaps (preemption by swapping) cost time when the latency model has a swap cost (`pdserve profile`
times the engine's swap worker) and the executor knows the bytes of one block on one rank: a plan's
copies run beside its forward pass, each layer's before that layer's attention (kv_connector/swap.py),
so a plan with swaps costs max(compute, copies + compute / layers). Without either, swaps are free.

KV moves end through a `MoveModel`, told when each move was planned and how long the step that
planned it lasts (a send streams its layers out while that step computes them); the default ends
each at once (started, active and finished in the step that issued it), which is what a colocated or
single-instance simulation needs. The simulator's transfer model (scheduler/simulator/transfer.py)
times them from link bandwidth instead.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Protocol

from scheduler.kv_moves import ACTIVE, FINISHED, STARTED, CancelKV, KVMove, MoveResult, SwapIn, SwapOut, spans
from scheduler.latency_model import LatencyModel
from scheduler.step import StepPlan, StepResult, is_decode_row


class MoveModel(Protocol):
    def start(self, move: KVMove, now: float, step_seconds: float) -> None:
        """A move was planned in a step that starts at virtual time `now` and lasts `step_seconds`."""

    def due(self, now: float) -> list[MoveResult]:
        """Results whose time has come by `now`."""


class InstantMoves:
    """Every move succeeds with the step that planned it (reported once that step's time is up: with
    plans in flight, not with an earlier plan's result)."""

    def __init__(self) -> None:
        self._due: list[tuple[float, MoveResult]] = []

    def start(self, move: KVMove, now: float, step_seconds: float) -> None:
        if isinstance(move, CancelKV):
            return  # its move has ended already
        at = now + step_seconds
        if move.kind == "recv":
            self._due += [(at, MoveResult(move.request_id, move.kind, STARTED)),
                          (at, MoveResult(move.request_id, move.kind, ACTIVE))]
        self._due.append((at, MoveResult(move.request_id, move.kind, FINISHED)))

    def due(self, now: float) -> list[MoveResult]:
        now += 1e-9  # (start + duration may round a hair past the step's end)
        ready = [result for at, result in self._due if at <= now]
        if len(ready) == len(self._due):
            self._due = []
        else:
            self._due = [(at, result) for at, result in self._due if at > now]
        return ready


@dataclass
class _State:
    num_tokens: int  # known tokens (prompt + outputs)
    num_computed_tokens: int


class LatencyModelExecutor:
    def __init__(self, latency_model: LatencyModel, token_id: int = 0, moves: MoveModel | None = None,
                 clock=None, pipeline_depth: int = 1, swap_block_bytes: int = 0, num_layers: int = 1) -> None:
        self.latency_model = latency_model
        self.token_id = token_id
        self.moves = moves or InstantMoves()
        self.clock = clock  # read for move timing only; the engine loop advances it
        self.states: dict[str, _State] = {}
        self.busy_seconds = 0.0  # a pipeline's: per stage (each is busy this long)
        self.pipeline_depth = pipeline_depth
        self._stage_free = [0.0] * pipeline_depth  # when each stage is done with the plans it was given
        self._in_flight: deque[tuple[StepResult, float]] = deque()  # (result, when its last stage ends)
        swap_cost = getattr(latency_model, "swap_cost", None)
        self._swap_cost = swap_cost() if swap_cost is not None and swap_block_bytes > 0 else None
        self._swap_block_bytes = swap_block_bytes  # one block on one rank (its heads, its stage's layers)
        self._num_layers = max(1, num_layers)  # a rank's: one copy per run and layer
        self.swap_seconds = 0.0  # modelled copy time of every swap
        stage_model = getattr(latency_model, "stage_model", None)
        self._stage_latency = stage_model() if pipeline_depth > 1 and stage_model is not None else None

    def execute(self, plan: StepPlan) -> StepResult:
        if self.pipeline_depth > 1:
            self.submit(plan)
            return self.collect()
        now = self._now()
        result = self._compute(plan)
        self.busy_seconds += result.step_seconds
        for move in plan.kv_moves:
            self.moves.start(move, now, result.step_seconds)
        result.moves = self.moves.due(now + result.step_seconds)
        return result

    def submit(self, plan: StepPlan) -> float:
        """The plan enters each stage when it has passed the stage before it (a share of its latency
        after entering it) and that stage is done with the plans before it (their holds). Returns how
        long the submit keeps its caller: until the plan has passed stage 0, which the engine's own
        thread computes in the runtime (serving/runner/tensor_parallel.py), so the engine makes its
        next plan only then; 0 for a plan with nothing to compute."""
        chunks, contexts = [], []
        result = self._compute(plan, chunks, contexts)
        share = result.step_seconds / self.pipeline_depth
        hold = (self._seconds(chunks, contexts, self._stage_latency)
                if self._stage_latency is not None and (chunks or contexts) else share)
        start = end = self._now()
        past_stage_0 = max(start, self._stage_free[0]) + share
        for stage, free in enumerate(self._stage_free):
            entered = max(end, free)
            self._stage_free[stage] = entered + hold
            end = entered + share
        self.busy_seconds += hold
        for move in plan.kv_moves:  # a send streams out while the stages compute the plan
            self.moves.start(move, start, end - start)
        self._in_flight.append((result, end))
        return past_stage_0 - start if (chunks or contexts) else 0.0

    def collect(self) -> StepResult:
        """The oldest plan's result; step_seconds is how long after now its last stage ends."""
        result, end = self._in_flight.popleft()
        result.step_seconds = max(0.0, end - self._now())
        result.moves = self.moves.due(end)
        return result

    def _now(self) -> float:
        return self.clock.now() if self.clock is not None else 0.0

    def _compute(self, plan: StepPlan, chunks: list[int] | None = None, contexts: list[int] | None = None) -> StepResult:
        """The plan's bookkeeping and modelled seconds (moves not started); fills chunks and contexts
        with its prefill chunk lengths and decode rows' contexts, as priced."""
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
        chunks = [] if chunks is None else chunks
        contexts = [] if contexts is None else contexts
        sampled = {}
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
        if self._swap_cost is not None and plan.kv_moves:
            seconds = self._with_swaps(plan, seconds)
        return StepResult(sampled_token_ids=sampled, step_seconds=seconds)

    def _with_swaps(self, plan: StepPlan, compute: float) -> float:
        num_blocks = num_runs = 0
        for move in plan.kv_moves:
            if isinstance(move, (SwapOut, SwapIn)):
                num_blocks += len(move.block_ids)
                src, dst = ((move.block_ids, move.host_block_ids) if isinstance(move, SwapOut)
                            else (move.host_block_ids, move.block_ids))
                num_runs += len(spans(list(zip(src, dst))))
        if not num_blocks:
            return compute
        copies = self._swap_cost.seconds(num_blocks, num_runs, self._swap_block_bytes, self._num_layers)
        self.swap_seconds += copies
        return max(compute, copies + compute / self._num_layers)

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

    def _seconds(self, chunks: list[int], contexts: list[int], model=None) -> float:
        model = model or self.latency_model
        seconds = 0.0
        if chunks:
            seconds += model.prefill_time(chunks)
        if contexts:
            seconds += model.decode_time(contexts)
        if chunks and contexts:
            seconds -= min(model.prefill.a, model.decode.a)  # one step, one fixed overhead
        return max(seconds, 0.0)
