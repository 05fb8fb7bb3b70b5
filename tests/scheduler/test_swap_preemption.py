"""SwapPreemption through the scheduler: victims keep their computed tokens in the host tier, resume
with a SwapIn into fresh device blocks, fall back to recompute when the host tier is full or a copy
fails; both tiers balance at the end."""
from kvcache.host_tier import HostTier
from scheduler.kv_moves import FAILED, FINISHED, MoveResult, SwapIn, SwapOut
from scheduler.policies import SwapPreemption
from scheduler.request import RequestStatus
from tests.scheduler.helpers import Runner, make_request, make_scheduler, run_to_completion


class SwapRunner(Runner):
    """Ends every swap move in the step that carries it, as the runtime's swap worker does; `fail`
    names (request, kind) pairs to report failed once."""

    def __init__(self, fail=()):
        super().__init__()
        self.fail = set(fail)

    def execute(self, plan):
        for move in plan.kv_moves:
            if isinstance(move, (SwapOut, SwapIn)):
                failed = (move.request_id, move.kind) in self.fail
                self.fail.discard((move.request_id, move.kind))
                self.results.append(MoveResult(move.request_id, move.kind, FAILED if failed else FINISHED,
                                               "injected" if failed else ""))
        return super().execute(plan)


def _swapping_scheduler(num_blocks=10, host_blocks=64):
    host = HostTier(host_blocks, 4, enable_prefix_caching=False)
    return make_scheduler(num_blocks=num_blocks, block_size=4, budget=64, preemption_mode="swap",
                          preemption=SwapPreemption(host)), host


def _expected(prompt_len, first, max_tokens):
    return [(first + prompt_len - 1 + i) % 100 for i in range(1, max_tokens + 1)]


def test_a_victim_resumes_from_the_host_tier_without_recomputing():
    sched, host = _swapping_scheduler()
    runner = SwapRunner()
    for rid, first in (("a", 1), ("b", 30), ("c", 60)):
        sched.add_request(make_request(rid, prompt_len=10, max_tokens=14, first=first))
    swapped, resumed = {}, {}

    def watch(_):
        for move in runner.moves:
            if isinstance(move, SwapOut) and move.request_id not in swapped:
                swapped[move.request_id] = (len(move.block_ids), move.host_block_ids)
            if isinstance(move, SwapIn) and move.request_id not in resumed:
                resumed[move.request_id] = move
    outputs, _ = run_to_completion(sched, runner, on_step=watch)
    assert swapped and set(resumed) == set(swapped)
    for rid, (num_blocks, host_blocks) in swapped.items():
        assert resumed[rid].host_block_ids == host_blocks and len(resumed[rid].block_ids) == num_blocks
    # resumed requests continued from their computed tokens: the runner saw no recompute
    assert sum(1 for m in runner.moves if isinstance(m, SwapOut)) == sched.preemption.num_swapped_out
    assert sched.preemption.num_recomputed == 0
    assert outputs == {rid: _expected(10, first, 14) for rid, first in (("a", 1), ("b", 30), ("c", 60))}
    assert host.pool.num_free_blocks == host.pool.num_blocks and sched.kv.pool.num_free_blocks == 10


def test_a_full_host_tier_recomputes_the_victim():
    sched, host = _swapping_scheduler(host_blocks=1)  # no victim fits in one host block
    runner = SwapRunner()
    for rid, first in (("a", 1), ("b", 30), ("c", 60)):
        sched.add_request(make_request(rid, prompt_len=10, max_tokens=14, first=first))
    outputs, _ = run_to_completion(sched, runner)
    assert sched.num_preemptions > 0 and sched.preemption.num_recomputed == sched.num_preemptions
    assert not any(isinstance(m, SwapOut) for m in runner.moves)
    assert outputs == {rid: _expected(10, first, 14) for rid, first in (("a", 1), ("b", 30), ("c", 60))}


def test_failed_swaps_recompute_their_requests_and_drop_what_they_computed():
    sched, host = _swapping_scheduler()
    runner = SwapRunner(fail={("b", "swap_out"), ("c", "swap_in")})
    for rid, first in (("a", 1), ("b", 30), ("c", 60)):
        sched.add_request(make_request(rid, prompt_len=10, max_tokens=14, first=first))
    outputs, _ = run_to_completion(sched, runner)
    assert sched.preemption.num_failed == 2 and not runner.fail  # both injected failures happened
    assert outputs == {rid: _expected(10, first, 14) for rid, first in (("a", 1), ("b", 30), ("c", 60))}
    assert host.pool.num_free_blocks == host.pool.num_blocks and sched.kv.pool.num_free_blocks == 10


def test_aborting_a_swapped_request_frees_its_host_blocks():
    sched, host = _swapping_scheduler()
    runner = SwapRunner()
    for rid, first in (("a", 1), ("b", 30), ("c", 60)):
        sched.add_request(make_request(rid, prompt_len=10, max_tokens=14, first=first))
    for _ in range(50):
        plan = sched.schedule()
        sched.update(plan, runner.execute(plan))
        swapped = [r for r in sched.waiting if r.status is RequestStatus.SWAPPED]
        if swapped:
            break
    assert swapped and host.request_ids == [swapped[0].request_id]
    sched.finish_requests([swapped[0].request_id], RequestStatus.FINISHED_ABORTED)
    assert not host.request_ids
    run_to_completion(sched, runner)
    assert host.pool.num_free_blocks == host.pool.num_blocks and sched.kv.pool.num_free_blocks == 10
