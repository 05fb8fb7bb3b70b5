"""The EngineCore step loop driven by the latency-model executor: no model, virtual time."""
import random

import pytest

from kvcache.block_pool import BlockPool
from kvcache.kv_manager import KVCacheManager
from scheduler import EngineCore, Request, SamplingParams, Scheduler, SchedulerConfig, VirtualClock
from scheduler.latency_executor import LatencyModelExecutor
from scheduler.latency_model import LatencyModel, PhaseCoefficients
from scheduler.kv_moves import SwapIn, SwapOut
from scheduler.step import NewRequestData, StepPlan

MODEL = LatencyModel(PhaseCoefficients(0.010, 2e-5, 1e-9), PhaseCoefficients(0.008, 1e-6, 5e-4))


def make_core(num_blocks=400, budget=256, max_num_seqs=32, **config):
    clock = VirtualClock()
    kv = KVCacheManager(BlockPool(num_blocks), 16)
    scheduler = Scheduler(SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=budget, **config),
                          kv, 4096, clock=clock)
    return EngineCore(scheduler, LatencyModelExecutor(MODEL, token_id=3, clock=clock), clock)


def test_hundreds_of_requests_run_in_virtual_time_and_free_every_block():
    core = make_core()
    rng = random.Random(0)
    expected = {}
    for i in range(300):
        max_tokens = rng.randrange(1, 40)
        prompt = [rng.randrange(5, 1000) for _ in range(rng.randrange(1, 300))]
        core.add_request(Request(f"r{i}", prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=True),
                                 arrival_time=0.0))
        expected[f"r{i}"] = max_tokens
    outputs, step_seconds, first_token_at = {}, 0.0, {}
    while core.has_unfinished():
        before = core.clock.now()
        for output in core.step():
            outputs[output.request_id] = output
            first_token_at.setdefault(output.request_id, core.clock.now())
        step_seconds += core.clock.now() - before
    assert {rid: o.num_output_tokens for rid, o in outputs.items()} == expected
    assert all(o.finished and o.finish_reason == "length" for o in outputs.values())
    core.check_integrity()
    assert core.scheduler.kv.pool.num_free_blocks == 400
    # the clock moved by the modelled step times and nothing else
    assert core.clock.now() == pytest.approx(core.executor.busy_seconds) == pytest.approx(step_seconds)
    assert core.clock.now() > 300 * MODEL.decode.a / 32  # at least one decode step per batch of tokens
    # requests queued behind others waited: their first token came later on the virtual clock
    assert max(first_token_at.values()) > 10 * min(first_token_at.values())


def test_the_same_requests_take_the_same_virtual_time():
    def run():
        core = make_core(num_blocks=60)  # tight: preemptions happen
        for i in range(50):
            core.add_request(Request(f"r{i}", [7] * (10 + i), SamplingParams(max_tokens=30, ignore_eos=True),
                                     arrival_time=0.0))
        while core.has_unfinished():
            core.step()
        return core.clock.now(), core.scheduler.num_preemptions
    first, second = run(), run()
    assert first == second and first[1] > 0


def test_a_step_costs_prefill_plus_decode_with_one_overhead():
    core = make_core()
    core.add_request(Request("a", [5] * 100, SamplingParams(max_tokens=5, ignore_eos=True), arrival_time=0.0))
    core.step()
    assert core.clock.now() == pytest.approx(MODEL.prefill_time([100]))
    core.add_request(Request("b", [6] * 50, SamplingParams(max_tokens=5, ignore_eos=True), arrival_time=0.0))
    before = core.clock.now()
    core.step()  # a's decode beside b's prefill
    expected = MODEL.prefill_time([50]) + MODEL.decode_time([101]) - min(MODEL.prefill.a, MODEL.decode.a)
    assert core.clock.now() - before == pytest.approx(expected)


def _pipelined_core(depth, num_blocks=400, **config):
    clock = VirtualClock()
    scheduler = Scheduler(SchedulerConfig(max_num_seqs=32, max_num_batched_tokens=256, **config),
                          KVCacheManager(BlockPool(num_blocks), 16), 4096, clock=clock)
    executor = LatencyModelExecutor(MODEL, token_id=3, clock=clock, pipeline_depth=depth)
    return EngineCore(scheduler, executor, clock), executor


def test_a_pipelined_executor_gives_each_stage_its_share_and_overlaps_plans():
    """Two stages, two plans at once: each stage takes half a plan's latency, the second plan enters
    stage 0 when the first leaves it, and results come back when their last stage ends."""
    clock = VirtualClock()
    executor = LatencyModelExecutor(MODEL, clock=clock, pipeline_depth=2)
    for i in range(2):
        executor.submit(StepPlan(
            new_requests=[NewRequestData(f"r{i}", [5] * 100, 100, SamplingParams(max_tokens=4), [i], 0)],
            num_scheduled_tokens={f"r{i}": 100}, kv_moves=[SwapOut(f"r{i}", [i], [i])]))
    latency = MODEL.prefill_time([100])
    first = executor.collect()
    assert first.step_seconds == pytest.approx(latency) and first.sampled_token_ids == {"r0": 0}
    assert [m.request_id for m in first.moves] == ["r0"]  # the second plan's move is not done yet
    clock.advance(first.step_seconds)
    second = executor.collect()
    assert second.step_seconds == pytest.approx(latency / 2)  # 1.5 latencies after both went in
    assert [m.request_id for m in second.moves] == ["r1"]
    assert executor.busy_seconds == pytest.approx(latency)  # per stage: two halves


@pytest.mark.parametrize("depth", [2, 4])
def test_pipeline_stages_serve_decode_batches_faster_and_lone_prompts_no_faster(depth):
    """Through EngineCore's batch queue: a backlog of decodes finishes sooner with plans in flight (each
    plan takes 1/depth of the running requests), a lone request takes its serial latency."""
    def finish_time(core, num_requests):
        for i in range(num_requests):
            core.add_request(Request(f"r{i}", [5] * 32, SamplingParams(max_tokens=64, ignore_eos=True),
                                     arrival_time=0.0))
        while core.has_unfinished():
            core.step()
        core.scheduler.check_integrity()
        return core.clock.now()
    serial = finish_time(make_core(), 16)
    core, executor = _pipelined_core(depth)
    pipelined = finish_time(core, 16)
    assert pipelined < serial * 0.8 and core.num_overlapped_plans > 0
    lone_serial = finish_time(make_core(), 1)
    lone_core, _ = _pipelined_core(depth)
    assert finish_time(lone_core, 1) == pytest.approx(lone_serial, rel=1e-9)


def test_a_pipelined_core_with_nothing_to_compute_says_it_is_idle():
    """An empty plan left in flight is not work: the engine loop (and a simulated instance) may sleep
    instead of spinning on empty plans."""
    core, _ = _pipelined_core(2)
    core.add_request(Request("r0", [5] * 8, SamplingParams(max_tokens=3, ignore_eos=True), arrival_time=0.0))
    while core.has_unfinished():
        core.step()
    core.step()
    assert core.last_step_idle


def test_a_submit_keeps_the_engine_until_its_plan_has_passed_stage_0():
    """The runtime's engine thread computes stage 0 inside submit: the next plan is made once the one
    before it has left stage 0, and a result is taken once the engine is done with the plans it
    submitted meanwhile (a decode's token waits for the stage 0 of a big prefill behind it)."""
    submitted = []

    class Recording(LatencyModelExecutor):
        def submit(self, plan):
            submitted.append((self.clock.now(), sum(plan.num_scheduled_tokens.values())))
            return super().submit(plan)
    clock = VirtualClock()
    scheduler = Scheduler(SchedulerConfig(max_num_seqs=32, max_num_batched_tokens=100),
                          KVCacheManager(BlockPool(400), 16), 4096, clock=clock)
    core = EngineCore(scheduler, Recording(MODEL, token_id=3, clock=clock, pipeline_depth=2), clock)
    for i in range(2):
        core.add_request(Request(f"r{i}", [5] * 100, SamplingParams(max_tokens=2, ignore_eos=True),
                                 arrival_time=0.0))
    core.step()
    share = MODEL.prefill_time([100]) / 2
    assert submitted == [(0.0, 100), (pytest.approx(share), 100)]  # one prompt a plan, the second after
    assert clock.now() == pytest.approx(2 * share)  # r0's result: out of stage 1 as r1 leaves stage 0

    executor = LatencyModelExecutor(MODEL, clock=VirtualClock(), pipeline_depth=2)
    decode = StepPlan(new_requests=[NewRequestData("d", [5] * 10, 9, SamplingParams(max_tokens=4), [0], 9)],
                      num_scheduled_tokens={"d": 1})  # the token after 9 computed: a decode row
    prompt = StepPlan(new_requests=[NewRequestData("p", [5] * 500, 500, SamplingParams(max_tokens=4), [1], 0)],
                      num_scheduled_tokens={"p": 500})
    executor.clock.advance(executor.submit(decode))
    assert executor.clock.now() == pytest.approx(MODEL.decode_time([10]) / 2)
    executor.clock.advance(executor.submit(prompt))
    assert executor.clock.now() == pytest.approx(MODEL.decode_time([10]) / 2 + MODEL.prefill_time([500]) / 2)
    assert executor.collect().step_seconds == 0.0  # its token came back while the engine computed stage 0
    assert executor.submit(StepPlan()) == 0.0  # nothing to compute keeps nobody


def _prompts_in_a_pipeline(model, num_plans: int):
    """A two-stage executor given num_plans plans of one 100-token prompt each, at time 0."""
    clock = VirtualClock()
    executor = LatencyModelExecutor(model, clock=clock, pipeline_depth=2)
    for i in range(num_plans):
        executor.submit(StepPlan(
            new_requests=[NewRequestData(f"r{i}", [5] * 100, 100, SamplingParams(max_tokens=4), [i], 0)],
            num_scheduled_tokens={f"r{i}": 100}))
    return clock, executor


def test_a_profiled_stage_time_sets_the_pipelines_pace():
    """With the busiest stage's time profiled beside a lone plan's latency, plans in flight follow each
    other by the stage time; the rest of the latency passes between stages without holding one."""
    stage = {"prefill": {"a": 0.002, "b": 5e-6, "c": 0.0}, "decode": {"a": 0.002, "b": 0.0, "c": 0.0}}
    model = LatencyModel(PhaseCoefficients(0.010, 2e-5, 0.0), PhaseCoefficients(0.008, 0.0, 0.0),
                         meta={"pp": 2, "stage": stage})
    assert model.stage_model().prefill_time([100]) == pytest.approx(0.0025)
    clock, executor = _prompts_in_a_pipeline(model, 2)
    latency = model.prefill_time([100])  # 12 ms alone: two 2.5 ms stage holds and 3.5 ms before each
    first = executor.collect()
    assert first.step_seconds == pytest.approx(latency)
    clock.advance(first.step_seconds)
    assert executor.collect().step_seconds == pytest.approx(0.0025)  # one stage time behind the first
    assert LatencyModel(model.prefill, model.decode).stage_model() is None


def test_a_stage_hold_longer_than_its_share_paces_the_pipeline_without_delaying_a_lone_plan():
    """An engine whose own work per plan outlasts a stage's share of the plan's latency (an in-place
    fit of a pipelined engine sees this): plans in flight follow each other by that hold, and a lone
    plan still takes its latency."""
    stage = {"prefill": {"a": 0.009, "b": 0.0, "c": 0.0}, "decode": {"a": 0.009, "b": 0.0, "c": 0.0}}
    model = LatencyModel(PhaseCoefficients(0.010, 0.0, 0.0), PhaseCoefficients(0.010, 0.0, 0.0),
                         meta={"pp": 2, "stage": stage})  # a 10 ms plan, 5 ms a stage, held 9 ms
    clock, executor = _prompts_in_a_pipeline(model, 3)
    first = executor.collect()
    assert first.step_seconds == pytest.approx(0.010)  # alone in the pipeline: its latency
    clock.advance(first.step_seconds)
    assert executor.collect().step_seconds == pytest.approx(0.009)  # entered stage 0 at 9 ms, out at 19
    clock.advance(0.009)
    assert executor.collect().step_seconds == pytest.approx(0.009)  # at 18 ms, out at 28
    assert executor.busy_seconds == pytest.approx(0.027)


def test_a_plans_swaps_are_priced_beside_its_compute():
    """Copies run beside the forward pass, each layer's before that layer: a plan with swaps costs
    max(compute, copies + compute / layers); without a swap cost (or block size) they are free."""
    model = LatencyModel(PhaseCoefficients(0.010, 0.0, 0.0), PhaseCoefficients(0.008, 0.0, 0.0),
                         meta={"swap": {"bytes_per_s": 1e6, "seconds_per_copy": 1e-4}})
    executor = LatencyModelExecutor(model, swap_block_bytes=1000, num_layers=4)
    new = [NewRequestData("r", [5] * 8, 8, SamplingParams(max_tokens=4), [0, 1], 0)]
    small = SwapOut("a", [10, 11], [0, 1])  # one run: 2 kB and 4 copies = 2.4 ms
    assert executor.execute(StepPlan(new_requests=new, num_scheduled_tokens={"r": 8}, kv_moves=[small])) \
        .step_seconds == pytest.approx(0.010)  # hidden behind the compute
    scattered = SwapIn("b", [0, 1, 2, 3], [20, 22, 24, 26])  # four runs: 4 kB and 16 copies = 5.6 ms
    big = SwapOut("c", list(range(30, 40)), list(range(4, 14)))  # 10 kB and 4 copies = 10.4 ms
    result = executor.execute(StepPlan(num_scheduled_tokens={"r": 1}, cached_requests=[], kv_moves=[scattered, big]))
    assert result.step_seconds == pytest.approx(0.0056 + 0.0104 + 0.008 / 4)
    assert executor.swap_seconds == pytest.approx(0.0024 + 0.016)
    free = LatencyModelExecutor(model)  # no block size: nothing to price
    free.execute(StepPlan(new_requests=new, num_scheduled_tokens={"r": 8}))
    assert free.execute(StepPlan(num_scheduled_tokens={"r": 1}, kv_moves=[big])).step_seconds == pytest.approx(0.008)
