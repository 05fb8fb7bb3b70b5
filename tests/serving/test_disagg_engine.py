"""A prefill and a decode engine in one process, stepped by hand, with their real connector workers: the
KV goes over gRPC between them. Checks the handoff the router drives against a colocated engine, and
what a decode instance does when the KV never comes (recompute, or fail, by policy)."""
from __future__ import annotations

import time

import pytest
import torch

from kvcache.transfer.layout import KVLayout
from serving.config import Config
from serving.engine.engine import Engine, build_engine
from serving.kv_connector.transfer import TransferWorker
from tests.serving.test_disagg_support import greedy, make_prompts, tiny_config, token_ids

STEP_TIMEOUT_S = 60.0


def _run(engine: Engine, until) -> list:
    """Step until `until(outputs)` holds."""
    outputs, deadline = [], time.monotonic() + STEP_TIMEOUT_S
    while not until(outputs):
        assert time.monotonic() < deadline, f"stuck: {engine.scheduler.requests}"
        outputs += engine.step()
        if engine.last_step_idle:
            time.sleep(0.002)
    return outputs


def _tokens(outputs) -> list:
    return [o for o in outputs if o.new_token_ids or o.finished]


def _disaggregated(prefill: Engine, decode: Engine, prompt: list[int], params, kv_peer: str,
                   first_token_via_router: bool = True):
    """What the router does for one request; returns the decode side's outputs after the first token."""
    decode.add_request("r", prompt, params, remote_prefill=True)
    accepted = _run(decode, lambda outs: outs)[0]
    assert accepted.accepted and not accepted.new_token_ids
    prefill.add_request("r", prompt, params, kv_peer=kv_peer)
    first = _run(prefill, lambda outs: outs)[0]
    assert first.finish_reason == "remote_decode" and len(first.new_token_ids) == 1
    if first_token_via_router:
        decode.set_first_token("r", first.new_token_ids[0])
    rest = _tokens(_run(decode, lambda outs: _tokens(outs) and _tokens(outs)[-1].finished))
    _run(prefill, lambda outs: not prefill.scheduler.held)  # the lease ends once the KV is acknowledged
    return first, rest


def _reference(engine: Engine, prompt, params) -> list:
    engine.add_request("r", prompt, params)
    return _run(engine, lambda outs: outs and outs[-1].finished)


@pytest.fixture
def engines(tiny_model_dir, request):
    config = tiny_config(tiny_model_dir, kv_transfer_stall_timeout_s=0.5, **getattr(request, "param", {}))
    made = {role: build_engine(config, role) for role in ("prefill", "decode", "colocated")}
    yield made
    for engine in made.values():
        engine.close()


def _check_drained(*engines: Engine) -> None:
    for engine in engines:
        engine.check_integrity()
        assert engine.kv.pool.num_free_blocks == engine.kv.pool.num_blocks
        assert not engine.scheduler.requests and not engine.scheduler.held


@pytest.mark.parametrize("via_router", [True, False], ids=["token-from-router", "token-from-commit"])
def test_handoff_matches_colocated(engines, via_router):
    prompt, params = make_prompts(21, [45])[0], greedy(12)
    first, rest = _disaggregated(engines["prefill"], engines["decode"], prompt, params,
                                 engines["decode"].connector.address, first_token_via_router=via_router)
    expected = _reference(engines["colocated"], prompt, params)
    assert [first.new_token_ids[0]] + token_ids(rest) == token_ids(expected)
    assert rest[-1].num_output_tokens == 12 and rest[-1].finish_reason == "length"
    assert rest[-1].kv_transfer == "transferred"
    counters = engines["decode"].transfer_counters()
    assert counters["num_transfers_received"] == 1 and counters["num_recompute_fallbacks"] == 0
    # one host: the prefill engine wrote straight into the decode engine's shared pool
    assert counters["num_one_sided_received"] == 1
    for role in ("prefill", "decode"):
        assert engines[role].get_stats().extra["histograms"]["kv_transfer_latency_seconds"]["count"] == 1
    _check_drained(engines["prefill"], engines["decode"])


def _unexpecting_receiver(decode: Engine) -> TransferWorker:
    """A decode worker like `decode`'s that expects nothing: every transfer sent to it is refused."""
    kv_cache = torch.zeros_like(decode.runner.kv_cache)
    layout = KVLayout.from_kv_cache(kv_cache, decode.kv_layout.model_fingerprint)
    return TransferWorker(Config(), kv_cache, layout, send=False, receive=True)


def test_kv_that_never_comes_is_recomputed(engines):
    stray = _unexpecting_receiver(engines["decode"])
    try:
        prompt, params = make_prompts(22, [40])[0], greedy(10)
        first, rest = _disaggregated(engines["prefill"], engines["decode"], prompt, params, stray.address)
    finally:
        stray.close()
    expected = _reference(engines["colocated"], prompt, params)
    assert [first.new_token_ids[0]] + token_ids(rest) == token_ids(expected)
    assert engines["decode"].transfer_counters()["num_recompute_fallbacks"] == 1
    assert engines["prefill"].transfer_counters()["num_refused"] >= 1
    assert rest[-1].kv_transfer.startswith("recomputed: ")  # and why
    _check_drained(engines["prefill"], engines["decode"])


@pytest.mark.parametrize("engines", [{"kv_transfer_failure_policy": "fail"}], indirect=True)
def test_kv_that_never_comes_fails_the_request_by_policy(engines):
    stray = _unexpecting_receiver(engines["decode"])
    try:
        first, rest = _disaggregated(engines["prefill"], engines["decode"], make_prompts(23, [30])[0], greedy(10),
                                     stray.address)
    finally:
        stray.close()
    assert len(rest) == 1 and rest[0].finish_reason == "error" and "KV transfer" in rest[0].error
    assert engines["decode"].transfer_counters()["num_failed_by_policy"] == 1
    _check_drained(engines["prefill"], engines["decode"])


@pytest.mark.parametrize("engines", [{"kv_transfer_lease_ttl_s": 0.5}], indirect=True)
def test_a_lease_that_runs_out_frees_the_prefill_blocks_counted(engines, monkeypatch):
    """The acknowledgement never comes (here: the commit waits for a first token that never reaches
    the sender): the prefill instance cancels the send when its lease ends, counts it, frees the
    blocks, and the decode side is told to drop what it received."""
    decode, prefill = engines["decode"], engines["prefill"]
    monkeypatch.setattr(prefill.connector, "tokens_sampled", lambda token_ids: None)
    prompt, params = make_prompts(24, [40])[0], greedy(10)
    decode.add_request("r", prompt, params, remote_prefill=True)
    _run(decode, lambda outs: outs)
    prefill.add_request("r", prompt, params, kv_peer=decode.connector.address)
    first = _run(prefill, lambda outs: outs)[0]
    assert prefill.scheduler.held  # leased
    _run(prefill, lambda outs: not prefill.scheduler.held)
    assert prefill.transfer_counters()["num_leases_expired"] == 1
    _check_drained(prefill)
    decode.set_first_token("r", first.new_token_ids[0])  # the KV never committed: recomputed here
    rest = _tokens(_run(decode, lambda outs: _tokens(outs) and _tokens(outs)[-1].finished))
    assert decode.transfer_counters()["num_recompute_fallbacks"] == 1
    expected = _reference(engines["colocated"], prompt, params)
    assert [first.new_token_ids[0]] + token_ids(rest) == token_ids(expected)
    _check_drained(decode)
