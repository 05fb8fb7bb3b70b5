"""Ordering policies (FCFS, priority) and the prefill-shaping policy, through the scheduler."""
import pytest

from scheduler import SchedulerConfig
from scheduler.policies import VtcOrdering, make_ordering
from tests.scheduler.helpers import Runner, make_request, make_scheduler, run_to_completion, step


def test_fcfs_admits_in_arrival_order():
    sched = make_scheduler(max_num_seqs=1, budget=64)
    for rid, priority in (("a", 5), ("b", 0), ("c", 1)):
        sched.add_request(make_request(rid, prompt_len=4, max_tokens=1, priority=priority))
    order = []
    runner = Runner()
    while sched.has_unfinished():
        plan, _ = step(sched, runner)
        order += [n.request_id for n in plan.new_requests]
    assert order == ["a", "b", "c"]


def test_priority_admits_lower_values_first_then_by_arrival():
    sched = make_scheduler(max_num_seqs=1, budget=64, scheduling_policy="priority")
    for rid, priority in (("a", 5), ("b", 0), ("c", 1), ("d", 0)):
        sched.add_request(make_request(rid, prompt_len=4, max_tokens=1, priority=priority))
        sched.clock.advance(1.0)
    order = []
    runner = Runner()
    while sched.has_unfinished():
        plan, _ = step(sched, runner)
        order += [n.request_id for n in plan.new_requests]
    assert order == ["b", "d", "c", "a"]


def test_a_higher_priority_arrival_preempts_the_lowest_running_request():
    # room for two requests: "low" runs, "high" arrives and needs the room "low" holds
    sched = make_scheduler(num_blocks=5, block_size=4, budget=64, scheduling_policy="priority")
    sched.add_request(make_request("low", prompt_len=12, max_tokens=8, priority=10))
    runner = Runner()
    step(sched, runner)
    sched.add_request(make_request("high", prompt_len=12, max_tokens=8, priority=0, first=50))
    plan, _ = step(sched, runner)
    assert plan.preempted_request_ids == ["low"] and [n.request_id for n in plan.new_requests] == ["high"]
    outputs, _ = run_to_completion(sched, runner)
    assert outputs["low"] == [(13 + i) % 100 for i in range(8)]  # recomputed, same result
    assert sched.kv.pool.num_free_blocks == 5


def test_fcfs_never_preempts_for_a_waiting_request():
    sched = make_scheduler(num_blocks=5, block_size=4, budget=64)
    sched.add_request(make_request("first", prompt_len=12, max_tokens=8))
    runner = Runner()
    step(sched, runner)
    sched.add_request(make_request("second", prompt_len=12, max_tokens=8, first=50))
    plan, _ = step(sched, runner)
    assert not plan.preempted_request_ids and not plan.new_requests


def test_unknown_policies_say_what_to_choose():
    with pytest.raises(ValueError, match="--scheduling-policy must be one of fcfs, priority, vtc"):
        SchedulerConfig(scheduling_policy="lottery")
    assert isinstance(make_ordering(SchedulerConfig(scheduling_policy="vtc"), 256), VtcOrdering)
    with pytest.raises(ValueError, match="--scheduling-policy"):
        make_scheduler(scheduling_policy="lottery")
    with pytest.raises(ValueError, match="--preemption-mode"):
        make_scheduler(preemption_mode="teleport")


def test_chunking_off_runs_whole_prompts_or_refuses_them():
    from scheduler.scheduler import RequestTooLargeError
    sched = make_scheduler(budget=16, enable_chunked_prefill=False)
    with pytest.raises(RequestTooLargeError, match="chunked prefill off"):
        sched.add_request(make_request("big", prompt_len=20))
    sched.add_request(make_request("a", prompt_len=12, max_tokens=2))
    sched.add_request(make_request("b", prompt_len=12, max_tokens=2))
    plan, _ = step(sched, Runner())
    assert plan.num_scheduled_tokens == {"a": 12}  # b does not fit the rest of the budget whole


def test_a_victim_already_scheduled_in_the_step_is_taken_out_of_the_plan():
    # 5 blocks of 4: "low" (8 prompt tokens) runs first, "high" joins; at the third step "low" is
    # scheduled first, then "high" needs a third block: the victim is "low", scheduled already
    sched = make_scheduler(num_blocks=5, block_size=4, budget=64, scheduling_policy="priority")
    runner = Runner()
    sched.add_request(make_request("low", prompt_len=8, max_tokens=12, priority=9))
    step(sched, runner)
    sched.add_request(make_request("high", prompt_len=8, max_tokens=12, priority=0, first=50))
    step(sched, runner)
    plan, _ = step(sched, runner)
    assert plan.preempted_request_ids == ["low"]
    assert list(plan.num_scheduled_tokens) == ["high"] and [c.request_id for c in plan.cached_requests] == ["high"]
    assert sched.requests["low"].num_computed_tokens == 0  # recomputed from scratch, not from a phantom token
    outputs, _ = run_to_completion(sched, runner)
    assert outputs["low"] == [(8 + i) % 100 for i in range(1, 13)] and outputs["high"] == [(58 + i) % 100
                                                                                           for i in range(12)]
