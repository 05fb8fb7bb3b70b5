"""Disaggregated serving between instances of different tensor-parallel plans: a prefill and a decode
engine in one process, stepped by hand, each with its real rank processes (gloo and shared-memory
collectives on CPU), the KV going over gRPC from the prefill ranks that hold each head to the decode
ranks that own it. Greedy output equals colocated TP = 1; each decode rank is sent exactly its heads."""
from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest

from serving.engine.engine import build_engine
from serving.engine.protocol import EngineDeadError
from serving.router.engine_client import build_disaggregated_client
from tests.serving.test_disagg_engine import _check_drained, _disaggregated, _reference
from tests.serving.test_disagg_support import (LoopThread, assert_no_leaks, assert_none_ended, children_running,
                                               collect_all, greedy, make_cases, make_prompts, reference_outputs,
                                               tiny_config, token_ids, wait_until_drained)

TP_WORKER = b"serving.runner.rank_hosts"

pytestmark = pytest.mark.slow


def _engine(model_dir: str, role: str, tp: int, pp: int = 1, **changes):
    return build_engine(tiny_config(model_dir, kv_transfer_stall_timeout_s=5.0, tensor_parallel_size=tp,
                                    pipeline_parallel_size=pp, **changes), role)


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    engine = _engine(tiny_model_dir, "colocated", 1)
    cache = {}

    def tokens(prompt, params):
        key = (tuple(prompt), params.max_tokens)
        if key not in cache:
            cache[key] = token_ids(_reference(engine, prompt, params))
        return cache[key]
    yield tokens
    engine.close()


@pytest.mark.parametrize("prefill_tp, decode_tp, prefill_pp, decode_pp",
                         [(2, 1, 1, 1), (1, 2, 1, 1), (2, 2, 1, 1), (1, 4, 1, 1), (1, 2, 2, 1), (2, 1, 1, 2)],
                         ids=["prefill-tp2-decode-tp1", "prefill-tp1-decode-tp2", "tp2-tp2", "prefill-tp1-decode-tp4",
                              "prefill-pp2-decode-tp2", "prefill-tp2-decode-pp2"])
def test_output_equals_colocated_tp1_and_each_decode_rank_gets_its_heads(tiny_model_dir, reference, prefill_tp,
                                                                         decode_tp, prefill_pp, decode_pp):
    _check_transfers(_engine(tiny_model_dir, "prefill", prefill_tp, prefill_pp),
                     _engine(tiny_model_dir, "decode", decode_tp, decode_pp), decode_tp, reference)


def test_stages_split_differently_on_the_two_sides_move_each_layer_to_its_stage(tiny_model_dir, reference):
    """--pp-layer-partition 3,1 on the prefill side, 1,3 on the decode side: every layer's KV goes
    from the stage that computed it to the stage that holds it."""
    prefill = _engine(tiny_model_dir, "prefill", 1, 2, pp_layer_partition="3,1")
    decode = _engine(tiny_model_dir, "decode", 1, 2, pp_layer_partition="1,3")
    assert prefill.kv_layout.pp_partition == (3, 1) and decode.kv_layout.pp_partition == (1, 3)
    assert [c.shape[0] for c in decode.connector.receives._server.receiver.kv_caches] == [1, 3]
    _check_transfers(prefill, decode, 1, reference)


def _check_transfers(prefill, decode, decode_tp: int, reference) -> None:
    decode_pp = decode.kv_layout.pp_size
    try:
        assert len(decode.connector.receives._server.receiver.kv_caches) == decode_tp * decode_pp
        prompts = make_prompts(31, [45, 7])
        params = greedy(10)
        for prompt in prompts:
            first, rest = _disaggregated(prefill, decode, prompt, params, decode.connector.address)
            assert [first.new_token_ids[0]] + token_ids(rest) == reference(prompt, params)
            assert rest[-1].kv_transfer == "transferred"
        counters = decode.transfer_counters()
        assert counters["num_transfers_received"] == 2 and counters["num_recompute_fallbacks"] == 0
        # what each decode rank owns of each block of each layer, and nothing more
        layout = decode.kv_layout
        blocks = sum(-(-len(p) // layout.block_size) for p in prompts)
        # (each layer on the decode ranks of one stage)
        assert counters["num_bytes_received"] == blocks * layout.num_layers * decode_tp * layout.num_bytes_per_layer_block
        assert prefill.transfer_counters()["num_bytes_sent"] == counters["num_bytes_received"]
        _check_drained(prefill, decode)
    finally:
        prefill.close()
        decode.close()


def test_a_prompt_in_chunks_on_pipeline_stages_is_sent_only_once_its_last_chunk_is_through(tiny_model_dir,
                                                                                          reference):
    """Prefill PP=2 with 16-token steps: a 45-token prompt's chunks are in flight in consecutive plans;
    the later stage's layers are sent when the plan of the last chunk is through it, not the first."""
    prefill = _engine(tiny_model_dir, "prefill", 1, 2, max_num_batched_tokens=16)
    decode = _engine(tiny_model_dir, "decode", 1)
    try:
        for prompt in make_prompts(41, [45, 33]):
            first, rest = _disaggregated(prefill, decode, prompt, greedy(8), decode.connector.address)
            assert [first.new_token_ids[0]] + token_ids(rest) == reference(prompt, greedy(8))
        assert prefill.core.num_overlapped_plans > 0
        _check_drained(prefill, decode)
    finally:
        prefill.close()
        decode.close()


# ---- a deployment: real instance processes, their engine processes and ranks ----

def _descendants(pid: int, module: bytes) -> list[int]:
    """Live processes under pid (any depth) whose command line names `module`."""
    found, frontier = [], [pid]
    while frontier:
        parent = frontier.pop()
        for child in children_running(parent, b""):
            frontier.append(child)
            with open(f"/proc/{child}/cmdline", "rb") as f:
                if module in f.read():
                    found.append(child)
    return found


def test_a_decode_rank_killed_mid_stream_fails_its_streams_and_the_instance_comes_back(tiny_model_dir):
    """prefill TP=2 -> decode TP=2 through the router: output equals colocated TP=1; kill -9 decode-0's
    rank 1 while streams run: they fail with a clear error (nothing hangs), decode-0 is restarted with a
    whole group, serves correctly again, and nothing leaks."""
    colocated = tiny_config(tiny_model_dir)
    config = tiny_config(tiny_model_dir, mode="disaggregated", prefill_overrides={"tensor_parallel_size": 2},
                         decode_overrides={"tensor_parallel_size": 2})
    loop = LoopThread()
    client = build_disaggregated_client(config)
    try:
        first = make_cases("tp-before", 11, [30, 47], [6])
        got = loop.run(collect_all(client, first))
        expected = reference_outputs(colocated, first)
        for case in first:
            assert token_ids(got[case.request_id]) == token_ids(expected[case.request_id])

        async def decode_0():  # the pool lives on the client's loop
            return next(s for s in client.pool.instances if s.name == "decode-0")
        decode0 = loop.run(decode_0())
        ranks = _descendants(decode0.launched.info.pid, TP_WORKER)
        assert len(ranks) == 1  # decode-0's rank 1 (rank 0 is its engine process)

        cases = make_cases("tp-kill", 12, [20, 40], [200])
        progress = {c.request_id: 0 for c in cases}

        async def stream(case):
            async for output in client.generate(case.request_id, case.prompt_token_ids, case.params):
                progress[case.request_id] += len(output.new_token_ids)

        async def kill_mid_stream():
            tasks = [asyncio.ensure_future(stream(c)) for c in cases]
            deadline = time.monotonic() + 120
            while min(progress.values()) < 3:
                assert_none_ended(tasks, deadline)
                await asyncio.sleep(0.005)
            os.kill(ranks[0], signal.SIGKILL)
            return await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 120)

        results = loop.run(kill_mid_stream(), timeout_s=240)
        for error in results:
            assert isinstance(error, EngineDeadError) and "decode instance decode-0 failed" in str(error)

        async def wait_restarted():
            while not (decode0.up and decode0.num_restarts == 1):
                await asyncio.sleep(0.1)
        loop.run(asyncio.wait_for(wait_restarted(), 180), timeout_s=200)
        assert len(_descendants(decode0.launched.info.pid, TP_WORKER)) == 1  # a new rank 1
        later = make_cases("tp-after", 13, [33, 18], [8])
        got = loop.run(collect_all(client, later))
        expected = reference_outputs(colocated, later)
        for case in later:
            assert token_ids(got[case.request_id]) == token_ids(expected[case.request_id])
        assert_no_leaks(loop.run(wait_until_drained(client)))
    finally:
        loop.run(client.shutdown(), timeout_s=120)
        loop.close()
