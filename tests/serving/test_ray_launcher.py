"""The Ray launcher end to end: a local Ray cluster started by the launcher, a prefill and a decode
instance as Ray actors in one placement group, served over HTTP to the official openai client; a
killed actor process is restarted by Ray and taken back by the router; everything stops at shutdown."""
from __future__ import annotations

import asyncio
import os
import signal
import time

import openai
import pytest

from serving.api.server import run_server
from serving.config import ServerConfig
from serving.router.engine_client import build_disaggregated_client
from tests.servers import free_port
from tests.serving.test_disagg_support import (
    LoopThread,
    assert_no_leaks,
    collect_all,
    make_cases,
    reference_outputs,
    tiny_config,
    token_ids,
    wait_until_drained,
)

pytestmark = pytest.mark.slow

ray = pytest.importorskip("ray", reason="the Ray launcher needs ray (a dependency of pdserve)")


async def _wait_healthy(base_url: str, timeout_s: float = 60.0) -> None:
    import httpx
    deadline = time.monotonic() + timeout_s
    async with httpx.AsyncClient() as http:
        while time.monotonic() < deadline:
            try:
                if (await http.get(f"{base_url}/health", timeout=5)).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.1)
    raise AssertionError(f"the server at {base_url} never became healthy")


def test_ray_launcher_serves_restarts_and_shuts_down(tiny_model_dir):
    assert not ray.is_initialized()
    config = tiny_config(tiny_model_dir, mode="disaggregated", launcher="ray", same_node=True)
    reference_config = tiny_config(tiny_model_dir)
    loop = LoopThread()
    client = build_disaggregated_client(config)
    try:
        assert ray.is_initialized()  # the launcher started a local cluster
        port = free_port()
        base_url = f"http://127.0.0.1:{port}"
        server = loop.run(_start_server(client, port))
        loop.run(_wait_healthy(base_url))

        # over HTTP: the text equals a colocated engine's for the same token ids
        cases = make_cases("ray", 11, [12, 40], [10])
        expected = reference_outputs(reference_config, cases)
        api = openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", timeout=120)
        model = api.models.list().data[0].id
        for case in cases:
            text = "".join(o.new_text for o in expected[case.request_id])
            reply = api.completions.create(model=model, prompt=case.prompt_token_ids, max_tokens=10,
                                           temperature=0, extra_body={"ignore_eos": True})
            assert reply.choices[0].text == text and reply.choices[0].finish_reason == "length"
            chunks = api.completions.create(model=model, prompt=case.prompt_token_ids, max_tokens=10,
                                            temperature=0, stream=True, extra_body={"ignore_eos": True})
            assert "".join(c.choices[0].text for c in chunks if c.choices) == text

        # kill -9 the decode actor's process: Ray restarts the actor, the router takes it back
        states = loop.run(_states(client))
        old_address = states["decode-0"].launched.address
        os.kill(states["decode-0"].launched.info.pid, signal.SIGKILL)
        loop.run(_wait_restarted(client, "decode-0"), 240)
        assert states["decode-0"].launched.address != old_address
        later = make_cases("ray-after-restart", 12, [30, 31], [8])
        got = loop.run(collect_all(client, later))
        later_expected = reference_outputs(reference_config, later)
        for case in later:
            assert token_ids(got[case.request_id]) == token_ids(later_expected[case.request_id])
        assert_no_leaks(loop.run(wait_until_drained(client)))
        loop.run(_stop_server(server))  # run_server shuts the engine down as it stops
    finally:
        loop.run(client.shutdown())
        loop.close()
    assert not ray.is_initialized()  # the cluster it started is gone


async def _start_server(client, port: int) -> asyncio.Task:
    return asyncio.create_task(run_server(client, ServerConfig(port=port, log_level="warning")))


async def _stop_server(server: asyncio.Task) -> None:
    server.cancel()
    try:
        await server
    except asyncio.CancelledError:
        pass


async def _states(client) -> dict:
    return {s.name: s for s in client.pool.instances}


async def _wait_restarted(client, name: str) -> None:
    state = next(s for s in client.pool.instances if s.name == name)
    while not (state.up and state.num_restarts == 1):
        await asyncio.sleep(0.1)


def test_a_tensor_parallel_instance_runs_as_two_actors_in_one_placement_group(tiny_model_dir):
    """One colocated replica of two tensor-parallel ranks on a local Ray cluster: rank 0 is the instance's
    actor in bundle 0, rank 1 an actor its engine starts in bundle 1 of the same STRICT_PACK group; the
    output equals one rank's; a killed rank actor takes the engine down and it comes back whole."""
    assert not ray.is_initialized()
    config = tiny_config(tiny_model_dir, launcher="ray", tensor_parallel_size=2)
    loop = LoopThread()
    client = build_disaggregated_client(config)
    try:
        cases = make_cases("ray-tp", 13, [12, 40], [10])
        expected = reference_outputs(tiny_config(tiny_model_dir), cases)
        got = loop.run(collect_all(client, cases))
        for case in cases:
            assert token_ids(got[case.request_id]) == token_ids(expected[case.request_id])

        groups = ray.util.placement_group_table()
        (group_id, group), = [(k, g) for k, g in groups.items() if g["name"].startswith("pdserve-replica-0-")]
        assert group["strategy"] == "STRICT_PACK" and len(group["bundles"]) == 2 and group["state"] == "CREATED"
        # both bundles are held (Ray names a group's resources CPU_group_<id>): rank 0's actor and rank 1's
        assert ray.cluster_resources()[f"CPU_group_{group_id}"] == 2
        assert ray.available_resources().get(f"CPU_group_{group_id}", 0) == 0
        (rank_pid,) = _rank_host_pids()

        # kill -9 rank 1's actor process: the instance's engine dies and is restarted with a new rank 1
        os.kill(rank_pid, signal.SIGKILL)
        state = loop.run(_states(client))["replica-0"]

        async def back_up():
            deadline = time.monotonic() + 240
            while time.monotonic() < deadline:
                later = make_cases(f"ray-tp-after-{time.monotonic()}", 14, [20], [6])
                try:
                    out = await collect_all(client, later)
                    if state.up and all(o[-1].finish_reason == "length" for o in out.values()):
                        return later, out
                except Exception:  # noqa: BLE001 - failed while the engine restarts
                    pass
                await asyncio.sleep(0.5)
            raise AssertionError("the instance did not come back after its rank actor was killed")
        later, out = loop.run(back_up(), 300)
        later_expected = reference_outputs(tiny_config(tiny_model_dir), later)
        for case in later:
            assert token_ids(out[case.request_id]) == token_ids(later_expected[case.request_id])
        new_ranks = _rank_host_pids()
        assert len(new_ranks) == 1 and new_ranks[0] != rank_pid
        assert ray.available_resources().get(f"CPU_group_{group_id}", 0) == 0
        assert_no_leaks(loop.run(wait_until_drained(client)))
    finally:
        loop.run(client.shutdown())
        loop.close()
    assert not ray.is_initialized()


def _rank_host_pids() -> list[int]:
    """Live processes of Ray rank actors (Ray titles an actor's process ray::<class>)."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if f.read().startswith(b"ray::RankHost"):
                        pids.append(int(entry))
            except OSError:
                pass
    return pids


def test_disaggregated_instances_of_different_tensor_parallel_sizes_on_ray(tiny_model_dir):
    """prefill TP=1 and decode TP=2 as Ray actors (decode's two ranks in one STRICT_PACK group): the KV
    moves from the one prefill rank to both decode ranks, each its own head; output equals colocated."""
    assert not ray.is_initialized()
    config = tiny_config(tiny_model_dir, mode="disaggregated", launcher="ray",
                         decode_overrides={"tensor_parallel_size": 2})
    loop = LoopThread()
    client = build_disaggregated_client(config)
    try:
        cases = make_cases("ray-disagg-tp", 15, [12, 40], [10])
        expected = reference_outputs(tiny_config(tiny_model_dir), cases)
        got = loop.run(collect_all(client, cases))
        for case in cases:
            assert token_ids(got[case.request_id]) == token_ids(expected[case.request_id])
        groups = ray.util.placement_group_table()
        (group,) = [g for g in groups.values() if g["name"].startswith("pdserve-decode-0-")]
        assert group["strategy"] == "STRICT_PACK" and len(group["bundles"]) == 2
        assert len(_rank_host_pids()) == 1  # decode-0's rank 1
        router = client.get_stats().extra["router"]
        assert router["num_kv_transferred_total"] == len(cases)
        assert_no_leaks(loop.run(wait_until_drained(client)))
    finally:
        loop.run(client.shutdown())
        loop.close()
    assert not ray.is_initialized()


def test_pipeline_stages_run_as_actors_in_one_placement_group(tiny_model_dir):
    """A colocated replica of two pipeline stages on Ray: stage 1 is a rank actor in bundle 1 of the
    replica's STRICT_PACK group; the output equals one rank's."""
    assert not ray.is_initialized()
    config = tiny_config(tiny_model_dir, launcher="ray", pipeline_parallel_size=2)
    loop = LoopThread()
    client = build_disaggregated_client(config)
    try:
        cases = make_cases("ray-pp", 16, [12, 40, 25], [10])
        expected = reference_outputs(tiny_config(tiny_model_dir), cases)
        got = loop.run(collect_all(client, cases))
        for case in cases:
            assert token_ids(got[case.request_id]) == token_ids(expected[case.request_id])
        (group,) = [g for g in ray.util.placement_group_table().values() if g["name"].startswith("pdserve-replica-0-")]
        assert group["strategy"] == "STRICT_PACK" and len(group["bundles"]) == 2
        assert len(_rank_host_pids()) == 1  # stage 1
        assert_no_leaks(loop.run(wait_until_drained(client)))
    finally:
        loop.run(client.shutdown())
        loop.close()
    assert not ray.is_initialized()
