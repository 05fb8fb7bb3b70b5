"""A prefill and a decode InstanceCore in one process, stepped by hand, with their real connectors: the
KV goes over gRPC between them. Checks the handoff the router drives against a colocated engine, and
what a decode instance does when the KV never comes (recompute, or fail, by policy)."""
from __future__ import annotations

import time

import pytest
import torch

from serving.config import Config
from serving.disagg.connector import make_connector
from serving.disagg.instance_core import InstanceCore
from tests.serving.test_disagg_support import greedy, make_prompts, tiny_config, token_ids

STEP_TIMEOUT_S = 60.0


def _core(config: Config, role: str) -> InstanceCore:
    core = InstanceCore(config, role, make_connector(role, config))
    core.connector.start_receiver("127.0.0.1")  # serves only for the decode role
    return core


def _run(core: InstanceCore, until) -> list:
    """Step until `until(outputs)` holds."""
    outputs, deadline = [], time.monotonic() + STEP_TIMEOUT_S
    while not until(outputs):
        assert time.monotonic() < deadline, f"stuck: {core.scheduler.requests}"
        outputs += core.step()
        if core.last_step_idle:
            time.sleep(0.002)
    return outputs


def _disaggregated(prefill: InstanceCore, decode: InstanceCore, prompt: list[int], params, kv_peer: str):
    """What the router does for one request; returns the decode side's outputs after the first token."""
    decode.add_request("r", prompt, params, remote_prefill=True)
    assert decode.register_remote("r")
    prefill.add_request("r", prompt, params, kv_peer=kv_peer)
    first = _run(prefill, lambda outs: outs)[0]
    assert first.finish_reason == "remote_decode" and len(first.new_token_ids) == 1
    decode.set_first_token("r", first.new_token_ids[0])
    rest = _run(decode, lambda outs: outs and outs[-1].finished)
    _run(prefill, lambda outs: not prefill.scheduler.leased)  # the lease ends once the KV is acknowledged
    return first, rest


@pytest.fixture
def cores(tiny_model_dir, request):
    config = tiny_config(tiny_model_dir, kv_transfer_stall_timeout_s=0.5, **getattr(request, "param", {}))
    made = {role: _core(config, role) for role in ("prefill", "decode", "colocated")}
    yield made
    for core in made.values():
        core.connector.close()


def _kv_address(core: InstanceCore) -> str:
    return core.connector.receives.address


def _check_drained(*cores: InstanceCore) -> None:
    for core in cores:
        core.check_integrity()
        assert core.kv.pool.num_free_blocks == core.kv.pool.num_blocks
        assert not core.scheduler.requests and not core.scheduler.leased


def test_handoff_matches_colocated(cores):
    prompt, params = make_prompts(21, [45])[0], greedy(12)
    decode_address = _kv_address(cores["decode"])
    first, rest = _disaggregated(cores["prefill"], cores["decode"], prompt, params, decode_address)
    cores["colocated"].add_request("r", prompt, params)
    expected = _run(cores["colocated"], lambda outs: outs and outs[-1].finished)
    assert [first.new_token_ids[0]] + token_ids(rest) == token_ids(expected)
    assert rest[-1].num_output_tokens == 12 and rest[-1].finish_reason == "length"
    counters = cores["decode"].connector.counters()
    assert counters["num_transfers_received"] == 1 and counters["num_recompute_fallbacks"] == 0
    _check_drained(cores["prefill"], cores["decode"])


def _unexpecting_receiver(decode: InstanceCore):
    """A decode connector like `decode`'s that expects nothing: every transfer sent to it is refused."""
    stray = make_connector("decode", decode.config)
    stray.bind(torch.zeros_like(decode.runner.kv_cache), decode.model_dir)
    return stray, stray.start_receiver("127.0.0.1")


def test_kv_that_never_comes_is_recomputed(cores):
    stray, stray_address = _unexpecting_receiver(cores["decode"])
    try:
        prompt, params = make_prompts(22, [40])[0], greedy(10)
        first, rest = _disaggregated(cores["prefill"], cores["decode"], prompt, params, stray_address)
    finally:
        stray.close()
    cores["colocated"].add_request("r", prompt, params)
    expected = _run(cores["colocated"], lambda outs: outs and outs[-1].finished)
    assert [first.new_token_ids[0]] + token_ids(rest) == token_ids(expected)
    assert cores["decode"].connector.counters()["num_recompute_fallbacks"] == 1
    assert cores["prefill"].connector.counters()["num_refused"] >= 1
    _check_drained(cores["prefill"], cores["decode"])


@pytest.mark.parametrize("cores", [{"kv_transfer_failure_policy": "fail"}], indirect=True)
def test_kv_that_never_comes_fails_the_request_by_policy(cores):
    stray, stray_address = _unexpecting_receiver(cores["decode"])
    try:
        first, rest = _disaggregated(cores["prefill"], cores["decode"], make_prompts(23, [30])[0], greedy(10),
                                     stray_address)
    finally:
        stray.close()
    assert len(rest) == 1 and rest[0].finish_reason == "error" and "KV transfer" in rest[0].error
    assert cores["decode"].connector.counters()["num_failed_by_policy"] == 1
    _check_drained(cores["prefill"], cores["decode"])
