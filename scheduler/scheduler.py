"""Continuous batching from injected policies.

Each step has a token budget (max_num_batched_tokens). Running requests are served first, in their
order: a decode takes one token, an unfinished prefill takes its next chunk (the prefill-shaping
policy decides how much). If the KV pool cannot hold a running request's new tokens, the ordering
policy names a victim (one already scheduled this step is taken out of the plan again, its tokens
given back to the budget) and the preemption policy takes its blocks back: dropped (recompute) or
copied to the host tier (swap; the request resumes with a SwapIn move and computes only what is new). Waiting requests are admitted
in the ordering policy's order, only in steps without preemption for blocks, while budget, the running
cap and free blocks last; before that, a waiting request the ordering policy ranks above a running one
may preempt it to make room. A new request's prompt may be served partly from the prefix cache.

The placement mode's connector policy (scheduler/connectors) sees every request on arrival and every
step, and decides the KV moves its mode needs; moves in flight are tracked here (`moves`), and a
finished request with moves in flight keeps its blocks ("held") until they end.

The scheduler advances `num_computed_tokens` when it schedules tokens (the executor computes them in
the same step) and appends sampled tokens when the step's result comes back.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Iterable

from kvcache.kv_manager import KVCacheManager
from scheduler.clock import Clock, MonotonicClock
from scheduler.config import SchedulerConfig
from scheduler.connectors import ConnectorPolicy, NullConnector
from scheduler.errors import NoKVSpaceError, RequestTooLargeError
from scheduler.kv_moves import FAILED, CancelKV, KVMove, MoveResult, MoveTracker
from scheduler.policies import (OrderingPolicy, PrefillShaping, PreemptionPolicy, make_ordering,
                                make_preemption, make_prefill_shaping)
from scheduler.request import Request, RequestStatus
from scheduler.step import CachedRequestData, NewRequestData, StepPlan, StepResult

logger = logging.getLogger(__name__)

__all__ = ["Scheduler", "RequestTooLargeError", "NoKVSpaceError", "SchedulerUpdate"]


@dataclass
class SchedulerUpdate:
    """What one step changed, for the engine's outputs."""
    updated: list[Request] = field(default_factory=list)  # received a token (may have finished with it)
    finished: list[Request] = field(default_factory=list)  # finished without a token (e.g. a failed move)
    accepted: list[Request] = field(default_factory=list)  # a remote prefill's blocks are ready to receive


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager, max_model_len: int,
                 connector: ConnectorPolicy | None = None, clock: Clock | None = None,
                 ordering: OrderingPolicy | None = None, prefill: PrefillShaping | None = None,
                 preemption: PreemptionPolicy | None = None) -> None:
        self.config = config
        self.kv = kv
        self.max_model_len = max_model_len
        self.clock = clock or MonotonicClock()
        self.ordering = ordering or make_ordering(config, max_model_len)
        self.prefill = prefill or make_prefill_shaping(config.enable_chunked_prefill)
        self.preemption = preemption or make_preemption(config.preemption_mode)
        self.connector = connector or NullConnector()
        self.requests: dict[str, Request] = {}  # every unfinished request, whatever its state
        self.waiting = self.ordering.make_queue()
        self.running: list[Request] = []
        self.moves = MoveTracker()
        self.held: dict[str, Request] = {}  # finished, blocks kept until their moves end
        self._due_moves: list[KVMove] = []  # for the next plan (cancellations)
        self._finished_ids: list[str] = []  # to tell the executor on the next step
        self._dropped_ids: list[str] = []  # preempted outside schedule() (a failed swap-in): likewise
        self._update = SchedulerUpdate()
        self.num_preemptions = 0
        # plans in flight at once (pipeline stages, set by EngineCore): each plan then takes at most
        # 1/depth of the running requests, so that the next plan has rows of its own to overlap with
        self.pipeline_depth = 1

    # ---- admission ----
    def check_admissible(self, request: Request) -> None:
        """Raise RequestTooLargeError if the request could never run; does not mutate."""
        num_prompt = request.num_prompt_tokens
        if num_prompt >= self.max_model_len:
            raise RequestTooLargeError(
                f"the prompt has {num_prompt} tokens but the model's context is {self.max_model_len} "
                f"tokens (--max-model-len), which must also leave room for at least one output token: "
                f"shorten the prompt")
        reason = self.prefill.check(request, self.config.max_num_batched_tokens)
        if reason:
            raise RequestTooLargeError(reason)
        need = self.kv.num_blocks_for(num_prompt + request.max_tokens)
        if need > self.kv.pool.num_blocks:
            raise RequestTooLargeError(
                f"the request needs {need} KV blocks for {num_prompt} prompt + {request.max_tokens} output "
                f"tokens but the pool has {self.kv.pool.num_blocks}: lower max_tokens or raise the KV "
                f"memory budget (--kv-cache-memory-bytes)")

    def add_request(self, request: Request) -> None:
        """Queue a request (or hand it to the connector policy). Raises RequestTooLargeError,
        NoKVSpaceError (a remote prefill found no room) or ValueError (a duplicate id)."""
        self.check_admissible(request)
        if request.request_id in self.requests or request.request_id in self.held:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        if request.arrival_time is None:
            request.arrival_time = self.clock.now()
        if not self.connector.admit(self, request):
            self.waiting.add(request)
        self.requests[request.request_id] = request

    def set_first_token(self, request_id: str, token_id: int) -> None:
        """The first output token of a request prefilled elsewhere."""
        self.connector.set_first_token(self, request_id, token_id, self.clock.now())

    def finish_requests(self, request_ids: Iterable[str], status: RequestStatus,
                        stop_reason: int | str | None = None, error: str | None = None) -> list[Request]:
        """Finish (abort, stop string hit, error) requests wherever they are. Unknown or finished ids
        are ignored. Returns the requests finished."""
        finished = []
        for request_id in request_ids:
            request = self.requests.get(request_id)
            if request is None:
                continue
            if stop_reason is not None:
                request.stop_reason = stop_reason
            self.finish(request, status, error)
            finished.append(request)
        return finished

    def has_unfinished(self) -> bool:
        return bool(self.requests or self.held or self._due_moves)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_swapped(self) -> int:
        """Waiting requests whose KV is in the host tier."""
        return sum(1 for r in self.waiting if r.status is RequestStatus.SWAPPED)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting) + self.connector.num_pending()

    # ---- for policies ----
    def enqueue_front(self, request: Request) -> None:
        """Queue a request ahead of its peers (it was preempted, or it holds its blocks already)."""
        self.waiting.prepend(request)

    def note_accepted(self, request: Request) -> None:
        self._update.accepted.append(request)

    def note_finished(self, request: Request) -> None:
        """A policy finished this request outside token processing: the engine reports it."""
        self._update.finished.append(request)

    def finish(self, request: Request, status: RequestStatus, error: str | None = None) -> None:
        """End a request wherever it is. Its blocks go back to the pool, unless moves are in flight:
        then it is held until they end, and (unless it is handing its KV off) they are cancelled."""
        if request in self.running:
            self.running.remove(request)
        else:
            self.waiting.remove(request)
        request.status = status
        request.error = error if error is not None else request.error
        del self.requests[request.request_id]
        self._finished_ids.append(request.request_id)
        self.connector.on_finish(self, request)
        if self.moves.in_flight(request.request_id):
            self.held[request.request_id] = request
            if status is not RequestStatus.FINISHED_REMOTE_DECODE:
                self._due_moves.append(CancelKV(request.request_id, f"the request finished ({status.value})"))
        else:
            if status in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH):
                # its KV to the host prefix cache (swap mode), copied before the next plan reuses a block
                self._due_moves.extend(self.preemption.offload(request, self.kv))
            self._release(request.request_id)

    def _release(self, request_id: str) -> None:
        """A request's blocks in both tiers go back."""
        self.kv.free(request_id)
        self.preemption.release(request_id)

    # ---- one step ----
    def schedule(self) -> StepPlan:
        now = self.clock.now()
        plan = StepPlan(finished_request_ids=self._finished_ids, kv_moves=self._due_moves,
                        preempted_request_ids=self._dropped_ids)
        self._finished_ids, self._due_moves, self._dropped_ids = [], [], []
        self.connector.before_schedule(self, plan, now)
        self._preempt_for_waiting(plan)
        budget, starved = self._schedule_running(plan, self.config.max_num_batched_tokens)
        if not starved:  # blocks ran out for running requests: admit nobody this step
            self._schedule_waiting(plan, budget, now)
        on_scheduled = self.ordering.on_scheduled
        for request_id, num_tokens in plan.num_scheduled_tokens.items():
            request = self.requests[request_id]
            on_scheduled(request, num_tokens)  # before the advance: the policy reads where the tokens start
            request.num_computed_tokens += num_tokens
        plan.segments = self.prefill.segments(plan)
        self.connector.after_schedule(self, plan, now)
        for move in plan.kv_moves:
            self.moves.issue(move)
        return plan

    def _preempt_for_waiting(self, plan: StepPlan) -> None:
        """Make room for the head of the queue by preempting running requests it outranks."""
        while self.waiting and self.running:
            head = self.waiting.peek()
            if self.kv.can_allocate(head.request_id, head.num_tokens) or not self._resumable(head):
                return
            victim = self.ordering.victim(self.running)
            if not self.ordering.outranks(head, victim):
                return
            self._preempt(victim, plan)

    def _schedule_running(self, plan: StepPlan, budget: int) -> tuple[int, bool]:
        """Returns the budget left and whether a running request had to be preempted for blocks."""
        starved = False
        i = 0
        running, kv, num_tokens_of = self.running, self.kv, self.prefill.num_tokens  # hot loop: bound once
        cached_requests, scheduled = plan.cached_requests, plan.num_scheduled_tokens
        max_rows = -(-len(running) // self.pipeline_depth) if self.pipeline_depth > 1 else len(running)
        while i < len(running) and budget > 0 and len(scheduled) < max_rows:
            request = running[i]
            computed = request.num_computed_tokens
            num_new = num_tokens_of(request.num_tokens - computed, budget)
            if num_new <= 0:
                i += 1
                continue
            request_id = request.request_id
            total = computed + num_new
            while not kv.can_allocate(request_id, total):
                victim = self.ordering.victim(running)
                if running.index(victim) < i:
                    i -= 1  # a request scheduled before this one: the list shifts under the index
                budget += self._preempt(victim, plan)
                starved = True
                if victim is request:
                    break
            if request.status is not RequestStatus.RUNNING:
                continue  # it preempted itself; running[i] is now the request after it
            cached_requests.append(CachedRequestData(request_id, kv.allocate(request_id, total), computed))
            scheduled[request_id] = num_new
            budget -= num_new
            i += 1
        return budget, starved

    def _schedule_waiting(self, plan: StepPlan, budget: int, now: float) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            request = self.waiting.peek()
            swapped = request.status is RequestStatus.SWAPPED  # its KV waits in the host tier
            if not self._resumable(request):
                break
            host_hits: list[int] = []
            if swapped or self.kv.block_ids(request.request_id):  # or blocks reserved already (a remote prefill)
                cached, num_computed = [], request.num_computed_tokens
            else:
                cached = self.kv.lookup_prefix(request.token_view)
                host_hits = self.preemption.prefix_hits(request, len(cached))  # past the device's hits
                num_computed = max(len(cached), len(host_hits)) * self.kv.block_size
            num_new = self.prefill.num_tokens(request.num_tokens - num_computed, budget)
            if num_new <= 0 or not self.kv.can_allocate(request.request_id, num_computed + num_new, cached):
                break
            self.waiting.pop()
            self.kv.allocate(request.request_id, num_computed + num_new, cached)
            if swapped:
                plan.kv_moves.extend(self.preemption.resume(request, self.kv.block_ids(request.request_id)))
            elif host_hits:
                plan.kv_moves.extend(self.preemption.bring_in(request, host_hits, len(cached),
                                                              self.kv.block_ids(request.request_id)))
            if request.num_cached_tokens < 0:
                request.num_cached_tokens = 0 if request.remote_prefill else num_computed
                if not request.remote_prefill:
                    self.kv.record_prefix_lookup(request.num_prompt_tokens, num_computed)
                request.first_scheduled_time = now
            request.num_computed_tokens = num_computed
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            plan.new_requests.append(NewRequestData(
                request.request_id, request.all_token_ids, request.num_prompt_tokens,
                request.sampling_params, list(self.kv.block_ids(request.request_id)), num_computed))
            plan.num_scheduled_tokens[request.request_id] = num_new
            budget -= num_new

    def _resumable(self, request: Request) -> bool:
        """Not while its swap-out is in a plan still in flight (pipeline stages report a plan's moves
        a plan or more late): a failed copy must be known before the request resumes from it."""
        return request.status is not RequestStatus.SWAPPED or not self.moves.has(request.request_id, "swap_out")

    def _preempt(self, request: Request, plan: StepPlan) -> int:
        """Preempt a running request; returns the tokens it had scheduled in this plan (now unscheduled)."""
        request_id = request.request_id
        self.running.remove(request)
        unscheduled = plan.num_scheduled_tokens.pop(request_id, 0)
        if unscheduled:
            plan.cached_requests[:] = [c for c in plan.cached_requests if c.request_id != request_id]
        plan.kv_moves.extend(self.preemption.preempt(request, self.kv))
        self.waiting.prepend(request)
        request.num_preemptions += 1
        self.num_preemptions += 1
        plan.preempted_request_ids.append(request_id)
        return unscheduled

    # ---- results ----
    def update(self, plan: StepPlan, result: StepResult) -> SchedulerUpdate:
        """Append sampled tokens, publish newly full blocks to the prefix cache, finish requests that
        hit a stop condition, then apply the moves' results (a send acknowledged within the step of
        its prefill ends the hold taken just now)."""
        now = self.clock.now()
        lost = self._on_failed_swaps(result.moves) if self.preemption.name == "swap" else ()
        requests, sampled, updated = self.requests, result.sampled_token_ids, self._update.updated
        caching = self.kv.pool.enable_prefix_caching
        for request_id in plan.num_scheduled_tokens:
            request = requests.get(request_id)
            if request is None or request_id in lost:
                continue  # finished while the step ran, or computed over KV a failed swap-in never brought
            if caching:
                self.kv.cache_blocks(request_id, request.token_view, request.num_computed_tokens)
            token_id = sampled.get(request_id)
            if token_id is None:
                continue  # a prompt chunk that did not reach the end of the prompt
            request.output_token_ids.append(token_id)
            updated.append(request)
            status = self._check_stop(request, token_id) or self.connector.finish_status(request)
            if status is not None:
                self.finish(request, status)
        for move_result in result.moves:
            self._on_move(move_result, now)
        update, self._update = self._update, SchedulerUpdate()
        return update

    def _on_move(self, result, now: float) -> None:
        if result.kind in ("swap_out", "swap_in") and result.state != FAILED:
            self.preemption.on_move(result)  # (failed ones went by _on_failed_swaps; offloads are untracked)
        if result.ended and self.moves.end(result) is None:
            return  # reported twice (a cancel raced a completion), or untracked: the first report counted
        self.connector.on_move(self, result, now)
        held = self.held.get(result.request_id)
        if held is not None and not self.moves.in_flight(result.request_id):
            del self.held[result.request_id]
            self._release(result.request_id)

    def _on_failed_swaps(self, results: list[MoveResult]) -> set[str]:
        """A failed swap lost the request's KV: it is recomputed from its tokens (nothing the client
        sees changes). Returns the requests whose KV this step's forward pass did not have (a failed
        swap-in): their sampled tokens are dropped."""
        lost: set[str] = set()
        for result in results:
            if result.state != FAILED or result.kind not in ("swap_out", "swap_in"):
                continue
            self.preemption.on_move(result)  # its host blocks are evicted: they hold nothing to serve
            request = self.requests.get(result.request_id)
            if request is None:
                continue
            logger.warning("request %s: KV %s failed (%s); recomputing it", request.request_id,
                           result.kind.replace("_", "-"), result.reason)
            if request in self.running:  # resumed: its forward pass read blocks the swap-in did not fill
                lost.add(request.request_id)
                self.running.remove(request)
                self.waiting.prepend(request)
                self._dropped_ids.append(request.request_id)
            self._release(request.request_id)
            request.num_computed_tokens = 0
            request.status = RequestStatus.PREEMPTED
        return lost

    def _check_stop(self, request: Request, token_id: int) -> RequestStatus | None:
        params = request.sampling_params
        num_output = len(request.output_token_ids)
        if num_output >= params.min_tokens:
            if token_id in params.stop_token_ids:
                request.stop_reason = token_id
                return RequestStatus.FINISHED_STOPPED
            if not params.ignore_eos and token_id in request.eos_token_ids:
                return RequestStatus.FINISHED_STOPPED
        if num_output >= request.max_tokens or request.num_tokens >= self.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None

    # ---- introspection ----
    def check_integrity(self) -> None:
        """The pool's invariants, and every block owner known (live or held)."""
        self.kv.check_integrity()
        owners = set(self.requests) | set(self.held)
        unknown = set(self.kv.request_ids) - owners
        assert not unknown, f"blocks held by unknown requests {sorted(unknown)[:5]}"
        host = getattr(self.preemption, "host", None)
        if host is not None:
            host.check_integrity()  # (finished requests' offloads are untracked: their tables are released)
            unknown = set(host.request_ids) - owners
            assert not unknown, f"host blocks held by unknown requests {sorted(unknown)[:5]}"
        assert set(self.moves.request_ids) <= owners, "a move in flight for an unknown request"
