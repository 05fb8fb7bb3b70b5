"""The simulator: queueing theory where it has an answer, the runtime's own policies where it does not
(preemption, reservations, routing), KV transfer timing, determinism, conversations."""
import math

import pytest

from scheduler.latency_model import LatencyModel, PhaseCoefficients
from scheduler.simulator import LinkSpec, SimConversation, SimTurn
from tests.scheduler.sim_helpers import (KV_BYTES_PER_TOKEN, MODEL, NUM_LAYERS, deployment, instance, poisson,
                                         run)

PROMPT = 200
# one prompt per step (the budget holds exactly one), a deterministic service time D
MD1_MODEL = LatencyModel(PhaseCoefficients(0.010, 1e-4, 0.0), PhaseCoefficients(0.008, 1e-6, 5e-4))
D = MD1_MODEL.prefill_time([PROMPT])  # 0.03 s


def md1_mean_ttft(rate: float, service_s: float) -> float:
    """DESIGN.md: mean TTFT = D + R·D² / (2(1 − R·D))."""
    return service_s + rate * service_s ** 2 / (2 * (1 - rate * service_s))


def mean_ttft(records) -> float:
    return sum(r.token_times_s[0] - r.start_s for r in records) / len(records)


@pytest.mark.parametrize("utilization", [0.3, 0.6, 0.8])
def test_a_single_prefill_instance_is_an_md1_queue(utilization):
    # tolerance: 6,000 requests give the mean within about 1-3% at these loads (measured); 5% leaves room
    rate = utilization / D
    conversations = poisson(6_000, rate, prompt=PROMPT, output=1, seed=1)
    prefill_alone = deployment(instance("prefill-0", "prefill", model=MD1_MODEL, budget=PROMPT), phase="prefill")
    _, result = run(prefill_alone, conversations)
    assert all(r.success for r in result.records)
    assert mean_ttft(result.records) == pytest.approx(md1_mean_ttft(rate, D), rel=0.05)
    # a colocated instance serving one-token replies is the same queue
    _, colocated = run(deployment(instance("replica-0", "colocated", model=MD1_MODEL, budget=PROMPT)), conversations)
    assert mean_ttft(colocated.records) == pytest.approx(mean_ttft(result.records), rel=1e-9)


def test_a_decode_instance_with_too_few_blocks_preempts_and_still_finishes_everything():
    conversations = poisson(60, 50.0, prompt=100, output=200, seed=2)
    tight = deployment(instance("prefill-0", "prefill"), instance("decode-0", "decode", num_blocks=60))
    _, result = run(tight, conversations)
    assert result.instances["decode-0"].num_preemptions > 0
    assert any(r.num_preemptions for r in result.records)
    assert all(r.success and r.num_output_tokens == 200 for r in result.records)
    roomy = deployment(instance("prefill-0", "prefill"), instance("decode-0", "decode", num_blocks=4000))
    _, relaxed = run(roomy, conversations)
    assert relaxed.instances["decode-0"].num_preemptions == 0
    assert max(r.finish_s for r in result.records) > max(r.finish_s for r in relaxed.records)


def test_no_decode_room_waits_at_the_router_then_fails_like_the_runtime():
    # each request needs 7 blocks on a 10-block decode instance: one at a time; the rest queue at the
    # router and those that wait longer than instance_timeout_s fail with the runtime's 503 reason
    conversations = poisson(30, 100.0, prompt=100, output=400, seed=3)
    small = deployment(instance("prefill-0", "prefill"), instance("decode-0", "decode", num_blocks=33),
                       instance_timeout_s=5.0)
    _, result = run(small, conversations)
    assert result.max_router_queue > 1
    failed = [r for r in result.records if not r.success]
    assert failed and all("no decode instance could take" in r.error for r in failed)
    assert any(r.success for r in result.records)


def test_the_same_inputs_give_the_same_records():
    conversations = poisson(300, 20.0, seed=4)

    def once():
        deploy = deployment(instance("prefill-0", "prefill"), instance("prefill-1", "prefill"),
                            instance("decode-0", "decode", num_blocks=500), instance("decode-1", "decode"))
        _, result = run(deploy, conversations)
        return [(r.request_id, r.instance, r.decode_instance, r.token_times_s, r.error) for r in result.records]

    assert once() == once()


def test_one_request_through_prefill_transfer_and_decode_follows_the_transfer_formula():
    prompt, output = 512, 4
    links = LinkSpec(intra_node_bytes_per_s=1e9, inter_node_bytes_per_s=1e8, transfer_latency_s=0.002)
    deploy = deployment(instance("prefill-0", "prefill", node=0), instance("decode-0", "decode", node=1),
                        links=links)
    _, result = run(deploy, [SimConversation(0, 0.0, (SimTurn(prompt, output),))])
    record = result.records[0]
    step = MODEL.prefill_time([prompt])
    # the reservation's step is empty (an idle decode instance): the prefill starts at 0
    assert record.token_times_s[0] == pytest.approx(step)
    groups = NUM_LAYERS
    per_group = prompt * KV_BYTES_PER_TOKEN / groups / 1e8  # across nodes
    done = max(step + per_group, step / groups + groups * per_group) + 0.002
    assert record.kv_arrived_s == pytest.approx(done)
    # the decode instance promotes the request at the KV's arrival, then decodes one token per step
    context = prompt + 1
    assert record.token_times_s[1] == pytest.approx(done + MODEL.decode_time([context]))
    assert record.num_output_tokens == output and record.kv_transfer == "transferred"
    assert result.transfer.num_bytes == prompt * KV_BYTES_PER_TOKEN


def test_transfers_on_one_node_are_faster_and_links_serialise_sends():
    links = LinkSpec(intra_node_bytes_per_s=1e10, inter_node_bytes_per_s=1e7)
    conversations = [SimConversation(i, 0.0, (SimTurn(1000, 2),)) for i in range(4)]
    near = deployment(instance("prefill-0", "prefill", node=0), instance("decode-0", "decode", node=0), links=links)
    far = deployment(instance("prefill-0", "prefill", node=0), instance("decode-0", "decode", node=1), links=links)
    _, quick = run(near, conversations)
    _, slow = run(far, conversations)
    assert slow.transfer.seconds_exposed > 10 * quick.transfer.seconds_exposed
    assert slow.transfer.seconds_link_wait > 0  # the second send waited for the first on the slow link
    assert max(r.finish_s for r in slow.records) > max(r.finish_s for r in quick.records)


def test_routing_spreads_requests_over_replicas_and_decode_instances():
    conversations = poisson(200, 40.0, seed=5)
    _, replicas = run(deployment(*(instance(f"replica-{i}", "colocated") for i in range(3))), conversations)
    counts = [sum(r.instance == f"replica-{i}" for r in replicas.records) for i in range(3)]
    assert min(counts) > 40
    disaggregated = deployment(instance("prefill-0", "prefill"), instance("prefill-1", "prefill"),
                               instance("decode-0", "decode"), instance("decode-1", "decode"))
    _, result = run(disaggregated, conversations)
    assert {r.instance for r in result.records} == {"prefill-0", "prefill-1"}
    assert {r.decode_instance for r in result.records} == {"decode-0", "decode-1"}


def test_one_token_replies_end_at_the_prefill_and_free_the_decode_reservation():
    conversations = poisson(20, 10.0, prompt=50, output=1, seed=6)
    _, result = run(deployment(instance("prefill-0", "prefill"), instance("decode-0", "decode")), conversations)
    assert all(r.success and r.num_output_tokens == 1 for r in result.records)


def test_a_conversations_next_turn_carries_its_history_and_hits_the_prefix_cache():
    conversation = SimConversation(0, 0.0, (SimTurn(100, 20), SimTurn(30, 10)), think_time_s=1.5)
    sim, result = run(deployment(instance("replica-0", "colocated")), [conversation])
    first, second = result.records
    assert second.num_prompt_tokens == 100 + 20 + 30
    assert second.arrival_s == pytest.approx(first.finish_s + 1.5)
    pool = sim.instances[0].scheduler.kv
    assert pool.num_prefix_hits >= 16 * ((100 + 19) // 16)  # the first turn's full blocks were reused


def test_max_concurrency_holds_requests_back_at_the_client():
    conversations = [SimConversation(i, 0.0, (SimTurn(64, 8),)) for i in range(10)]
    _, result = run(deployment(instance("replica-0", "colocated"), max_concurrency=2), conversations)
    intervals = [(r.start_s, r.finish_s) for r in result.records]
    for t, _ in intervals:
        assert sum(start <= t < end for start, end in intervals) <= 2
    assert max(r.start_s - r.arrival_s for r in result.records) > 0


def test_a_request_too_large_for_the_instance_fails_with_the_schedulers_reason():
    conversations = [SimConversation(0, 0.0, (SimTurn(5000, 8),))]
    _, result = run(deployment(instance("replica-0", "colocated", max_model_len=4096)), conversations)
    assert not result.records[0].success and "max-model-len" in result.records[0].error


def test_simulated_time_grows_with_load_as_queueing_says():
    light = poisson(500, 2.0, prompt=PROMPT, output=1, seed=7)
    heavy = poisson(500, 25.0, prompt=PROMPT, output=1, seed=7)
    solo = deployment(instance("replica-0", "colocated", model=MD1_MODEL, budget=PROMPT))
    _, a = run(solo, light)
    _, b = run(solo, heavy)
    assert mean_ttft(b.records) > 1.5 * mean_ttft(a.records)
    assert math.isclose(min(r.token_times_s[0] - r.start_s for r in a.records), D, rel_tol=1e-9)


def test_a_prompt_the_prefill_instance_refuses_releases_its_decode_reservation():
    conversations = [SimConversation(0, 0.0, (SimTurn(300, 5),)), SimConversation(1, 0.1, (SimTurn(100, 5),))]
    deploy = deployment(instance("prefill-0", "prefill", max_model_len=256), instance("decode-0", "decode"))
    _, result = run(deploy, conversations)  # run() checks that every block came back
    refused, served = result.records
    assert not refused.success and "max-model-len" in refused.error
    assert served.success and served.num_output_tokens == 5


def test_an_instance_of_pipeline_stages_runs_plans_in_flight():
    """pp = 2 over the same lone-plan latency: a backlog of decodes drains sooner (plans in flight, each
    with half the running requests), a lone request's first token comes no sooner."""
    import dataclasses
    busy = poisson(40, 200.0, prompt=64, output=64, seed=4)
    one = instance("replica-0", "colocated")
    _, serial = run(deployment(one), busy)
    sim, staged = run(deployment(dataclasses.replace(one, pp=2)), busy)
    assert sim.instances[0].executor.pipeline_depth == 2 and sim.instances[0].core.num_overlapped_plans > 0
    assert max(r.finish_s for r in staged.records) < 0.8 * max(r.finish_s for r in serial.records)
    alone = poisson(1, 1.0, prompt=64, output=8, seed=4)
    _, a = run(deployment(one), alone)
    _, b = run(deployment(dataclasses.replace(one, pp=2)), alone)
    assert b.records[0].token_times_s[0] == pytest.approx(a.records[0].token_times_s[0], rel=1e-9)


def test_swaps_cost_what_the_profile_says_they_cost():
    """A decode instance too small for its load swaps (--preemption-mode swap): with a slow host link
    its steps carry the copies and the run takes longer; every block of both tiers comes back."""
    import dataclasses
    from scheduler import SchedulerConfig
    conversations = poisson(60, 50.0, prompt=100, output=200, seed=2)

    def run_with(swap):
        model = LatencyModel(MODEL.prefill, MODEL.decode, meta={"swap": swap} if swap else {})
        decode = dataclasses.replace(instance("decode-0", "decode", num_blocks=60, model=model),
                                     scheduler=SchedulerConfig(max_num_seqs=128, max_num_batched_tokens=2048,
                                                               preemption_mode="swap"),
                                     num_host_blocks=4000, swap_block_bytes=KV_BYTES_PER_TOKEN * 16)
        sim, result = run(deployment(instance("prefill-0", "prefill"), decode), conversations)
        assert all(r.success and r.num_output_tokens == 200 for r in result.records)
        host = sim.instances[1].scheduler.preemption.host
        assert host.pool.num_free_blocks == host.pool.num_blocks
        return sim.instances[1], max(r.finish_s for r in result.records)
    free, free_end = run_with(None)
    slow, slow_end = run_with({"bytes_per_s": 2e8, "seconds_per_copy": 1e-4})
    assert free.scheduler.preemption.num_swapped_out > 0 and free.executor.swap_seconds == 0
    assert slow.executor.swap_seconds > 0.5 and slow_end > free_end


@pytest.mark.parametrize("decode_step_s", [0.004, 0.4])
def test_the_prefill_starts_while_a_busy_decode_instance_reserves_as_in_the_runtime(decode_step_s):
    """A second request arrives while the decode instance decodes the first: its reservation is accepted at
    the end of the decode step that registers it (the one after the step running now). Started at once,
    its prefill hides that wait: the first token comes at max(prefill end, acceptance) instead of after both."""
    model = LatencyModel(PhaseCoefficients(0.05, 1e-4, 0.0), PhaseCoefficients(decode_step_s, 0.0, 0.0))
    prompt = 400
    conversations = [SimConversation(0, 0.0, (SimTurn(100, 200),)),
                     SimConversation(1, 0.5 + decode_step_s / 3, (SimTurn(prompt, 4),))]
    ttft, accepted = {}, {}
    for overlap in (True, False):
        deploy = deployment(instance("prefill-0", "prefill", model=model), instance("decode-0", "decode", model=model),
                            prefill_while_reserving=overlap)
        _, result = run(deploy, conversations)
        record = next(r for r in result.records if r.conversation_id == 1)
        assert record.success and record.num_output_tokens == 4 and record.kv_transfer == "transferred"
        ttft[overlap] = record.token_times_s[0] - record.start_s
        accepted[overlap] = record.reserved_s - record.start_s
    prefill = model.prefill_time([prompt])
    assert accepted[True] == accepted[False] > decode_step_s  # the step running at the arrival and the next
    assert ttft[False] == pytest.approx(accepted[False] + prefill)
    assert ttft[True] == pytest.approx(max(prefill, accepted[True]))
