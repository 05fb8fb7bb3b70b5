"""The router's instances: who is up, how loaded, which to pick; health checks and restarts.

Load is tracked two ways. What the router itself sent is exact and immediate (prompt tokens sent to a
prefill instance and not yet answered by a first token; requests streaming from a decode instance);
what only the instance knows (free KV blocks) comes from a Stats poll, corrected by the blocks the
router has reserved there since that poll.
"""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

import grpc

from scheduler.routing import LeastLoadedRouting
from serving.config import DeployConfig
from serving.instance._proto import instance_pb2 as pb
from serving.router.instance_client import InstanceClient
from serving.launchers.base import LaunchedInstance, Launcher

logger = logging.getLogger(__name__)

_MIN_HEALTH_TIMEOUT_S = 2.0
_MAX_RESTART_ATTEMPTS = 3
_READ_OUT_POLL_S = 0.05


@dataclass
class InstanceState:
    launched: LaunchedInstance
    client: InstanceClient
    up: bool = True
    # router-side load
    num_queued_prefill_tokens: int = 0  # prefill, replica: prompt tokens sent, first token not yet back
    num_active: int = 0  # decode, replica: requests reserved or streaming here
    num_blocks_reserved_since_poll: int = 0
    stats: pb.StatsResponse = field(default_factory=pb.StatsResponse)
    # calls to cancel when the instance is found dead: call -> the flow's failure callback
    streams: set = field(default_factory=set)
    num_restarts: int = 0
    # it refuses new requests while its running ones finish; it exits (and is restarted) after
    draining: bool = False

    @property
    def name(self) -> str:
        return self.launched.name

    @property
    def role(self) -> str:
        return self.launched.spec.role

    @property
    def kv_address(self) -> str:
        return self.launched.info.kv_address

    @property
    def accepting(self) -> bool:
        return self.up and not self.draining

    @property
    def num_free_blocks_estimate(self) -> int:
        return self.stats.num_free_blocks - self.num_blocks_reserved_since_poll


class InstancePool:
    """Mutated only on the router's event loop."""

    def __init__(self, launched: list[LaunchedInstance], launcher: Launcher, deploy: DeployConfig,
                 check_peer, counters: dict[str, int]) -> None:
        self.deploy = deploy
        self.counters = counters  # the router's: num_instance_failures, num_instance_restarts
        self.launcher = launcher
        self._check_peer = check_peer  # raises ValueError for an instance the others cannot talk to
        self.routing = LeastLoadedRouting()  # the simulator asks the same policy
        self.instances = [InstanceState(li, InstanceClient(li.address, deploy.instance_timeout_s, li.spec.token))
                          for li in launched]
        for state in self.instances:
            state.stats.num_free_blocks = state.launched.info.num_blocks
        self._tasks: set[asyncio.Task] = set()
        self._changed = asyncio.Event()  # set whenever an instance comes up

    # ---- choosing ----
    @property
    def replicas(self) -> bool:
        """Colocated replicas (a request is one stream on one of them), not prefill/decode pairs."""
        return any(state.role == "colocated" for state in self.instances)

    def up(self, role: str) -> list[InstanceState]:
        """The instances of `role` that take new requests."""
        return self.routing.up(self.instances, role)

    def pick_prefill(self) -> InstanceState | None:
        return self.routing.pick_prefill(self.instances)

    def pick_replica(self) -> InstanceState | None:
        return self.routing.pick_replica(self.instances)

    def decode_candidates(self) -> list[InstanceState]:
        return self.routing.decode_candidates(self.instances)

    async def wait_for_change(self, timeout_s: float) -> None:
        """Wait (at most timeout_s) until some instance comes (back) up."""
        self._changed.clear()
        try:
            async with asyncio.timeout(timeout_s):
                await self._changed.wait()
        except TimeoutError:
            pass

    # ---- failures ----
    def mark_draining(self, state: InstanceState) -> None:
        """The instance is shutting down (it refused a request, or said so to a health check): route
        nothing more to it, and leave its streams alone (they finish there). Health checks go on: once
        it has exited it is found dead, and restarted like any other."""
        if state.up and not state.draining:
            state.draining = True
            logger.warning("instance %s (%s) is draining: no new requests go to it", state.name,
                           state.launched.address)

    def mark_failed(self, state: InstanceState, reason: str, exited: bool = False) -> None:
        """The instance is dead or unreachable: stop routing to it, fail its streams, restart it.
        exited: its process is gone (connection refused), rather than hung or its engine dead; its
        streams then read out what it sent before they fail."""
        if not state.up:
            return
        state.up = False
        if state.draining:  # it has finished draining and exited (or hung doing so): not a failure
            logger.warning("instance %s (%s) has stopped after draining: %s", state.name,
                           state.launched.address, reason)
        else:
            self.counters["num_instance_failures"] += 1
            logger.error("instance %s (%s) is down: %s", state.name, state.launched.address, reason)
        if exited:
            # Its process is gone, but the last of what it sent (all of it, for a drained instance)
            # may still sit unread in this channel: the streams read it out (one the instance did not
            # finish ends with its own transport error), and the channel closes after them. A hung
            # instance's streams fail at once.
            self._spawn(self._read_out(state.name, set(state.streams), state.client))
            state.streams = set()
        else:
            for stream in list(state.streams):
                stream.fail(f"instance {state.name} failed: {reason}")
            state.streams.clear()
        state.num_queued_prefill_tokens = 0
        if self.deploy.restart_failed_instances:
            self._spawn(self._restart(state, close_old_client=not exited))

    async def _read_out(self, name: str, streams: set, client: InstanceClient) -> None:
        """Close an exited instance's channel once its streams are read out (at most
        --instance-timeout-s; a stream still open then fails)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.deploy.instance_timeout_s
        try:
            while any(not stream.closed for stream in streams) and loop.time() < deadline:
                await asyncio.sleep(_READ_OUT_POLL_S)
            for stream in streams:
                if not stream.closed:
                    stream.fail(f"instance {name} exited with this stream unfinished")
        finally:
            await client.close()

    async def _restart(self, state: InstanceState, close_old_client: bool = True) -> None:
        for attempt in range(1, _MAX_RESTART_ATTEMPTS + 1):
            try:
                # asyncio.timeout, not wait_for: on 3.11 wait_for drops a cancellation (the pool
                # stopping) that comes as the start completes, and the new instance would be orphaned
                async with asyncio.timeout(self.deploy.instance_start_timeout_s):
                    launched = await self.launcher.restart(state.launched.spec)
                self._check_peer(launched)
            except Exception as e:  # noqa: BLE001 - a failed start is logged and tried again
                logger.error("restarting %s failed (attempt %d of %d): %s", state.name, attempt,
                             _MAX_RESTART_ATTEMPTS, e)
                continue
            old_client = state.client
            state.launched = launched
            state.client = InstanceClient(launched.address, self.deploy.instance_timeout_s, launched.spec.token)
            state.stats = pb.StatsResponse(num_free_blocks=launched.info.num_blocks)
            state.num_blocks_reserved_since_poll = 0
            state.draining = False
            state.num_restarts += 1
            self.counters["num_instance_restarts"] += 1
            state.up = True
            self._changed.set()
            logger.info("instance %s is back on %s", state.name, launched.address)
            if close_old_client:
                await old_client.close()
            return
        logger.error("gave up restarting %s; it stays down", state.name)

    # ---- background checks ----
    def start_monitor(self) -> None:
        self._spawn(self._monitor())

    async def _monitor(self) -> None:
        interval = self.deploy.health_check_interval_s
        while True:
            await asyncio.gather(*(self._check(s) for s in self.instances if s.up))
            await asyncio.sleep(interval)

    async def _check(self, state: InstanceState) -> None:
        timeout = max(_MIN_HEALTH_TIMEOUT_S, 5 * self.deploy.health_check_interval_s)
        client = state.client
        try:
            async with asyncio.timeout(timeout):
                health = await client.health()
        except (grpc.aio.AioRpcError, TimeoutError) as e:
            if state.client is client:
                exited = isinstance(e, grpc.aio.AioRpcError) and e.code() == grpc.StatusCode.UNAVAILABLE
                self.mark_failed(state, f"health check failed ({_describe(e)})", exited)
            return
        if not health.healthy:
            if state.client is client:
                self.mark_failed(state, health.reason)
            return
        if health.draining and state.client is client:
            self.mark_draining(state)
        await self._poll_stats(state, timeout)

    async def _poll_stats(self, state: InstanceState, timeout_s: float) -> None:
        client = state.client
        try:
            stats = await client.stats(timeout_s)
        except (grpc.aio.AioRpcError, asyncio.TimeoutError):
            return  # a busy engine: keep the last figures; liveness is the health check's job
        if state.client is client:
            state.stats = stats
            state.num_blocks_reserved_since_poll = 0

    async def refresh_stats(self, timeout_s: float) -> None:
        """Poll every up instance's stats now (an instance that does not answer in time keeps its
        last figures)."""
        await asyncio.gather(*(self._poll_stats(s, timeout_s) for s in self.instances if s.up))

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.gather(*(s.client.close() for s in self.instances), return_exceptions=True)


def _describe(error: BaseException) -> str:
    if isinstance(error, grpc.aio.AioRpcError):
        return f"{error.code().name}: {error.details()}"
    return type(error).__name__
