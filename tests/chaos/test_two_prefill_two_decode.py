"""Chaos against 2P2D: two prefill and two decode instance processes (local launcher) behind the real
HTTP server. Scenarios share one deployment (a fresh one after a scenario that left it broken), the
destructive ones last; each ends with `assert_recovered`.

Prefill instances take big steps (up to 8192 tokens: a batch of long prompts at once), so that a
prefill step, with its prompts' KV moving layer by layer as it computes, lasts long enough to be
caught half-way; a burst of 48 long prompts keeps each prefill instance busy for about three steps.
"""
from __future__ import annotations

import asyncio
import os
import signal

import pytest

from tests.chaos.disconnects import admission_wave, disconnect_storm
from tests.chaos.support import (REQUEST_TIMEOUT_S, Deployment, assert_recovered, assert_replaced,
                                 chaos_config, freeze, greedy_probe, kill_if_left, kv_counters, run_streams,
                                 stopped_until_exit)
from tests.chaos.traffic import Stream, assert_failed_clearly, long_prompt_streams, strike_mid_stream

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

PROMPT_LEN = 480  # 30 blocks of KV per prompt
BURST = 48
MAX_TOKENS = 8
PREFILL_BUDGET = 8192  # tokens per prefill step
STALL_ATTEMPTS = 3  # a freeze misses every transfer in flight about one time in five
DECODES = ["decode-0", "decode-1"]


@pytest.fixture(scope="module")
def deployment(tiny_model_dir):
    config = chaos_config(tiny_model_dir, mode="disaggregated", num_prefill=2, num_decode=2,
                          kv_transfer_layers_per_group=1,
                          prefill_overrides={"max_num_batched_tokens": PREFILL_BUDGET})
    deployment = Deployment(config)
    yield deployment
    deployment.close()


@pytest.fixture
def app(deployment):
    return deployment.app()


@pytest.fixture(scope="module")
def reference(deployment):
    return greedy_probe(deployment.app())


def burst(app, seed: int, num_requests: int = BURST) -> list[Stream]:
    return long_prompt_streams(app.model, seed, num_requests, PROMPT_LEN, MAX_TOKENS)


def _assert_all_finished(streams: list[Stream]) -> None:
    problems = [p for s in streams for p in s.problems()]
    assert not problems, f"{len(problems)} of {len(streams)} streams did not finish: " + "; ".join(problems[:5])


def _assert_same_as_undisturbed(app, streams: list[Stream], seed: int) -> None:
    """The same requests again, with nothing going wrong: greedy, so the same text."""
    again = run_streams(app, burst(app, seed, len(streams)))
    _assert_all_finished(again)
    differ = sum(a.text() != b.text() for a, b in zip(streams, again))
    assert not differ, f"{differ} of {len(streams)} outputs differ from an undisturbed run of the same requests"


def _prefill_busy(app, name: str, streams: list[Stream]):
    """A moment when some first tokens are out and `name` still computes or queues prompts."""
    return lambda: any(s.num_chunks for s in streams) and app.instance(name).num_queued_prefill_tokens >= PROMPT_LEN


def _num_dropped(counters: dict) -> float:
    """Transfers the decode side gave up on: stalled half-way, or never begun after the first token."""
    return counters["num_stalled"] + counters["num_never_sent"]


def test_disconnect_storm(app, reference):
    disconnect_storm(app, reference, num_requests=160, seed=3)


def test_clients_leaving_while_admitted(app, reference):
    admission_wave(app, reference, num_clients=80, seed=13)


def test_kv_transfer_stalled_half_way_is_dropped_and_recomputed(app, reference):
    """prefill-0 freezes (SIGSTOP) while its prompts' KV moves layer by layer, for longer than the
    decode side's stall timeout but less than the health check allows, then continues (SIGCONT).
    The decode side drops the stalled transfers and recomputes those prompts (policy recompute):
    every request finishes with the output of an undisturbed run, and no instance is declared dead."""
    victim = "prefill-0"
    stop_s = app.config.deploy.kv_transfer_stall_timeout_s + 1.5
    failures_before = app.engine.get_stats().extra["router"]["num_instance_failures_total"]

    async def freeze() -> None:
        with stopped_until_exit(app.pid(victim)):
            await asyncio.sleep(stop_s)

    for attempt in range(STALL_ATTEMPTS):
        seed = 31 + attempt
        before = kv_counters(app, DECODES)
        streams = burst(app, seed)
        asyncio.run(strike_mid_stream(app.base_url, streams, _prefill_busy(app, victim, streams), freeze,
                                      REQUEST_TIMEOUT_S))
        _assert_all_finished(streams)
        after = kv_counters(app, DECODES)
        num_dropped = _num_dropped(after) - _num_dropped(before)
        if num_dropped:
            break
    assert num_dropped > 0, (f"none of {STALL_ATTEMPTS} freezes of {victim} caught a transfer half-way "
                             f"(decode counters {after}): the moment was missed; nothing says the server is wrong")
    recomputed = after["num_recompute_fallbacks"] - before["num_recompute_fallbacks"]
    assert recomputed >= num_dropped, f"{num_dropped} transfers dropped, {recomputed} prompts recomputed: {after}"
    assert after["num_failed_by_policy"] == before["num_failed_by_policy"], after
    router = app.engine.get_stats().extra["router"]
    assert router["num_instance_failures_total"] == failures_before, \
        f"a {stop_s:g} s freeze got an instance declared dead: {router}"
    _assert_same_as_undisturbed(app, streams, seed)
    assert_recovered(app, reference)


def test_sigstop_prefill_is_replaced_and_its_requests_rerouted(app, reference):
    """prefill-1 freezes for good (SIGSTOP, never continued) with prompts queued on it: the health
    check declares it dead, its prompts go to prefill-0 (transfers it froze half-way are recomputed),
    every request finishes as undisturbed, and the launcher kills the frozen process and starts a
    new one."""
    victim, seed = "prefill-1", 41
    old_pid = app.pid(victim)
    reroutes_before = app.engine.get_stats().extra["router"]["num_reroutes_total"]
    streams = burst(app, seed)
    frozen: list[int] = []
    try:
        asyncio.run(strike_mid_stream(app.base_url, streams, _prefill_busy(app, victim, streams),
                                      lambda: frozen.extend(freeze(old_pid)), REQUEST_TIMEOUT_S))
        _assert_all_finished(streams)
        assert app.engine.get_stats().extra["router"]["num_reroutes_total"] > reroutes_before, "nothing was re-routed"
        assert_replaced(app, victim, old_pid, frozen)
    finally:
        kill_if_left(frozen or [old_pid])  # the launcher did not: leave nothing frozen behind
    _assert_same_as_undisturbed(app, streams, seed)
    assert_recovered(app, reference)


def test_kill_9_prefill_mid_stream_reroutes_and_restarts(app, reference):
    """prefill-0 is killed with prompts queued on it and KV on its way: queued prompts go to prefill-1,
    transfers cut short are recomputed on the decode side, every request finishes as undisturbed,
    and the launcher starts prefill-0 again."""
    victim, seed = "prefill-0", 51
    old_pid = app.pid(victim)
    streams = burst(app, seed)
    asyncio.run(strike_mid_stream(app.base_url, streams, _prefill_busy(app, victim, streams),
                                  lambda: os.kill(old_pid, signal.SIGKILL), REQUEST_TIMEOUT_S))
    _assert_all_finished(streams)
    assert_replaced(app, victim, old_pid)
    _assert_same_as_undisturbed(app, streams, seed)
    assert_recovered(app, reference)


def test_restarted_decode_peer_gets_kv_on_its_new_port(app, reference):
    """decode-1 is killed while the prefill instances hold prompts whose KV is bound for it; it comes
    back on new ports. The prefill instances must forget the old peer: requests after the restart
    get their KV by transfer (the new decode-1's too), none falls back to recomputing its prompt,
    and what was held for the dead peer is freed within the configured timeouts."""
    victim = "decode-1"
    old_pid, old_kv_address = app.pid(victim), app.instance(victim).kv_address
    # the kill comes once decode-1 has accepted a dozen reservations whose prompts the prefill
    # instances are still computing: their KV is bound for decode-1's old address
    streams = burst(app, 61)
    queued = lambda: sum(app.instance(name).num_queued_prefill_tokens for name in ("prefill-0", "prefill-1"))
    bound = lambda: queued() >= BURST // 2 * PROMPT_LEN and app.instance(victim).num_active >= BURST // 4
    asyncio.run(strike_mid_stream(app.base_url, streams, bound, lambda: os.kill(old_pid, signal.SIGKILL),
                                  REQUEST_TIMEOUT_S))
    for stream in streams:
        if not stream.finished:
            assert_failed_clearly(stream)
    assert_replaced(app, victim, old_pid)
    assert app.instance(victim).kv_address != old_kv_address, "the restarted decode-1 kept its KV address"

    before = kv_counters(app)
    later = long_prompt_streams(app.model, 62, 16, 60, 4)
    run_streams(app, later)
    _assert_all_finished(later)
    after = kv_counters(app)
    assert after["num_recompute_fallbacks"] == before["num_recompute_fallbacks"], (
        f"{after['num_recompute_fallbacks'] - before['num_recompute_fallbacks']:g} of 16 requests sent after the "
        f"restart recomputed their prompt instead of getting its KV (a prefill still busy with the dead peer?): "
        f"{after}")
    assert after["num_transfers_received"] - before["num_transfers_received"] == 16, after
    new_decode = kv_counters(app, [victim])
    assert new_decode.get("num_transfers_received", 0) > 0, f"the restarted {victim} received no KV: {new_decode}"
    assert_recovered(app, reference)
