"""Colocated data-parallel replicas behind the router (`--num-replicas`): greedy outputs equal the single
engine's; a killed replica fails (or, with --reprefill-on-decode-failure, continues elsewhere) only its
own requests and is restarted. And the TP/PP keys: they validate, and are refused at start."""
from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time

import pytest

from serving.config import Config
from serving.engine.protocol import EngineDeadError
from serving.launchers import make_specs
from serving.router.engine_client import build_disaggregated_client
from tests.serving.test_disagg_support import (LoopThread, assert_no_leaks, assert_none_ended, collect_all, make_cases,
                                               reference_outputs, tiny_config, token_ids, wait_until_drained)

CHUNK = 64


# ---- configuration (fast) ----
def test_replicas_are_instances_of_role_colocated():
    config = Config.from_dict({"mode": "colocated", "num_replicas": 3})
    specs = make_specs(config)
    assert [(s.name, s.role) for s in specs] == [("replica-0", "colocated"), ("replica-1", "colocated"),
                                                 ("replica-2", "colocated")]


def test_replicas_are_for_colocated_mode():
    with pytest.raises(ValueError, match="--num-replicas is for --mode colocated"):
        Config.from_dict({"mode": "disaggregated", "num_replicas": 2})
    with pytest.raises(ValueError, match="--num-replicas must be at least 1"):
        Config.from_dict({"num_replicas": 0})


def test_parallel_sizes_validate():
    with pytest.raises(ValueError, match="--tensor-parallel-size must be a whole number"):
        Config.from_dict({"tensor_parallel_size": 0})
    with pytest.raises(ValueError, match="collective_timeout_s must be positive"):
        Config.from_dict({"parallel": {"collective_timeout_s": 0}})
    config = Config.from_dict({"parallel": {"pipeline_parallel_size": 2}})
    assert config.parallel.pipeline_parallel_size == 2 and config.parallel.world_size == 2


# ---- end to end (slow: instance processes) ----
@pytest.fixture(scope="module")
def loop():
    thread = LoopThread()
    yield thread
    thread.close()


@contextlib.contextmanager
def replicas(loop, config):
    client = build_disaggregated_client(config)
    try:
        yield client
    finally:
        loop.run(client.shutdown())


def _state(client, name: str):
    return next(s for s in client.pool.instances if s.name == name)


@pytest.mark.slow
def test_greedy_outputs_on_replicas_equal_the_single_engine(loop, tiny_model_dir):
    single = tiny_config(tiny_model_dir, max_num_batched_tokens=CHUNK)
    cases = make_cases("replicas", 11, [1, 5, 16, 17, 33, 64, 100, 150], [1, 9, 24])
    expected = reference_outputs(single, cases)
    config = tiny_config(tiny_model_dir, max_num_batched_tokens=CHUNK, num_replicas=2)
    with replicas(loop, config) as client:
        got = loop.run(collect_all(client, cases))
        for case in cases:
            assert not isinstance(got[case.request_id], BaseException), got[case.request_id]
            assert token_ids(got[case.request_id]) == token_ids(expected[case.request_id]), case.request_id
            assert got[case.request_id][-1].finish_reason == expected[case.request_id][-1].finish_reason
        assert_no_leaks(loop.run(wait_until_drained(client)))
        stats = client.get_stats()
        assert set(stats.extra["instances"]) == {"replica-0", "replica-1"}
        assert client.is_healthy()


def _kill_replica_mid_stream(loop, client, cases, num_tokens_before_kill=3):
    """SIGKILL replica-0 once every stream has its first tokens; (its requests then, results). The
    cases' outputs must be long enough that replica-0 cannot have generated them all while the test's
    loop (starved on a loaded box) was still waiting for the other streams' first tokens: a request
    whose last tokens are already on their way when the kill lands finishes normally."""
    progress = {c.request_id: 0 for c in cases}

    async def stream(case):
        outputs = []
        async for output in client.generate(case.request_id, case.prompt_token_ids, case.params):
            outputs.append(output)
            progress[case.request_id] += len(output.new_token_ids)
        return outputs

    async def run():
        tasks = [asyncio.ensure_future(stream(c)) for c in cases]
        deadline = time.monotonic() + 120
        while min(progress.values()) < num_tokens_before_kill:
            assert_none_ended(tasks, deadline)
            await asyncio.sleep(0.005)
        victim = _state(client, "replica-0")
        holders = victim.num_active
        os.kill(victim.launched.info.pid, signal.SIGKILL)
        return holders, await asyncio.gather(*tasks, return_exceptions=True)

    return loop.run(run())


@pytest.mark.slow
def test_a_killed_replica_fails_only_its_requests_and_is_restarted(loop, tiny_model_dir):
    single = tiny_config(tiny_model_dir, max_num_batched_tokens=CHUNK)
    cases = make_cases("replica-kill", 12, [20, 35, 50, 65, 80, 95], [400])
    expected = reference_outputs(single, cases)
    config = tiny_config(tiny_model_dir, max_num_batched_tokens=CHUNK, num_replicas=2)
    with replicas(loop, config) as client:
        holders, results = _kill_replica_mid_stream(loop, client, cases)
        failed = [r for r in results if isinstance(r, BaseException)]
        assert 0 < holders < len(cases)  # requests that arrived together were spread over both
        assert len(failed) == holders
        for error in failed:
            assert isinstance(error, EngineDeadError) and "colocated instance replica-0 failed" in str(error)
        for case, outputs in zip(cases, results):
            if not isinstance(outputs, BaseException):
                assert token_ids(outputs) == token_ids(expected[case.request_id])

        async def wait_restarted():
            replica0 = _state(client, "replica-0")
            while not (replica0.up and replica0.num_restarts == 1):
                await asyncio.sleep(0.1)
        loop.run(asyncio.wait_for(wait_restarted(), 180))
        later = make_cases("after-replica-kill", 13, [30, 31, 32, 33], [8])
        got = loop.run(collect_all(client, later))
        later_expected = reference_outputs(single, later)
        for case in later:
            assert token_ids(got[case.request_id]) == token_ids(later_expected[case.request_id])
        assert_no_leaks(loop.run(wait_until_drained(client)))


@pytest.mark.slow
def test_a_killed_replicas_requests_continue_elsewhere_when_asked(loop, tiny_model_dir):
    single = tiny_config(tiny_model_dir, max_num_batched_tokens=CHUNK)
    cases = make_cases("replica-reprefill", 14, [20, 35, 50, 65], [400])
    expected = reference_outputs(single, cases)
    config = tiny_config(tiny_model_dir, max_num_batched_tokens=CHUNK, num_replicas=2,
                         reprefill_on_decode_failure=True, restart_failed_instances=False)
    with replicas(loop, config) as client:
        holders, results = _kill_replica_mid_stream(loop, client, cases)
        assert 0 < holders < len(cases)
        for case, outputs in zip(cases, results):
            assert not isinstance(outputs, BaseException), outputs
            assert token_ids(outputs) == token_ids(expected[case.request_id])
        assert client.get_stats().extra["router"]["num_reprefills_total"] == holders
        assert_no_leaks(loop.run(wait_until_drained(client)))
