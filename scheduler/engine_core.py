"""EngineCore: the one step loop every mode runs, the simulator included.

    plan   = scheduler.schedule()          # StepPlan: what to compute, which layers, which KV moves
    result = executor.execute(plan)        # StepResult: sampled tokens, moves started/ended, step time
    update = scheduler.update(plan, result)
    -> EngineCoreOutputs (token ids, no text: detokenizing is the OutputProcessor's, in serving/)

With a pipelined executor (pipeline parallelism: `pipeline_depth` > 1, `submit` / `collect`), up to
that many plans are in flight: the next plan is scheduled and submitted while the stages still work on
the earlier ones, and results are taken oldest first. The scheduler needs nothing new for it: a
request's scheduled tokens count as computed once planned, so a decoding request is not planned again
until its token came back; a prompt's next chunk may be, and the stages keep the plans in order.

It is built from injected parts — a Scheduler (with its KV manager, policies and connector policy),
an Executor (the model runner, a TP group, or the latency-model executor that computes nothing) and a
Clock (real, or virtual for simulation) — and touches no tensors itself.
"""
from __future__ import annotations

import collections
import logging
import time
from dataclasses import dataclass
from typing import Any, Protocol

from scheduler.clock import Clock
from scheduler.errors import ExecutorDeadError
from scheduler.request import Request, RequestStatus
from scheduler.scheduler import Scheduler
from scheduler.step import StepPlan, StepResult
from scheduler.step_trace import StepTrace, classify

logger = logging.getLogger(__name__)


class Executor(Protocol):
    def execute(self, plan: StepPlan) -> StepResult:
        """Carry out one plan: start its KV moves, compute its tokens through its segments, sample,
        and report moves that started or ended. Raises only for a failed step (its requests fail; the
        loop goes on); every move it was given is still reported, in a later result."""


@dataclass(slots=True)
class EngineCoreOutput:
    """One increment of one request's output: token deltas, no text. The last one has finished=True."""
    request_id: str
    new_token_ids: list[int]
    new_logprobs: list[Any] | None = None  # opaque records from the executor's sampler
    finished: bool = False
    finish_reason: str | None = None  # "stop", "length", "abort", "error", "remote_decode"
    stop_reason: int | str | None = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0  # cumulative
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    error: str | None = None
    queue_time_s: float | None = None  # arrival -> first scheduled; on the first output only
    accepted: bool = False  # a remote prefill's blocks are reserved and ready to receive
    kv_transfer: str | None = None  # on the last output of a remote prefill: "transferred" or "recomputed: why"


@dataclass
class _TracedPlan:
    """A pipelined plan's trace entry until its result is in (scheduler/step_trace.py)."""
    chunks: list[int]
    contexts: list[int]
    started: float  # wall clock at submit
    alone: bool  # no other plan with tokens was in flight when it was submitted: its latency is its own
    engine_seconds: float | None = None  # the engine's own time for it, known once the next plan is submitted


class EngineCore:
    def __init__(self, scheduler: Scheduler, executor: Executor, clock: Clock | None = None,
                 trace: StepTrace | None = None) -> None:
        self.scheduler = scheduler
        self.trace = trace  # every computed step's shape and duration (scheduler/step_trace.py), or None
        self.executor = executor
        self.clock = clock or scheduler.clock
        self.last_step_idle = True  # the last step computed nothing (only moves to poll)
        self._awaiting_first_output: set[str] = set()
        self.num_steps = 0
        self.num_failed_steps = 0
        self.pipeline_depth = getattr(executor, "pipeline_depth", 1)
        scheduler.pipeline_depth = self.pipeline_depth
        self._in_flight: collections.deque[tuple[StepPlan, _TracedPlan | None]] = collections.deque()
        self.num_overlapped_plans = 0  # plans submitted while an earlier one (with tokens) was in flight
        # a traced pipeline's own time per plan: the latest submit (perf_counter, its trace entry), and
        # the seconds since then spent waiting for results or idle (not the engine's own work)
        self._last_submit: tuple[float, _TracedPlan | None] | None = None
        self._waited = 0.0
        self._idled = False

    # ---- requests ----
    def add_request(self, request: Request) -> None:
        """Raises what Scheduler.add_request raises (the request is then not added)."""
        self.scheduler.add_request(request)
        self._awaiting_first_output.add(request.request_id)

    def abort_requests(self, request_ids: list[str], status: RequestStatus = RequestStatus.FINISHED_ABORTED,
                       stop_reason: int | str | None = None, error: str | None = None) -> list[EngineCoreOutput]:
        finished = self.scheduler.finish_requests(request_ids, status, stop_reason, error)
        return [self._output(r, []) for r in finished]

    def set_first_token(self, request_id: str, token_id: int) -> None:
        self.scheduler.set_first_token(request_id, token_id)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # ---- stepping ----
    def step(self) -> list[EngineCoreOutput]:
        if self.pipeline_depth > 1 or self._in_flight:  # (plans still in flight are taken first, in order)
            return self._step_pipelined()
        plan = self.scheduler.schedule()
        self.last_step_idle = plan.is_empty
        self.num_steps += 1
        trace = self.trace if not plan.is_empty else None
        if trace is not None:
            chunks, contexts = classify(plan, self.scheduler.requests)
            started = time.time()
        try:
            result = self.executor.execute(plan)
        except ExecutorDeadError:  # no later step can run either: the engine must restart
            raise
        except Exception as e:  # a failed step fails its requests, not the engine
            return self._fail_step(plan, e)
        if trace is not None:
            trace.record(started, result.step_seconds, chunks, contexts)
        return self._apply(plan, result)

    def _step_pipelined(self) -> list[EngineCoreOutput]:
        """Fill the pipeline (stopping after a plan with nothing to compute), then take the oldest
        plan's result. Any failure of a pipelined executor is ExecutorDeadError: its stages are out of
        step, and the engine restarts."""
        while len(self._in_flight) < self.pipeline_depth:
            plan = self.scheduler.schedule()
            self.num_steps += 1
            overlapped = not plan.is_empty and any(not p.is_empty for p, _ in self._in_flight)
            traced = None
            if self.trace is not None:
                traced = _TracedPlan(*classify(plan, self.scheduler.requests), time.time(), alone=not overlapped)
                self._note_submit(traced if not plan.is_empty else None)
            spent = self.executor.submit(plan)  # stage 0 is computed on this thread: the submit takes that long
            if spent:
                self.clock.advance(spent)  # a real clock has seen it pass; a virtual one moves here
            self.num_overlapped_plans += overlapped
            self._in_flight.append((plan, traced if not plan.is_empty else None))
            if plan.is_empty:
                break
        plan, traced = self._in_flight.popleft()
        # nothing computed and nothing computing (an empty plan may stay in flight: the next fill takes it)
        self.last_step_idle = plan.is_empty and all(p.is_empty for p, _ in self._in_flight)
        waiting = time.perf_counter()
        result = self.executor.collect()
        self._waited += time.perf_counter() - waiting
        self._idled |= self.last_step_idle  # the engine loop may now wait for requests
        if traced is not None:
            hold = None  # the busiest stage's: the engine's own (stage 0's) or a later stage's step
            if traced.engine_seconds is not None:
                hold = max([traced.engine_seconds, *(result.stage_seconds or [])[1:]])
            # the plan's own way through the stages, without waiting behind other plans
            work = sum(result.stage_seconds) if result.stage_seconds else None
            self.trace.record(traced.started, result.step_seconds, traced.chunks, traced.contexts, hold=hold,
                              alone=traced.alone, work=work)
        return self._apply(plan, result)

    def _note_submit(self, traced: "_TracedPlan | None") -> None:
        """A plan is submitted: the one submitted before it held the engine (stage 0) from its own submit
        until now, less the waits for results in between (unknown if the engine went idle meanwhile)."""
        now = time.perf_counter()
        if self._last_submit is not None:
            submitted, previous = self._last_submit
            if previous is not None and not self._idled:
                previous.engine_seconds = now - submitted - self._waited
        self._last_submit, self._waited, self._idled = (now, traced), 0.0, False

    def _apply(self, plan: StepPlan, result: StepResult) -> list[EngineCoreOutput]:
        self.clock.advance(result.step_seconds)
        update = self.scheduler.update(plan, result)
        outputs = [self._output(r, [], accepted=True) for r in update.accepted if not r.is_finished]
        logprobs = result.logprobs
        output = self._output
        for request in update.updated:
            logprob = logprobs.get(request.request_id) if logprobs else None
            outputs.append(output(request, [request.output_token_ids[-1]], [logprob] if logprob else None))
        outputs.extend(self._output(r, []) for r in update.finished)
        return outputs

    def _fail_step(self, plan: StepPlan, error: Exception) -> list[EngineCoreOutput]:
        """The step's requests fail. Its moves are not touched: an executor reports every move it
        was given, started or not, through a later step's result (so no block is freed under a copy)."""
        logger.exception("step failed; failing its %d requests", len(plan.num_scheduled_tokens))
        self.num_failed_steps += 1
        message = f"internal error during the forward pass ({type(error).__name__})"
        return self.abort_requests(list(plan.num_scheduled_tokens), RequestStatus.FINISHED_ERROR, error=message)

    def _output(self, request: Request, new_token_ids: list[int], logprobs=None,
                accepted: bool = False) -> EngineCoreOutput:
        request_id = request.request_id
        finished = request.is_finished
        queue_time = None
        awaiting = self._awaiting_first_output
        if (new_token_ids or finished) and request_id in awaiting:
            awaiting.discard(request_id)
            if request.first_scheduled_time is not None and request.arrival_time is not None:
                queue_time = request.first_scheduled_time - request.arrival_time
        cached = request.num_cached_tokens
        if not finished:  # the common case (a decode token), with fewer lookups
            return EngineCoreOutput(request_id, new_token_ids, logprobs, False, None, None, request.num_prompt_tokens,
                                    len(request.output_token_ids), cached if cached > 0 else 0, None, queue_time,
                                    accepted, None)
        awaiting.discard(request_id)
        return EngineCoreOutput(
            request_id=request_id, new_token_ids=new_token_ids, new_logprobs=logprobs, finished=finished,
            finish_reason=request.status.finish_reason, stop_reason=request.stop_reason,
            num_prompt_tokens=request.num_prompt_tokens, num_output_tokens=len(request.output_token_ids),
            num_cached_tokens=max(0, cached), error=request.error,
            queue_time_s=queue_time, accepted=accepted, kv_transfer=request.kv_transfer)

    # ---- introspection ----
    def check_integrity(self) -> None:
        self.scheduler.check_integrity()
