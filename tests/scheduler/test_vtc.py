"""VTC fairness (scheduler/policies/fairness.py) through the scheduler: the paper's bound between two
backlogged clients, Jain's index, client weights, the lift, fairness preemption, aborts, and the
queue's bookkeeping. Service is measured here by a meter of its own (the policy's charging rule
restated), so the FCFS runs that must fail the bound are measured the same way."""
import random

import pytest

from scheduler import RequestStatus
from scheduler.policies import VtcOrdering
from tests.scheduler.helpers import Runner, make_request, make_scheduler, run_to_completion, step

WP, WD = 1.0, 2.0  # the default weights
NUM_BLOCKS, BLOCK_SIZE, BUDGET, MAX_NUM_SEQS = 64, 4, 32, 8
PROMPT, OUTPUT = (4, 16), (2, 16)  # uniform ranges of the backlogged clients' requests
# the paper's bound, 2 x max(wp x longest prompt, wd x tokens a running batch holds), plus one
# step's service for the one-step lag of the counters behind the order (fairness_update_interval 1)
BOUND = 2 * max(WP * (PROMPT[1] - 1), WD * NUM_BLOCKS * BLOCK_SIZE) + (WP * BUDGET + WD * MAX_NUM_SEQS)


def meter(sched, plan, served: dict) -> None:
    """Add this step's service per client: prompt tokens of requests with no output yet, one output
    token per request whose step samples. Call after schedule() (num_computed_tokens advanced)."""
    for request_id, num_tokens in plan.num_scheduled_tokens.items():
        request = sched.requests[request_id]
        end = request.num_computed_tokens
        num_prompt = 0 if request.output_token_ids else max(0, min(end, request.num_prompt_tokens) - end + num_tokens)
        cost = WP * num_prompt + WD * (end >= request.num_tokens)
        served[request.client_id] = served.get(request.client_id, 0.0) + cost


class Backlogged:
    """Clients that always have requests waiting: before every step each client's queue is topped
    up to its depth (a client with depth 3 sends three times the requests of one with depth 1)."""

    def __init__(self, policy: str, depths: dict[str, int], seed: int = 0, **config) -> None:
        self.sched = make_scheduler(num_blocks=NUM_BLOCKS, block_size=BLOCK_SIZE, max_num_seqs=MAX_NUM_SEQS,
                                    budget=BUDGET, max_model_len=64, scheduling_policy=policy, **config)
        self.depths = dict(depths)
        self.rng = random.Random(seed)
        self.runner = Runner()
        self.served: dict[str, float] = {}
        self.num_sent = 0

    def top_up(self) -> None:
        waiting: dict[str, int] = {}
        for request in self.sched.waiting:
            waiting[request.client_id] = waiting.get(request.client_id, 0) + 1
        for client, depth in self.depths.items():
            for _ in range(depth - waiting.get(client, 0)):
                self.sched.add_request(make_request(
                    f"{client}-{self.num_sent}", prompt_len=self.rng.randrange(*PROMPT),
                    max_tokens=self.rng.randrange(*OUTPUT), first=self.num_sent, client_id=client))
                self.num_sent += 1

    def step(self) -> None:
        self.top_up()
        plan = self.sched.schedule()
        meter(self.sched, plan, self.served)
        self.sched.update(plan, self.runner.execute(plan))
        self.sched.clock.advance(0.01)
        self.sched.check_integrity()

    def share(self, client: str) -> float:
        return self.served.get(client, 0.0) / sum(self.served.values())


def jain(values) -> float:
    values = list(values)
    return sum(values) ** 2 / (len(values) * sum(v * v for v in values))


def test_two_backlogged_clients_stay_within_the_bound_under_vtc_and_not_under_fcfs():
    vtc, fcfs = Backlogged("vtc", {"heavy": 6, "light": 2}), Backlogged("fcfs", {"heavy": 6, "light": 2})
    worst = 0.0
    for _ in range(400):
        vtc.step()
        fcfs.step()
        worst = max(worst, abs(vtc.served.get("heavy", 0) - vtc.served.get("light", 0)))
        assert worst <= BOUND
    assert vtc.sched.ordering.service() == pytest.approx(vtc.served)  # the policy counts what the meter does
    assert fcfs.served["heavy"] - fcfs.served["light"] > 2 * BOUND  # FCFS serves in proportion to demand
    assert worst < BOUND / 3  # in practice VTC stays well inside


def test_jain_index_of_service_is_near_one_under_vtc_and_not_under_fcfs():
    runs = {policy: Backlogged(policy, {"heavy": 6, "light": 2}, seed=1) for policy in ("vtc", "fcfs")}
    for run in runs.values():
        for _ in range(300):
            run.step()
    assert jain(runs["vtc"].served.values()) >= 0.95
    assert jain(runs["fcfs"].served.values()) < 0.85


def test_a_client_of_weight_two_gets_twice_the_service():
    run = Backlogged("vtc", {"gold": 3, "plain": 3}, client_weights={"gold": 2})
    for _ in range(400):
        run.step()
    assert run.served["gold"] / run.served["plain"] == pytest.approx(2.0, rel=0.1)
    service = run.sched.ordering.service()  # over the weight: level
    assert service["gold"] == pytest.approx(service["plain"], rel=0.1)


def test_a_late_client_starts_at_the_lowest_active_counter_and_gets_no_burst():
    run = Backlogged("vtc", {"a": 3, "b": 3})
    for _ in range(150):
        run.step()
    ordering = run.sched.ordering
    floor = min(ordering.counter("a"), ordering.counter("b"))
    assert floor > 1000  # a and b have been served a while: a new counter of 0 would be far behind
    run.depths["c"] = 3
    run.top_up()
    assert ordering.counter("c") == floor
    before = dict(run.served)
    for _ in range(60):
        run.step()
    window = {client: run.served.get(client, 0) - before.get(client, 0) for client in run.served}
    assert 0.2 < window["c"] / sum(window.values()) < 0.5  # about a third, not everything


def test_with_nobody_waiting_an_arrival_is_lifted_to_the_last_client_that_left():
    sched = make_scheduler(budget=64, scheduling_policy="vtc")
    sched.add_request(make_request("a0", prompt_len=10, max_tokens=5, client_id="a"))
    run_to_completion(sched)
    ordering = sched.ordering
    assert ordering.counter("a") == WP * 10 + WD * 5
    sched.add_request(make_request("b0", prompt_len=4, max_tokens=2, client_id="b"))
    assert ordering.counter("b") == ordering.counter("a")  # a was the last to leave the queue
    run_to_completion(sched)
    sched.add_request(make_request("a1", prompt_len=4, max_tokens=2, client_id="a"))
    assert ordering.counter("a") == ordering.counter("b")  # lifted: b left last, ahead of a
    assert ordering.service() == {"a": 20.0, "b": 8.0}  # service received: no lifts in it


def _far_behind_client_run(threshold: float):
    """heavy's two long requests fill the pool, then light's request arrives. Returns (the step
    light was admitted at, the preemptions of that step, the counter gaps seen before each step,
    the steps heavy's requests finished at, the scheduler, the outputs)."""
    sched = make_scheduler(num_blocks=24, block_size=4, budget=64, max_model_len=64, prefix_caching=False,
                           scheduling_policy="vtc", fairness_preemption_threshold=threshold)
    runner = Runner()
    for i in range(2):
        sched.add_request(make_request(f"heavy-{i}", prompt_len=8, max_tokens=40, first=10 * i, client_id="heavy"))
    while sched.kv.pool.num_free_blocks >= 6:  # until light's 24-token prompt no longer fits
        step(sched, runner)
    sched.add_request(make_request("light", prompt_len=24, max_tokens=4, first=50, client_id="light"))
    ordering, gaps, finished, admitted = sched.ordering, [], [], None
    outputs = {}
    for number in range(1, 200):
        gaps.append(ordering.counter("heavy") - ordering.counter("light"))
        plan, update = step(sched, runner)
        for request in update.updated:
            outputs[request.request_id] = list(request.output_token_ids)
            if request.is_finished and request.client_id == "heavy":
                finished.append(number)
        if admitted is None and any(new.request_id == "light" for new in plan.new_requests):
            admitted = (number, plan.preempted_request_ids)
        sched.check_integrity()
        if not sched.has_unfinished():
            break
    return admitted, gaps, finished, sched, outputs


def test_a_far_behind_waiting_request_preempts_a_far_ahead_running_one():
    (number, preempted), gaps, finished, sched, outputs = _far_behind_client_run(threshold=10)
    assert preempted == ["heavy-1"]  # the furthest-ahead client's latest admitted request
    assert gaps[0] == 0  # light was lifted to heavy's counter on arrival (heavy left the queue last)
    assert gaps[number - 1] > 10 and all(gap <= 10 for gap in gaps[:number - 1])
    assert number < finished[0]  # before any of heavy's requests ended
    assert outputs["heavy-1"] == [(10 + 8 + i) % 100 for i in range(40)]  # recomputed, same tokens
    assert sched.kv.pool.num_free_blocks == 24


@pytest.mark.parametrize("threshold", [0, 1e9])
def test_no_fairness_preemption_when_off_or_when_the_clients_are_close(threshold):
    (number, preempted), gaps, finished, sched, _ = _far_behind_client_run(threshold)
    assert preempted == [] and sched.num_preemptions == 0
    assert number > finished[0]  # light waited for heavy's first request to end
    assert max(gaps) > 10  # the gap that made the threshold-10 run preempt was there


def test_aborts_keep_the_queue_consistent_and_leak_nothing():
    sched = make_scheduler(num_blocks=32, max_num_seqs=2, budget=32, scheduling_policy="vtc")
    ids = []
    for i in range(12):
        client = "abc"[i % 3]
        sched.add_request(make_request(f"{client}{i}", prompt_len=6, max_tokens=6, first=i, client_id=client))
        ids.append(f"{client}{i}")
        sched.clock.advance(0.1)
    runner = Runner()
    step(sched, runner)  # a0 and b1 run
    running = {r.request_id for r in sched.running}
    assert running == {"a0", "b1"}
    # a waiting head (c2), one in the middle of its client's queue (a6), all of b's waiting ones
    # (b's sub-queue empties), a running one (a0), an unknown id
    aborted = ["c2", "a6", "b4", "b7", "b10", "a0", "nope"]
    finished = sched.finish_requests(aborted, RequestStatus.FINISHED_ABORTED)
    assert {r.request_id for r in finished} == set(aborted) - {"nope"}
    expected = set(ids) - set(aborted) - running
    assert len(sched.waiting) == len(expected) and {r.request_id for r in sched.waiting} == expected
    assert not sched.waiting.remove(finished[0])  # already out
    sched.check_integrity()
    outputs, _ = run_to_completion(sched, runner)
    assert set(outputs) == expected | {"b1"}
    assert len(sched.waiting) == 0 and not sched.requests
    assert sched.kv.pool.num_free_blocks == 32


def test_recomputation_after_preemption_is_not_charged_again():
    # a pool too small for all: running requests preempt each other (recompute); whole prompts only,
    # so no request is preempted in the middle of its prompt
    sched = make_scheduler(num_blocks=20, block_size=4, max_num_seqs=8, budget=64, max_model_len=64,
                           prefix_caching=False, enable_chunked_prefill=False, scheduling_policy="vtc")
    rng = random.Random(3)
    expected: dict[str, float] = {}
    for i in range(16):
        client, prompt, output = "xy"[i % 2], rng.randrange(4, 12), rng.randrange(10, 30)
        sched.add_request(make_request(f"r{i}", prompt_len=prompt, max_tokens=output, first=i, client_id=client))
        expected[client] = expected.get(client, 0.0) + WP * prompt + WD * output
    run_to_completion(sched)
    assert sched.num_preemptions > 0
    assert sched.ordering.service() == pytest.approx(expected)
    assert sched.kv.pool.num_free_blocks == 20


def test_the_queue_serves_the_lowest_counter_first_and_each_client_in_order():
    ordering = VtcOrdering()
    queue = ordering.make_queue()
    requests = {rid: make_request(rid, prompt_len=4, client_id=rid[0], arrival_time=t)
                for t, rid in enumerate(["a1", "b1", "a2", "c1", "b2"])}
    for request in requests.values():
        queue.add(request)
    assert len(queue) == 5 and [r.request_id for r in queue] == ["a1", "a2", "b1", "b2", "c1"]
    ordering.on_scheduled(make_request("x", prompt_len=30, client_id="a"), 30)  # a was served 30 + 2
    ordering.on_scheduled(make_request("y", prompt_len=10, client_id="b"), 10)  # b 10 + 2
    order = []
    while queue:
        order.append(queue.pop().request_id)
    assert order == ["c1", "b1", "b2", "a1", "a2"]  # c (0), then b (12, + 6 provisional for b1), then a
    queue.add(requests["a1"])
    queue.prepend(requests["a2"])
    assert queue.peek() is requests["a2"] and queue.remove(requests["a2"]) and not queue.remove(requests["a2"])
    assert [r.request_id for r in queue] == ["a1"]
    with pytest.raises(RuntimeError, match="one queue"):
        ordering.make_queue()


def test_idle_clients_below_the_floor_are_forgotten():
    run = Backlogged("vtc", {"steady": 2})
    for i in range(50):  # fifty one-off clients, one request each
        run.sched.add_request(make_request(f"once-{i}", prompt_len=4, max_tokens=2, client_id=f"once-{i}"))
    for _ in range(1100):  # past the first sweep (every 1024 steps)
        run.step()
    assert set(run.sched.ordering.counters()) == {"steady"}
    assert run.served.keys() == {"steady"} | {f"once-{i}" for i in range(50)}  # they were served


def test_admissions_within_a_step_alternate_between_level_clients():
    # the counters move only after the step; the estimated cost of each admission keeps one client
    # from taking all of a step's admissions (the paper charges the prompt at admission)
    sched = make_scheduler(num_blocks=64, max_num_seqs=8, budget=64, scheduling_policy="vtc")
    for client in "ab":  # all of a's requests arrive before b's
        for i in range(4):
            sched.add_request(make_request(f"{client}{i}", prompt_len=6, max_tokens=2, client_id=client))
            sched.clock.advance(0.1)
    plan, _ = step(sched, Runner())
    assert [new.request_id for new in plan.new_requests] == ["a0", "b0", "a1", "b1", "a2", "b2", "a3", "b3"]


def test_disaggregated_instances_under_vtc_serve_everything_and_split_the_charges():
    # the decode side's requests enter its queue through the connector (prepend, not add)
    import dataclasses

    from scheduler import SchedulerConfig
    from tests.scheduler.sim_helpers import deployment, instance, poisson, run

    vtc = SchedulerConfig(max_num_seqs=16, max_num_batched_tokens=512, scheduling_policy="vtc")
    prefill = dataclasses.replace(instance("prefill-0", "prefill", num_blocks=400), scheduler=vtc)
    decode = dataclasses.replace(instance("decode-0", "decode", num_blocks=200), scheduler=vtc)
    conversations = [dataclasses.replace(c, tenant="ab"[c.conversation_id % 2])
                     for c in poisson(120, 40.0, prompt=(50, 300), output=(2, 60), seed=2)]
    sim, result = run(deployment(prefill, decode), conversations)  # checks integrity and leaks
    assert all(r.success for r in result.records)
    by_instance = {i.name: i.scheduler.ordering.service() for i in sim.instances}
    for tenant in "ab":
        records = [r for r in result.records if r.tenant == tenant]
        prompt_and_first = sum(WP * r.num_prompt_tokens + WD for r in records)
        assert by_instance["prefill-0"][tenant] == pytest.approx(prompt_and_first)
        assert by_instance["decode-0"][tenant] == pytest.approx(sum(WD * (r.num_output_tokens - 1) for r in records))
