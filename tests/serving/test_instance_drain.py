"""A real instance (tiny model, engine on a thread, real gRPC) drains on stop: it answers its running
stream in full, and then stays up until a health check has heard that it drained, so that the router
never takes a drained instance for a crashed one."""
from __future__ import annotations

import asyncio
import dataclasses

import grpc

from scheduler.sampling_params import SamplingParams
from serving.instance.servicer import InstanceSpec, linger_s, serve_instance
from serving.launchers import LocalLauncher, make_launcher
from serving.router.instance_client import InstanceClient
from tests.serving.test_disagg_support import tiny_config

TOKEN = "drain-test-token"
MAX_TOKENS = 24
DEADLINE_S = 120.0


def _serve(config, stop: asyncio.Event):
    ready: asyncio.Future = asyncio.get_running_loop().create_future()
    spec = InstanceSpec("colocated-0", "colocated", config, TOKEN)
    task = asyncio.ensure_future(serve_instance(spec, ready.set_result, stop))
    return task, ready


async def _read_all(call) -> list[int]:
    tokens = []
    while True:
        message = await asyncio.wait_for(call.read(), DEADLINE_S)
        assert message is not grpc.aio.EOF, "the stream ended before its request finished"
        tokens += list(message.new_token_ids)
        if message.finished:
            assert message.finish_reason == "length"
            return tokens


def test_a_drained_instance_waits_for_a_health_check_to_hear_it_before_it_exits(tiny_model_dir):
    # a health interval so long that only the health call below can end the wait within the test
    config = tiny_config(tiny_model_dir, engine_process=False, health_check_interval_s=60.0)

    async def run():
        stop = asyncio.Event()
        task, ready = _serve(config, stop)
        address = (await asyncio.wait_for(ready, DEADLINE_S)).address
        client = InstanceClient(address, DEADLINE_S, TOKEN)
        try:
            call = client.generate("r", [1, 2, 3, 4], SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True))
            first = await asyncio.wait_for(call.read(), DEADLINE_S)
            stop.set()  # as a SIGTERM does
            tokens = list(first.new_token_ids) + await _read_all(call)
            assert len(tokens) == MAX_TOKENS
            assert await call.code() == grpc.StatusCode.OK
            await asyncio.sleep(0.2)  # let the drain see the stream answered
            assert not task.done(), "the instance exited before anyone heard that it drained"
            health = await client.health()
            assert health.healthy and health.draining
            await asyncio.wait_for(task, DEADLINE_S)  # heard: it stops now
        finally:
            stop.set()
            await client.close()
            if not task.done():
                await asyncio.wait_for(task, DEADLINE_S)

    asyncio.run(run())


def test_an_instance_with_no_streams_stops_at_once(tiny_model_dir):
    """Nothing to read out (a server stopping after its router drained): no wait for a health check."""
    config = tiny_config(tiny_model_dir, engine_process=False, health_check_interval_s=60.0)

    async def run():
        stop = asyncio.Event()
        task, ready = _serve(config, stop)
        await asyncio.wait_for(ready, DEADLINE_S)
        stop.set()
        await asyncio.wait_for(task, DEADLINE_S / 2)  # far less than the 180 s it would wait

    asyncio.run(run())


def test_the_launchers_let_a_stopped_instance_drain_and_wait_for_its_health_check(tiny_model_dir):
    """Neither launcher kills a stopped instance before its drain (--shutdown-timeout) and its wait for a
    health check (3 health intervals) could have ended: with a 10 s interval that wait is 30 s, past
    a flat stop timeout."""
    config = tiny_config(tiny_model_dir, health_check_interval_s=10.0, shutdown_timeout_s=20.0)
    assert linger_s(config) == 30.0
    local = make_launcher(config)
    assert isinstance(local, LocalLauncher) and local.stop_budget_s >= 20.0 + 30.0
    ray_config = dataclasses.replace(config, deploy=dataclasses.replace(config.deploy, launcher="ray"))
    ray_launcher = make_launcher(ray_config)
    assert type(ray_launcher).__name__ == "RayLauncher" and ray_launcher.stop_budget_s == local.stop_budget_s
