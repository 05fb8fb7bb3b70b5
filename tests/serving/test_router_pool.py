"""The router's pool against a real gRPC Instance service (in process, localhost) that streams a
reply in full and then stops, as a drained instance does before it exits.

What the instance sent before it stopped can still sit unread in the router's channel: an instance
found exited (drained or not) must let its streams read it out, where a hung one fails them at once.
"""
from __future__ import annotations

import asyncio

import grpc
import pytest

from scheduler.sampling_params import SamplingParams
from serving.config import Config, DeployConfig
from serving.instance._proto import instance_pb2 as pb
from serving.instance._proto import instance_pb2_grpc as pb_grpc
from serving.instance.servicer import InstanceSpec
from serving.launchers import LaunchedInstance
from serving.router.flow import InstanceFailed, RequestFlow, _Stream
from serving.router.pool import InstancePool

NUM_MESSAGES = 20


class _Replies(pb_grpc.InstanceServicer):
    """Generate streams NUM_MESSAGES outputs, the last one finished, and returns (or, `unfinished`,
    stops sending after the first half and waits); Health answers healthy (`draining` as set), or
    never (hung)."""

    def __init__(self) -> None:
        self.answered = asyncio.Event()
        self.hung = False
        self.draining = False
        self.unfinished = False

    async def Health(self, request, context):
        if self.hung:
            await asyncio.Event().wait()
        return pb.HealthResponse(healthy=True, draining=self.draining)

    async def Generate(self, request, context):
        for i in range(NUM_MESSAGES // 2 if self.unfinished else NUM_MESSAGES):
            last = i == NUM_MESSAGES - 1
            yield pb.GenerateOutput(request_id=request.request_id, new_token_ids=[i], finished=last,
                                    finish_reason="length" if last else "")
        self.answered.set()
        if self.unfinished:
            await asyncio.Event().wait()


async def _started() -> tuple[grpc.aio.Server, _Replies, str]:
    server = grpc.aio.server()
    servicer = _Replies()
    pb_grpc.add_InstanceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, servicer, f"127.0.0.1:{port}"


def _pool(address: str) -> InstancePool:
    launched = LaunchedInstance(InstanceSpec("decode-0", "decode", Config()), address,
                                pb.InstanceInfo(name="decode-0", role="decode"))
    deploy = DeployConfig(restart_failed_instances=False, instance_timeout_s=30.0)
    return InstancePool([launched], launcher=None, deploy=deploy, check_peer=None,
                        counters={"num_instance_failures": 0, "num_instance_restarts": 0})


async def _answered_then_stopped(draining: bool, unfinished: bool = False) -> tuple[InstancePool, _Stream]:
    """A stream whose reply the instance sent in full (or half of it, `unfinished`), nothing of it
    read; the instance then stops and is found down."""
    server, servicer, address = await _started()
    servicer.unfinished = unfinished
    pool = _pool(address)
    state = pool.instances[0]
    stream = _Stream(state, state.client.generate("r", [1, 2, 3], SamplingParams(max_tokens=NUM_MESSAGES)))
    await asyncio.wait_for(servicer.answered.wait(), 30)
    await server.stop(None)  # the process exits
    if draining:
        pool.mark_draining(state)
    await pool._check(state)  # the real health check: connection refused
    assert not state.up
    return pool, stream


def test_a_drained_instance_found_down_lets_its_streams_read_out_what_it_sent():
    async def run():
        pool, stream = await _answered_then_stopped(draining=True)
        tokens = []
        while True:
            message = await stream.read(10)
            tokens += list(message.new_token_ids)
            if message.finished:
                break
        assert tokens == list(range(NUM_MESSAGES)) and message.finish_reason == "length"
        assert pool.counters["num_instance_failures"] == 0  # drained, not crashed
        channel = stream.client._channel
        assert channel.get_state() != grpc.ChannelConnectivity.SHUTDOWN  # still open: the stream reads
        stream.close()
        for _ in range(100):  # the pool closes the drained incarnation's channel once its streams are done
            if channel.get_state() == grpc.ChannelConnectivity.SHUTDOWN:
                break
            await asyncio.sleep(0.05)
        assert channel.get_state() == grpc.ChannelConnectivity.SHUTDOWN
        await pool.close()
    asyncio.run(run())


async def _read_all(stream: _Stream) -> list[int]:
    tokens = []
    while True:
        message = await stream.read(10)
        tokens += list(message.new_token_ids)
        if message.finished:
            return tokens


def test_an_instance_that_exited_without_draining_is_a_failure_but_what_it_sent_is_read():
    """A stream the instance answered in full before it died is served in full; the exit counts as a
    failure (the router was not told it would stop)."""
    async def run():
        pool, stream = await _answered_then_stopped(draining=False)
        assert await _read_all(stream) == list(range(NUM_MESSAGES))
        assert pool.counters["num_instance_failures"] == 1
        stream.close()
        await pool.close()
    asyncio.run(run())


def test_a_stream_an_exited_instance_did_not_finish_fails_with_its_own_error_after_what_it_sent():
    async def run():
        pool, stream = await _answered_then_stopped(draining=False, unfinished=True)
        with pytest.raises(InstanceFailed) as error:
            await _read_all(stream)
        assert error.value.dead and error.value.current
        stream.close()
        await pool.close()
    asyncio.run(run())


def test_a_health_check_that_hears_draining_marks_the_instance_draining():
    """The instance says so itself, so that the router knows it drained (not crashed) even when no
    request was refused there before it exited."""
    async def run():
        server, servicer, address = await _started()
        pool = _pool(address)
        state = pool.instances[0]
        await pool._check(state)
        assert state.up and not state.draining
        servicer.draining = True
        await pool._check(state)
        assert state.up and state.draining
        await server.stop(None)
        await pool._check(state)  # exited after draining: not a failure
        assert not state.up and pool.counters["num_instance_failures"] == 0
        await pool.close()
    asyncio.run(run())


def test_a_draining_instance_that_hangs_fails_its_streams_at_once():
    """Found by a health check that times out (a stopped process, not an exited one): its streams
    will not finish, so they fail now (to be prefilled again elsewhere where configured)."""
    async def run():
        server, servicer, address = await _started()
        pool = _pool(address)
        state = pool.instances[0]
        stream = _Stream(state, state.client.generate("r", [1], SamplingParams(max_tokens=NUM_MESSAGES)))
        pool.mark_draining(state)
        servicer.hung = True
        await pool._check(state)  # times out
        assert not state.up and pool.counters["num_instance_failures"] == 0  # draining: not counted
        with pytest.raises(InstanceFailed, match=r"health check failed \(TimeoutError"):
            await stream.read(10)
        stream.close()
        await pool.close()
        await server.stop(None)
    asyncio.run(run())


def test_a_failure_of_an_incarnation_since_restarted_is_not_the_new_ones():
    async def run():
        server, _, address = await _started()
        pool = _pool(address)
        state = pool.instances[0]
        stream = _Stream(state, state.client.generate("r", [1], SamplingParams(max_tokens=1)))
        old_client = state.client
        state.client = type(old_client)(address, 30.0, None)  # restarted: a new client
        stream.fail("the old process died")
        with pytest.raises(InstanceFailed) as error:
            await stream.read(10)
        assert not error.value.current
        flow = RequestFlow(pool, tokenizer=None, deploy=pool.deploy, request_id="r", prompt_token_ids=[1],
                           params=SamplingParams(max_tokens=1), counters={})
        flow._note_failure(error.value)
        assert state.up and pool.counters["num_instance_failures"] == 0  # the new incarnation stays up
        error.value.client = None  # the same failure, of the instance as it is now, marks it down
        flow._note_failure(error.value)
        assert not state.up and pool.counters["num_instance_failures"] == 1
        stream.close()
        await old_client.close()
        await pool.close()
        await server.stop(None)
    asyncio.run(run())


def test_a_stream_read_cancelled_as_its_message_arrives_is_cancelled():
    """The client's task is cancelled in the same turn its message arrives: the read raises
    CancelledError, as the cancellation asked (asyncio.wait_for on Python 3.11 returned the message and
    dropped the cancellation, so a stream whose client had gone ran on to its end)."""
    from types import SimpleNamespace

    async def main():
        arrived = asyncio.get_running_loop().create_future()
        call = SimpleNamespace(read=lambda: arrived, cancel=lambda: None)
        stream = _Stream(SimpleNamespace(streams=set(), client=None), call)
        task = asyncio.ensure_future(stream.read(30.0))
        await asyncio.sleep(0)  # the read now waits for its message
        arrived.set_result("a message")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    asyncio.run(main())


def test_a_restart_cancelled_as_the_new_instance_comes_up_is_cancelled():
    """The pool stops (its restart task is cancelled) in the same turn the launcher's restart returns:
    the restart raises CancelledError and takes nothing over (asyncio.wait_for on Python 3.11 returned
    the new instance and dropped the cancellation, so it was installed as up and never stopped)."""
    from types import SimpleNamespace

    async def main():
        pool = _pool("127.0.0.1:9")
        state = pool.instances[0]
        old = state.launched
        started = asyncio.get_running_loop().create_future()
        pool.launcher = SimpleNamespace(restart=lambda spec: started)
        task = asyncio.ensure_future(pool._restart(state))
        await asyncio.sleep(0)  # the restart now waits for the launcher
        started.set_result(LaunchedInstance(old.spec, "127.0.0.1:10", old.info))
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert state.launched is old and pool.counters["num_instance_restarts"] == 0
        await pool.close()
    asyncio.run(main())
