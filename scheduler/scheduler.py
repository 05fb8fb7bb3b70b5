"""Continuous batching with chunked prefill, a running-request cap and preemption.

Each step has a token budget (max_num_batched_tokens). Running requests are served first, in priority
order: a decode takes one token, an unfinished prefill takes the next chunk of its prompt. If the KV
pool cannot hold a running request's new tokens, the lowest-priority running request is preempted
(the preemption policy decides how: recompute today; swapping plugs in behind the same interface).
Waiting requests are admitted only in steps without preemption, while budget, the running cap and
free blocks last; a new request's prompt may be served partly from the prefix cache.

The scheduler advances `num_computed_tokens` when it schedules tokens (the runner computes them in the
same step) and appends sampled tokens when the runner's result comes back.
"""
from __future__ import annotations

import time
from collections import deque
from typing import Iterable

from kvcache.kv_manager import KVCacheManager
from scheduler.config import SchedulerConfig
from scheduler.policies import FcfsPriority, PreemptionPolicy, RecomputePreemption
from scheduler.request import Request, RequestStatus
from scheduler.step import CachedRequestData, KVSend, NewRequestData, StepPlan, StepResult


class RequestTooLargeError(ValueError):
    """The request can never be scheduled with this configuration."""


class NoKVSpaceError(RuntimeError):
    """No free blocks to receive a remote prefill's KV right now (backpressure): try later or elsewhere."""


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager, max_model_len: int,
                 preemption: PreemptionPolicy | None = None) -> None:
        self.config = config
        self.kv = kv
        self.max_model_len = max_model_len
        self.priority = FcfsPriority()
        self.preemption = preemption or RecomputePreemption()
        self.requests: dict[str, Request] = {}
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self._finished_ids: list[str] = []  # to tell the runner on the next step
        self.num_preemptions = 0
        # disaggregation: decode-side requests whose prompt KV is on its way (blocks reserved), and
        # prefill-side finished requests whose blocks are leased until the peer acknowledges the KV
        self.remote_waiting: dict[str, Request] = {}
        self.leased: set[str] = set()

    # ---- admission ----
    def check_admissible(self, request: Request) -> None:
        """Raise RequestTooLargeError if the request could never run; does not mutate."""
        num_prompt = request.num_prompt_tokens
        if num_prompt >= self.max_model_len:
            raise RequestTooLargeError(
                f"the prompt has {num_prompt} tokens but the model's context is {self.max_model_len} "
                f"tokens (--max-model-len), which must also leave room for at least one output token: "
                f"shorten the prompt")
        if not self.config.enable_chunked_prefill and num_prompt > self.config.max_num_batched_tokens:
            raise RequestTooLargeError(
                f"the prompt has {num_prompt} tokens, more than --max-num-batched-tokens "
                f"({self.config.max_num_batched_tokens}) with chunked prefill off")
        need = self.kv.num_blocks_for(num_prompt + request.max_tokens)
        if need > self.kv.pool.num_blocks:
            raise RequestTooLargeError(
                f"the request needs {need} KV blocks for {num_prompt} prompt + {request.max_tokens} output "
                f"tokens but the pool has {self.kv.pool.num_blocks}: lower max_tokens or raise the KV "
                f"memory budget (--kv-cache-memory-bytes)")

    def add_request(self, request: Request) -> None:
        self.check_admissible(request)
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        if request.remote_prefill:
            self._reserve_remote(request)
        else:
            self.waiting.append(request)
        self.requests[request.request_id] = request

    def _reserve_remote(self, request: Request) -> None:
        # room for the prompt and the first token (sampled by the prefill instance)
        num_tokens = request.num_prompt_tokens + 1
        if not self.kv.can_allocate(request.request_id, num_tokens):
            raise NoKVSpaceError(f"no free KV blocks for {num_tokens} tokens on this decode instance")
        self.kv.allocate(request.request_id, num_tokens)
        request.status = RequestStatus.WAITING_FOR_REMOTE_KV
        self.remote_waiting[request.request_id] = request

    def remote_kv_done(self, request_id: str, ok: bool) -> None:
        """The remote prefill's KV arrived (ok) or will not (then the prompt is recomputed here)."""
        request = self.remote_waiting.get(request_id)
        if request is None:
            return
        request.remote_kv_ready = True
        request.num_computed_tokens = request.num_prompt_tokens if ok else 0
        self._promote_remote(request)

    def set_first_token(self, request_id: str, token_id: int) -> None:
        """The first output token, sampled by the prefill instance."""
        request = self.remote_waiting.get(request_id)
        if request is None or request.output_token_ids:
            return
        request.output_token_ids.append(token_id)
        self._promote_remote(request)

    def _promote_remote(self, request: Request) -> None:
        if request.remote_kv_ready and request.output_token_ids:
            del self.remote_waiting[request.request_id]
            request.status = RequestStatus.WAITING
            self.waiting.appendleft(request)  # it holds blocks already: use them first

    def finish_requests(self, request_ids: Iterable[str], status: RequestStatus,
                        stop_reason: int | str | None = None) -> list[Request]:
        """Finish (abort, stop string hit, error) requests wherever they are; frees their blocks.
        Unknown or already finished ids are ignored. Returns the requests finished."""
        finished = []
        for request_id in request_ids:
            request = self.requests.get(request_id)
            if request is None:
                continue
            if request in self.running:
                self.running.remove(request)
            elif request in self.waiting:
                self.waiting.remove(request)
            self.remote_waiting.pop(request_id, None)
            request.stop_reason = stop_reason if stop_reason is not None else request.stop_reason
            self._finish(request, status)
            finished.append(request)
        return finished

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running or self.remote_waiting or self.leased)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    # ---- one step ----
    def schedule(self) -> StepPlan:
        plan = StepPlan(finished_request_ids=self._finished_ids)
        self._finished_ids = []
        budget = self.config.max_num_batched_tokens
        budget = self._schedule_running(plan, budget)
        if not plan.preempted_request_ids:
            self._schedule_waiting(plan, budget)
        for request_id, num_tokens in plan.num_scheduled_tokens.items():
            request = self.requests[request_id]
            request.num_computed_tokens += num_tokens
            if request.kv_peer and request.num_computed_tokens >= request.num_prompt_tokens:
                plan.kv_sends.append(KVSend(request_id, list(self.kv.block_ids(request_id)),
                                            request.num_prompt_tokens, request.kv_peer))
        return plan

    def _schedule_running(self, plan: StepPlan, budget: int) -> int:
        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            num_new = min(request.num_tokens - request.num_computed_tokens, budget)
            if num_new <= 0:
                i += 1
                continue
            total = request.num_computed_tokens + num_new
            while not self.kv.can_allocate(request.request_id, total):
                victim = self.priority.lowest(self.running)
                self._preempt(victim, plan)
                if victim is request:
                    break
            if request.status != RequestStatus.RUNNING:
                break  # it preempted itself: nothing below it is left to schedule
            new_block_ids = self.kv.allocate(request.request_id, total)
            plan.cached_requests.append(
                CachedRequestData(request.request_id, new_block_ids, request.num_computed_tokens))
            plan.num_scheduled_tokens[request.request_id] = num_new
            budget -= num_new
            i += 1
        return budget

    def _schedule_waiting(self, plan: StepPlan, budget: int) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            request = self.waiting[0]
            if self.kv.block_ids(request.request_id):  # a remote prefill: its blocks are reserved
                cached, num_computed = [], request.num_computed_tokens
            else:
                cached = self.kv.lookup_prefix(request.token_view)
                num_computed = len(cached) * self.kv.block_size
            num_new = request.num_tokens - num_computed
            if not self.config.enable_chunked_prefill and num_new > budget:
                break
            num_new = min(num_new, budget)
            if not self.kv.can_allocate(request.request_id, num_computed + num_new, cached):
                break
            self.waiting.popleft()
            self.kv.allocate(request.request_id, num_computed + num_new, cached)
            if request.num_cached_tokens < 0:
                request.num_cached_tokens = 0 if request.remote_prefill else num_computed
                if not request.remote_prefill:
                    self.kv.record_prefix_lookup(request.num_prompt_tokens, num_computed)
                request.first_scheduled_time = time.monotonic()
            request.num_computed_tokens = num_computed
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            plan.new_requests.append(NewRequestData(
                request.request_id, request.all_token_ids, request.num_prompt_tokens,
                request.sampling_params, list(self.kv.block_ids(request.request_id)), num_computed))
            plan.num_scheduled_tokens[request.request_id] = num_new
            budget -= num_new

    def _preempt(self, request: Request, plan: StepPlan) -> None:
        self.running.remove(request)
        self.preemption.preempt(request, self.kv)
        self.waiting.appendleft(request)
        request.num_preemptions += 1
        self.num_preemptions += 1
        plan.preempted_request_ids.append(request.request_id)

    # ---- results ----
    def update_from_result(self, plan: StepPlan, result: StepResult) -> list[Request]:
        """Append sampled tokens, publish newly full blocks to the prefix cache and finish requests
        that hit a stop condition. Returns the requests that received a token this step."""
        for request_id in result.finished_recving:
            self.remote_kv_done(request_id, ok=True)
        for request_id in result.failed_recving:
            self.remote_kv_done(request_id, ok=False)
        updated = []
        for request_id in plan.num_scheduled_tokens:
            request = self.requests.get(request_id)
            if request is None or request.is_finished:
                continue  # aborted while the step ran
            self.kv.cache_blocks(request_id, request.token_view, request.num_computed_tokens)
            token_id = result.sampled_token_ids.get(request_id)
            if token_id is None:
                continue  # a prompt chunk that did not reach the end of the prompt
            request.output_token_ids.append(token_id)
            status = self._check_stop(request, token_id)
            if status is None and request.kv_peer:
                status = RequestStatus.FINISHED_REMOTE_DECODE  # decoding continues on the peer
            if status is not None:
                self.running.remove(request)
                self._finish(request, status)
            updated.append(request)
        # after finishing: a send acknowledged within the step of its prefill ends a lease taken just now
        for request_id in result.finished_sending + result.failed_sending:
            if request_id in self.leased:  # the peer has the KV (or never will): drop the lease
                self.leased.discard(request_id)
                self.kv.free(request_id)
        return updated

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

    def _finish(self, request: Request, status: RequestStatus) -> None:
        request.status = status
        if request.kv_peer and request.num_computed_tokens >= request.num_prompt_tokens:
            self.leased.add(request.request_id)  # its KV is being sent: free on the peer's ack
        else:
            self.kv.free(request.request_id)
        del self.requests[request.request_id]
        self._finished_ids.append(request.request_id)
