"""Disaggregated serving end to end on the tiny model: real instance processes (local launcher), real
gRPC, real KV transfer. Greedy outputs must equal a colocated engine's, output for output, under
concurrency; stop strings, stop tokens and aborts behave as in AsyncLLM; nothing leaks; killed
instances (kill -9) fail or re-route what they held and the server stays up."""
from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time

import pytest

from scheduler.sampling_params import SamplingParams
from serving.launchers import make_specs
from serving.router.engine_client import build_disaggregated_client
from serving.engine.protocol import EngineDeadError, RequestRejectedError
from tests.serving.test_disagg_support import (Case, LoopThread, assert_no_leaks, assert_none_ended, collect,
                                               collect_all, comparable, greedy, instance_children, make_cases,
                                               make_prompts, reference_outputs, tiny_config, token_ids,
                                               wait_until_drained)

pytestmark = pytest.mark.slow

CHUNK = 64  # prefill budget per step: the longer prompts are prefilled in chunks
# prompt lengths around block boundaries (16), a one-token prompt, and multi-chunk prompts
LENGTHS = [1, 5, 15, 16, 17, 31, 32, 33, 64, 100, 150, 250]
MAX_TOKENS = [1, 8, 17, 24]


@pytest.fixture(scope="module")
def loop():
    thread = LoopThread()
    yield thread
    thread.close()


@pytest.fixture(scope="module")
def colocated_config(tiny_model_dir):
    return tiny_config(tiny_model_dir, max_num_batched_tokens=CHUNK)


@contextlib.contextmanager
def deployment(loop, config):
    client = build_disaggregated_client(config)
    try:
        yield client
    finally:
        loop.run(client.shutdown())


# class scope: a deployment's processes live only as long as the tests that use it
@pytest.fixture(scope="class")
def one_one(loop, tiny_model_dir):
    config = tiny_config(tiny_model_dir, mode="disaggregated", max_num_batched_tokens=CHUNK)
    with deployment(loop, config) as client:
        yield client


@pytest.fixture(scope="class")
def two_one(loop, tiny_model_dir):
    # prefill-0 admits one request at a time in small chunks, so that a queue builds up there; its
    # death is tested last on this deployment, without a restart
    config = tiny_config(tiny_model_dir, mode="disaggregated", num_prefill=2, max_num_batched_tokens=CHUNK,
                         prefill_overrides={"max_num_seqs": 1, "max_num_batched_tokens": 32},
                         restart_failed_instances=False)
    with deployment(loop, config) as client:
        yield client


async def wait_for_stats(client, ready, timeout_s: float = 15.0):
    """The client's stats once `ready(stats)` holds (they are polled from the instances)."""
    deadline = time.monotonic() + timeout_s
    while not ready(stats := client.get_stats()) and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    return stats


def _state(client, name: str):
    return next(s for s in client.pool.instances if s.name == name)


# ---- correctness ----
def check_greedy_equals_colocated(loop, client, colocated_config, prefix: str):
    cases = make_cases(prefix, 1, LENGTHS, MAX_TOKENS)
    expected = reference_outputs(colocated_config, cases)
    got = loop.run(collect_all(client, cases))
    for case in cases:
        assert not isinstance(got[case.request_id], BaseException), got[case.request_id]
        assert comparable(got[case.request_id]) == comparable(expected[case.request_id]), case.request_id
        if case.params.max_tokens > 1:  # each says where its KV came from
            assert got[case.request_id][-1].kv_transfer == "transferred", case.request_id
    assert_no_leaks(loop.run(wait_until_drained(client)))
    # every request that decodes past its first token got its KV by transfer, none by recompute
    num_decoded = sum(1 for c in cases if c.params.max_tokens > 1)
    stats = loop.run(wait_for_stats(client, lambda s: s.extra["kv_transfer"]["num_transfers_received"]
                                    >= num_decoded))
    assert stats.extra["kv_transfer"]["num_recompute_fallbacks"] == 0
    transfer, instances = stats.extra["kv_transfer"], stats.extra["instances"]
    # instances on one host: every prompt's KV was written by the prefill instance into the decode
    # instance's shared pool (one-sided); each instance reports its transfer latencies
    assert transfer["num_one_sided_received"] == transfer["num_transfers_received"]
    latency = stats.extra["histograms"]["kv_transfer_latency_seconds"]
    assert {info["role"] for info in latency.values()} == {"prefill", "decode"}
    assert all(info["count"] >= 1 and info["counts"][-1] == info["count"] for info in latency.values())
    assert transfer["num_bytes_received"] > 0 and transfer["seconds_sending"] > 0
    assert stats.extra["router"]["num_reroutes_total"] == 0
    assert set(instances) == {spec.name for spec in make_specs(client.config)}
    assert all(s["up"] == 1 and s["queue_depth"] == 0 for s in instances.values())


class TestOneToOne:
    def test_greedy_outputs_equal_colocated_under_concurrency(self, loop, one_one, colocated_config):
        check_greedy_equals_colocated(loop, one_one, colocated_config, "1p1d")

    def test_stops_and_logprobs_match_colocated(self, loop, one_one, colocated_config):
        prompts = make_prompts(2, [20, 40, 9, 70])
        plain = [Case(f"plain-{i}", p, greedy(24)) for i, p in enumerate(prompts)]
        base = reference_outputs(colocated_config, plain)
        texts = ["".join(o.new_text for o in base[c.request_id]) for c in plain]
        tokens = [token_ids(base[c.request_id]) for c in plain]
        middle = texts[0][len(texts[0]) // 2:len(texts[0]) // 2 + 3]
        assert middle.strip(), texts[0]
        cases = [
            Case("stop-string", prompts[0], greedy(24, stop=[middle])),
            Case("stop-string-kept", prompts[0],
                 greedy(24, stop=[middle, "zzz-never"], include_stop_str_in_output=True)),
            Case("stop-token", prompts[1], greedy(24, stop_token_ids=[tokens[1][5]])),
            # ends on the prefill side
            Case("stop-first-token", prompts[2], greedy(24, stop_token_ids=[tokens[2][0]])),
            Case("logprobs", prompts[3], greedy(12, logprobs=3)),
            # the decode instance's generator continues past the draw the prefill instance made
            Case("seeded", prompts[1], SamplingParams(temperature=1.0, max_tokens=12, seed=7, ignore_eos=True)),
        ]
        expected = reference_outputs(colocated_config, cases)
        got = loop.run(collect_all(one_one, cases))
        for case in cases:
            assert comparable(got[case.request_id]) == comparable(expected[case.request_id]), case.request_id
        assert got["stop-string"][-1].stop_reason == middle
        assert got["stop-first-token"][-1].finish_reason == "stop" and len(got["stop-first-token"]) == 1
        for mine, theirs in zip(got["logprobs"], expected["logprobs"]):
            assert mine.new_logprobs[0].logprob == pytest.approx(theirs.new_logprobs[0].logprob, abs=1e-4)
            assert [t for t, _ in mine.new_logprobs[0].top] == [t for t, _ in theirs.new_logprobs[0].top]
        assert_no_leaks(loop.run(wait_until_drained(one_one)))


    def test_stop_token_id_outside_the_vocabulary_is_rejected(self, loop, one_one):
        # the API layer refuses it before sending; this is the instances' own check, whose
        # INVALID_ARGUMENT the router turns into RequestRejectedError (a 400)
        prompt = make_prompts(6, [10])[0]
        with pytest.raises(RequestRejectedError, match="stop_token_ids contains 2048"):
            loop.run(collect(one_one, Case("bad-stop", prompt, greedy(4, stop_token_ids=[2048]))))
        assert len(loop.run(collect(one_one, Case("good-stop", prompt, greedy(4, stop_token_ids=[2047]))))) >= 1
        assert_no_leaks(loop.run(wait_until_drained(one_one)))

    def test_first_token_reaches_the_client_before_decoding(self, loop, one_one):
        async def first_then_rest():
            stream = one_one.generate("ttft", make_prompts(3, [30])[0], greedy(6))
            first = await stream.__anext__()
            rest = [o async for o in stream]
            return first, rest
        first, rest = loop.run(first_then_rest())
        assert len(first.new_token_ids) == 1 and not first.finished and first.queue_time_s is not None
        assert len(rest) == 5 and rest[-1].finish_reason == "length" and rest[-1].num_output_tokens == 6


    def test_metrics_scraped_right_after_a_request_show_its_kv_bytes(self, loop, one_one):
        import httpx

        from serving.api import build_app
        from serving.config import ServerConfig

        def value(text: str, name: str, prefix: str) -> float:
            lines = [line for line in text.splitlines() if line.startswith(name + "{") and line.startswith(prefix)]
            return float(lines[0].rsplit(" ", 1)[1]) if lines else 0.0

        async def run():
            app = build_app(one_one, ServerConfig())
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as http:
                names = ["pdserve:kv_transfer_num_bytes_received_total",
                         # the transfer-latency histogram of each instance
                         'pdserve:kv_transfer_latency_seconds_count{instance="decode-0"',
                         'pdserve:kv_transfer_latency_seconds_count{instance="prefill-0"']
                text = (await http.get("/metrics")).text
                before = [value(text, name.split("{")[0], name) for name in names]
                await collect(one_one, Case("fresh-metrics", make_prompts(31, [64])[0], greedy(3)))
                text = (await http.get("/metrics")).text
                return before, [value(text, name.split("{")[0], name) for name in names]

        before, after = loop.run(run())
        # no health-check interval to wait for: the scrape polled the instances
        assert all(a > b for a, b in zip(after, before)), (before, after)

    # ---- aborts and leaks ----
    def test_mixed_run_with_aborts_leaks_nothing(self, loop, one_one, colocated_config):
        cases = make_cases("mixed", 4, [12, 40, 80, 17, 33, 64, 5, 100, 48, 20, 60, 90], [200])

        async def run():
            async def until(case, num_tokens):  # the client goes away after num_tokens
                stream = one_one.generate(case.request_id, case.prompt_token_ids, case.params)
                seen = 0
                async for output in stream:
                    seen += len(output.new_token_ids)
                    if seen >= num_tokens:
                        break
                await stream.aclose()
                return seen

            async def aborted(case):  # the server-side abort: the stream ends with finish_reason abort
                outputs = []
                async for output in one_one.generate(case.request_id, case.prompt_token_ids, case.params):
                    outputs.append(output)
                    if len(outputs) == 3:
                        await one_one.abort(case.request_id)
                return outputs

            complete = [asyncio.ensure_future(collect(one_one, c)) for c in cases[:4]]
            gone = [asyncio.ensure_future(until(c, 2)) for c in cases[4:7]]
            abort = [asyncio.ensure_future(aborted(c)) for c in cases[7:10]]
            cancelled = [asyncio.ensure_future(collect(one_one, c)) for c in cases[10:]]
            await asyncio.sleep(0.05)
            for task in cancelled:  # before (or while) the prefill runs
                task.cancel()
            return (await asyncio.gather(*complete), await asyncio.gather(*gone), await asyncio.gather(*abort),
                    await asyncio.gather(*cancelled, return_exceptions=True))

        complete, gone, aborted, cancelled = loop.run(run())
        expected = reference_outputs(colocated_config, cases[:4])
        for case, outputs in zip(cases, complete):
            assert token_ids(outputs) == token_ids(expected[case.request_id])
        assert all(n >= 2 for n in gone)
        for outputs in aborted:
            assert outputs[-1].finished and outputs[-1].finish_reason == "abort" and len(outputs) < 200
        assert all(isinstance(r, asyncio.CancelledError) for r in cancelled), [
            r if isinstance(r, BaseException) else f"finished: {len(r)} outputs" for r in cancelled]
        assert_no_leaks(loop.run(wait_until_drained(one_one)))


class TestTwoToOne:
    def test_greedy_outputs_equal_colocated_under_concurrency(self, loop, two_one, colocated_config):
        check_greedy_equals_colocated(loop, two_one, colocated_config, "2p1d")

    def test_killed_prefill_instance_has_its_queued_requests_rerouted(self, loop, two_one, colocated_config):
        cases = make_cases("requeue", 5, [300] * 8, [6])
        expected = reference_outputs(colocated_config, cases)

        async def run():
            prefill0 = _state(two_one, "prefill-0")
            tasks = [asyncio.ensure_future(collect(two_one, c)) for c in cases]
            deadline = time.monotonic() + 60
            while prefill0.num_queued_prefill_tokens < 2 * 300:  # two or more waiting on prefill-0
                assert_none_ended(tasks, deadline)
                await asyncio.sleep(0.001)
            os.kill(prefill0.launched.info.pid, signal.SIGKILL)
            return await asyncio.gather(*tasks, return_exceptions=True)

        results = loop.run(run())
        for case, outputs in zip(cases, results):
            assert not isinstance(outputs, BaseException), outputs
            assert token_ids(outputs) == token_ids(expected[case.request_id])
        stats = two_one.get_stats()
        assert stats.extra["router"]["num_reroutes_total"] >= 1
        assert stats.extra["instances"]["prefill-0"]["up"] == 0
        assert two_one.is_healthy()  # prefill-1 and decode-0 serve on
        later = make_cases("after-prefill-kill", 6, [40], [5])
        assert token_ids(loop.run(collect(two_one, later[0]))) == \
            token_ids(reference_outputs(colocated_config, later)[later[0].request_id])
        assert_no_leaks(loop.run(wait_until_drained(two_one)))


def _kill_decode_mid_stream(loop, client, cases, num_tokens_before_kill=3):
    """Stream every case; once each has num_tokens_before_kill tokens, kill -9 decode-0."""
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
        holders = _state(client, "decode-0").num_active
        os.kill(_state(client, "decode-0").launched.info.pid, signal.SIGKILL)
        return holders, await asyncio.gather(*tasks, return_exceptions=True)

    return loop.run(run())


def test_killed_decode_instance_fails_its_streams_and_restarts(loop, tiny_model_dir, colocated_config):
    config = tiny_config(tiny_model_dir, mode="disaggregated", num_decode=2, max_num_batched_tokens=CHUNK)
    cases = make_cases("decode-kill", 7, [20, 35, 50, 65, 80, 95], [150])
    expected = reference_outputs(colocated_config, cases)
    with deployment(loop, config) as client:
        holders, results = _kill_decode_mid_stream(loop, client, cases)
        failed = [r for r in results if isinstance(r, BaseException)]
        assert 0 < holders < len(cases)  # requests that arrived together were spread over both
        assert len(failed) == holders  # the requests on decode-0, and only those
        for error in failed:
            assert isinstance(error, EngineDeadError) and "decode instance decode-0 failed" in str(error)
        for case, outputs in zip(cases, results):
            if not isinstance(outputs, BaseException):  # the others finish, correctly
                assert token_ids(outputs) == token_ids(expected[case.request_id])
        assert client.get_stats().extra["router"]["num_decode_failures_total"] == holders

        async def wait_restarted():
            decode0 = _state(client, "decode-0")
            while not (decode0.up and decode0.num_restarts == 1):
                await asyncio.sleep(0.1)
        loop.run(asyncio.wait_for(wait_restarted(), 180))
        router = client.get_stats().extra["router"]
        assert router["num_instance_failures_total"] == 1 and router["num_instance_restarts_total"] == 1
        later = make_cases("after-decode-kill", 8, [30, 31, 32, 33], [8])
        got = loop.run(collect_all(client, later))
        later_expected = reference_outputs(colocated_config, later)
        for case in later:
            assert token_ids(got[case.request_id]) == token_ids(later_expected[case.request_id])
        assert_no_leaks(loop.run(wait_until_drained(client)))


def test_killed_decode_instance_requests_are_prefilled_again(loop, tiny_model_dir, colocated_config):
    config = tiny_config(tiny_model_dir, mode="disaggregated", num_decode=2, max_num_batched_tokens=CHUNK,
                         reprefill_on_decode_failure=True, restart_failed_instances=False)
    cases = make_cases("reprefill", 9, [20, 35, 50, 65], [100])
    expected = reference_outputs(colocated_config, cases)
    with deployment(loop, config) as client:
        holders, results = _kill_decode_mid_stream(loop, client, cases)
        assert 0 < holders < len(cases)
        for case, outputs in zip(cases, results):
            assert not isinstance(outputs, BaseException), outputs
            assert token_ids(outputs) == token_ids(expected[case.request_id])
            assert outputs[-1].num_output_tokens == 100 and outputs[-1].finish_reason == "length"
        router = client.get_stats().extra["router"]
        assert router["num_reprefills_total"] == holders
        assert_no_leaks(loop.run(wait_until_drained(client)))


def test_incompatible_instances_are_refused_before_serving(tiny_model_dir):
    config = tiny_config(tiny_model_dir, mode="disaggregated", prefill_overrides={"block_size": 8})
    running_before = set(instance_children(os.getpid()))
    with pytest.raises(ValueError) as error:
        build_disaggregated_client(config)
    assert "prefill-0 cannot send KV to decode instance decode-0" in str(error.value)
    assert "block_size: prefill=8 decode=16" in str(error.value)
    assert set(instance_children(os.getpid())) <= running_before, "the refused instances were left running"
