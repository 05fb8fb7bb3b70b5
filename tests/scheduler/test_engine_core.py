"""The EngineCore step loop driven by the latency-model executor: no model, virtual time."""
import random

import pytest

from kvcache.block_pool import BlockPool
from kvcache.kv_manager import KVCacheManager
from scheduler import EngineCore, Request, SamplingParams, Scheduler, SchedulerConfig, VirtualClock
from scheduler.latency_executor import LatencyModelExecutor
from scheduler.latency_model import LatencyModel, PhaseCoefficients

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
