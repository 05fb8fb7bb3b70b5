"""Stand-ins for the scheduler tests: an executor that computes nothing real (token = last + 1) and
reports whatever move results the test hands it, plus builders."""
from __future__ import annotations

from kvcache.block_pool import BlockPool
from kvcache.kv_manager import KVCacheManager
from scheduler import Request, SamplingParams, Scheduler, SchedulerConfig, StepResult, VirtualClock
from scheduler.kv_moves import MoveResult


def make_scheduler(num_blocks=64, block_size=4, max_num_seqs=8, budget=32, max_model_len=256,
                   prefix_caching=True, connector=None, clock=None, preemption=None, **config) -> Scheduler:
    kv = KVCacheManager(BlockPool(num_blocks, prefix_caching), block_size)
    return Scheduler(SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=budget, **config), kv,
                     max_model_len, connector=connector, clock=clock or VirtualClock(), preemption=preemption)


def make_request(rid, prompt_len=10, max_tokens=5, first=1, priority=0, **kwargs) -> Request:
    params = {k: kwargs.pop(k) for k in list(kwargs) if k in SamplingParams.__dataclass_fields__}
    return Request(rid, [(first + i) % 100 for i in range(prompt_len)],
                   SamplingParams(max_tokens=max_tokens, **params), eos_token_ids=(999,), priority=priority,
                   **kwargs)


class Runner:
    """Tracks what a model runner would hold, checks each plan against it, and reports the move
    results queued in `results` (and the moves it was given in `moves`)."""

    def __init__(self):
        self.tokens: dict[str, list[int]] = {}
        self.computed: dict[str, int] = {}
        self.moves = []
        self.results: list[MoveResult] = []

    def execute(self, plan):
        self.moves += plan.kv_moves
        for rid in plan.finished_request_ids + plan.preempted_request_ids:
            self.tokens.pop(rid, None)
        for new in plan.new_requests:
            self.tokens[new.request_id] = list(new.token_ids)
            self.computed[new.request_id] = new.num_computed_tokens
        for delta in plan.cached_requests:
            assert self.computed[delta.request_id] == delta.num_computed_tokens
            self.tokens[delta.request_id] += delta.new_token_ids
        result = StepResult(moves=self.results)
        self.results = []
        for rid, n in plan.num_scheduled_tokens.items():
            self.computed[rid] += n
            if self.computed[rid] >= len(self.tokens[rid]):
                token = (self.tokens[rid][-1] + 1) % 100
                self.tokens[rid].append(token)
                result.sampled_token_ids[rid] = token
        return result


def step(sched, runner):
    plan = sched.schedule()
    return plan, sched.update(plan, runner.execute(plan))


def run_to_completion(sched, runner=None, max_steps=10_000, on_step=None):
    runner = runner or Runner()
    outputs: dict[str, list[int]] = {}
    steps = 0
    while sched.has_unfinished():
        plan = sched.schedule()
        assert plan.total_num_scheduled_tokens <= sched.config.max_num_batched_tokens
        assert len(sched.running) <= sched.config.max_num_seqs
        for req in sched.update(plan, runner.execute(plan)).updated:
            outputs[req.request_id] = list(req.output_token_ids)
        sched.check_integrity()
        steps += 1
        if on_step:
            on_step(steps)
        assert steps < max_steps
    return outputs, steps
