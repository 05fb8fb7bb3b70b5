"""Scheduler policy tests with a runner stand-in that samples token = (last token + 1) % 100."""
import random

import pytest

from scheduler import Request, RequestStatus, SamplingParams
from scheduler.scheduler import RequestTooLargeError
from tests.scheduler.helpers import Runner, make_request, make_scheduler, run_to_completion


def test_chunked_prefill_respects_budget_and_completes():
    sched = make_scheduler(budget=16)
    sched.add_request(make_request("long", prompt_len=50, max_tokens=3))
    chunks = []
    runner = Runner()
    sched.schedule = _recording(sched.schedule, chunks)
    outputs, _ = run_to_completion(sched, runner)
    assert [c.get("long") for c in chunks] == [16, 16, 16, 2, 1, 1]
    # the stand-in continues the counting sequence: output = prompt's last token + 1, ...
    assert outputs["long"] == [51, 52, 53]
    assert sched.kv.pool.num_free_blocks == sched.kv.pool.num_blocks


def _recording(schedule, sink):
    def wrapped():
        plan = schedule()
        sink.append(dict(plan.num_scheduled_tokens))
        return plan
    return wrapped


def test_decode_and_prefill_share_a_step():
    sched = make_scheduler(budget=8)
    sched.add_request(make_request("a", prompt_len=4, max_tokens=10))
    runner = Runner()
    sched.update(plan := sched.schedule(), runner.execute(plan))
    sched.add_request(make_request("b", prompt_len=20, max_tokens=2))
    plan = sched.schedule()
    assert plan.num_scheduled_tokens == {"a": 1, "b": 7}


def test_max_num_seqs_caps_running():
    sched = make_scheduler(max_num_seqs=2, budget=64)
    for i in range(5):
        sched.add_request(make_request(f"r{i}", prompt_len=4, max_tokens=3))
    plans = []
    sched.schedule = _recording(sched.schedule, plans)
    outputs, _ = run_to_completion(sched)
    assert len(plans[0]) == 2 and max(len(p) for p in plans) == 2
    assert len(outputs) == 5


def test_preemption_by_recompute_gives_same_outputs():
    # pool too small for all requests' full lengths at once: forces preemption
    reference = make_scheduler(num_blocks=256)
    tight = make_scheduler(num_blocks=12, block_size=4, budget=64)
    for sched in (reference, tight):
        for i in range(6):
            sched.add_request(make_request(f"r{i}", prompt_len=6, max_tokens=12, first=10 * i))
    ref_out, _ = run_to_completion(reference)
    out, _ = run_to_completion(tight)
    assert tight.num_preemptions > 0
    assert out == ref_out
    assert tight.kv.pool.num_free_blocks == 12


def test_stop_conditions():
    sched = make_scheduler()
    sched.add_request(make_request("len", prompt_len=3, max_tokens=4))
    sched.add_request(make_request("stop_tok", prompt_len=3, max_tokens=50, first=20, stop_token_ids=[25]))
    sched.add_request(make_request("min", prompt_len=3, max_tokens=50, first=20, stop_token_ids=[24],
                                   min_tokens=3))
    statuses = {}
    runner = Runner()
    while sched.has_unfinished():
        plan = sched.schedule()
        for req in sched.update(plan, runner.execute(plan)).updated:
            if req.is_finished:
                statuses[req.request_id] = (req.status, list(req.output_token_ids), req.stop_reason)
    assert statuses["len"][0] == RequestStatus.FINISHED_LENGTH and len(statuses["len"][1]) == 4
    assert statuses["stop_tok"] == (RequestStatus.FINISHED_STOPPED, [23, 24, 25], 25)
    # 24 comes second, before min_tokens=3 is reached, so it does not stop the request
    assert statuses["min"][0] == RequestStatus.FINISHED_LENGTH


def test_rejects_requests_that_cannot_run():
    sched = make_scheduler(num_blocks=4, block_size=4, max_model_len=64)
    with pytest.raises(RequestTooLargeError, match="max-model-len"):
        sched.add_request(make_request("x", prompt_len=64))
    with pytest.raises(RequestTooLargeError, match="KV blocks"):
        sched.add_request(make_request("y", prompt_len=10, max_tokens=20))


def test_random_aborts_leave_no_leaks():
    rng = random.Random(1)
    sched = make_scheduler(num_blocks=40, block_size=4, budget=24, max_num_seqs=6)
    shared = [7] * 12
    for i in range(200):
        req = Request(f"r{i}", shared + [rng.randrange(100) for _ in range(rng.randrange(1, 12))],
                      SamplingParams(max_tokens=rng.randrange(1, 15)), eos_token_ids=(999,))
        sched.add_request(req)

    def maybe_abort(step):
        if rng.random() < 0.3 and sched.requests:
            victim = rng.choice(list(sched.requests))
            sched.finish_requests([victim], RequestStatus.FINISHED_ABORTED)
            sched.kv.check_integrity()

    run_to_completion(sched, on_step=maybe_abort)
    sched.kv.check_integrity()
    assert not sched.requests
    assert sched.kv.pool.num_free_blocks == 40
    assert sched.kv.num_prefix_hits > 0
