"""SwapPreemption through the scheduler: victims keep their computed tokens in the host tier, resume
with a SwapIn into fresh device blocks, fall back to recompute when the host tier is full or a copy
fails; both tiers balance at the end."""
from collections import deque

import pytest

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


def _run_pipelined(sched, runner, depth=2, max_steps=10_000):
    """EngineCore's batch queue (pipeline stages): up to `depth` plans planned before the oldest one's
    result, moves' reports included, comes back. Checks that no plan resumes a request from a host
    copy whose swap-out was not reported yet (a failed copy must be known first)."""
    sched.pipeline_depth = depth
    in_flight, outputs, unreported = deque(), {}, {}
    for _ in range(max_steps):
        while len(in_flight) < depth and sched.has_unfinished():
            plan = sched.schedule()
            for move in plan.kv_moves:
                if isinstance(move, SwapIn):
                    assert not unreported.get(move.request_id), f"{move.request_id} resumed before its swap-out ended"
                elif isinstance(move, SwapOut):
                    unreported[move.request_id] = unreported.get(move.request_id, 0) + 1
            in_flight.append((plan, runner.execute(plan)))
        if not in_flight:
            return outputs
        plan, result = in_flight.popleft()
        for req in sched.update(plan, result).updated:
            outputs[req.request_id] = list(req.output_token_ids)
        for move in plan.kv_moves:
            if isinstance(move, SwapOut):
                unreported[move.request_id] -= 1
        sched.check_integrity()
    raise AssertionError("did not finish")


# (request, first token, output tokens): short ones end while plans that preempted others are in flight,
# so a victim could be resumed at once (12 blocks of 4 tokens)
REQUESTS = [("r0", 1, 2), ("r1", 8, 20), ("r2", 15, 3), ("r3", 22, 20), ("r4", 29, 2), ("r5", 36, 20)]


def _pipelined(depth, fail=()):
    sched, host = _swapping_scheduler(num_blocks=12)
    runner = SwapRunner(fail=fail)
    for rid, first, max_tokens in REQUESTS:
        sched.add_request(make_request(rid, prompt_len=10, max_tokens=max_tokens, first=first))
    return sched, host, runner


@pytest.mark.parametrize("failing", [False, True], ids=["ok", "swap-outs-fail"])
@pytest.mark.parametrize("depth", [2, 3])
def test_swapping_with_plans_in_flight_waits_for_each_swap_out_report(depth, failing):
    """Pipeline stages report a plan's moves with its result, a plan or more late: a swapped request
    is not resumed before its swap-out is reported (a failed copy is recomputed, never read), and
    outputs and both pools come out whole."""
    sched, host, runner = _pipelined(depth, fail={(r[0], "swap_out") for r in REQUESTS} if failing else ())
    outputs = _run_pipelined(sched, runner, depth)
    assert sched.preemption.num_swapped_out >= 2
    victims = {m.request_id for m in runner.moves if isinstance(m, SwapOut)}
    assert sched.preemption.num_failed == (len(victims) if failing else 0)  # each victim's first one fails
    assert outputs == {rid: _expected(10, first, n) for rid, first, n in REQUESTS}
    assert host.pool.num_free_blocks == host.pool.num_blocks and sched.kv.pool.num_free_blocks == 12


def test_a_swap_in_reported_after_the_request_was_swapped_out_again_leaves_no_kept_copy():
    """Plans in flight: A's swap-in (plan N) is reported after plan N + 1 swapped A out again. Its host
    table is then A's only copy: not a kept copy, which a later swap-out could give up."""
    host = HostTier(8, 4, enable_prefix_caching=False)
    tokens = list(range(12))
    host.reserve("a", tokens, 8)  # swapped out: 2 blocks
    host.resuming("a")  # plan N: swap-in
    first, blocks = host.reserve("a", tokens, 12)  # plan N + 1: swapped out again, before N's report
    assert first == 2 and len(blocks) == 3  # only the new block is copied
    host.swapped_in("a")  # N's report
    assert "a" not in host.kept
    host.check_integrity()
    assert host.reserve("b", list(range(50, 70)), 20) is not None  # room without touching a's copy
    assert host.reserve("c", list(range(80, 92)), 12) is None  # a's copy is never given up for it
    assert host.block_ids("a") == blocks
    host.resuming("a")
    host.swapped_in("a")  # now a running request's copy: kept, and given up for room
    assert "a" in host.kept
    assert host.reserve("c", list(range(80, 92)), 12) is not None and not host.block_ids("a")
