"""One instance: an engine in a role (prefill, decode, colocated) behind the Instance gRPC service.

The engine runs in an engine process of its own (EngineProcess; with --no-engine-process on an
EngineThread of this one); the gRPC server (grpc.aio) and every handler run on the event loop that
`serve_instance` is awaited on. The decode role also serves KVTransfer on a second port
(its connector worker's receiver), which prefill instances push KV to. Instances stream token ids:
the router detokenizes.

Stopping drains: new Generate calls are refused (UNAVAILABLE, `wire.draining_details`: the router
sends them elsewhere), running ones go on until the engine holds nothing — on a prefill instance that
includes KV leased until the decode side acknowledged it — for at most --shutdown-timeout. Health
answers `draining` meanwhile, and an instance that had streams running stays up after its drain until
a health check has heard that (at most `linger_s`): the router must know it drained, not crashed,
when it finds it gone, or it would fail streams whose last messages it has not read yet.

A dead engine process fails the instance's streams at once (UNAVAILABLE, with the pid and the
signal) and Health answers unhealthy with the same reason: the router marks the instance failed and
its launcher replaces the whole instance (serving/router/pool.py). The instance does not restart its
engine itself, so there is one restart path for every way an instance can die.
"""
from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable

import grpc
import torch

from kvcache.transfer.auth import AioServerTokenInterceptor, TokenCheck
from scheduler.scheduler import NoKVSpaceError
from serving.config import Config
from serving.instance import wire
from serving.metrics import KV_SWAP_PREFIX
from serving.instance._proto import instance_pb2 as pb
from serving.instance._proto import instance_pb2_grpc as pb_grpc
from serving.engine.core_messages import EngineInfo
from serving.engine.cpu_placement import engine_placement
from serving.engine.engine import Engine, build_engine
from serving.engine.engine_process import EngineProcess
from serving.engine.engine_thread import EngineThread
from serving.engine.protocol import EngineDeadError, RequestRejectedError

logger = logging.getLogger(__name__)

_GRACE_S = 2.0
_DRAIN_POLL_S = 0.05
_MIN_LINGER_S = 2.0


@dataclass(frozen=True)
class InstanceSpec:
    """What a launcher needs to start one instance."""
    name: str
    role: str
    config: Config  # with the role's overrides applied; never the API key (instances do not need it)
    # the deployment's shared secret, which every internal call carries: beside the config, not in it,
    # and never on a command line or in a log
    token: str | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.config.server.api_key is not None:
            raise ValueError(f"instance {self.name}: an instance's config must not carry the API key (it "
                             "never needs it): pass config.replace(api_key=None)")


def num_torch_threads(config: Config) -> int:
    return max(1, int(config.deploy.num_cpus_per_instance))


class InstanceServicer(pb_grpc.InstanceServicer):
    def __init__(self, spec: InstanceSpec, core: EngineProcess | EngineThread, auth: TokenCheck) -> None:
        self.spec = spec
        self.core = core
        self.auth = auth
        self.draining = False  # set once: new Generate calls are refused
        self.draining_heard = asyncio.Event()  # a health check has been answered `draining`
        self.num_generating = 0  # Generate calls being answered

    async def Generate(self, request: pb.GenerateRequest, context) -> AsyncIterator[pb.GenerateOutput]:
        """A remote_prefill request's first message says its blocks are reserved and registered with
        the KV receiver (`accepted`); token outputs follow once its KV and first token are in."""
        if self.draining:
            await context.abort(grpc.StatusCode.UNAVAILABLE, wire.draining_details(self.spec.name))
        self.num_generating += 1
        try:
            async with contextlib.aclosing(self._generate(request, context)) as outputs:
                async for output in outputs:
                    yield output
        finally:
            self.num_generating -= 1

    async def _generate(self, request: pb.GenerateRequest, context) -> AsyncIterator[pb.GenerateOutput]:
        try:
            params = wire.params_from_proto(request.params)
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        stream = self.core.generate(request.request_id, list(request.prompt_token_ids), params,
                                      **wire.request_kwargs(request))
        try:
            async for output in stream:
                yield wire.output_to_proto(output)
        except RequestRejectedError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except NoKVSpaceError as e:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
        except EngineDeadError as e:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
        finally:
            await stream.aclose()  # unfinished (call cancelled): the engine aborts it, freeing its blocks

    async def Abort(self, request: pb.AbortRequest, context) -> pb.AbortResponse:
        for rid in request.request_ids:
            await self.core.abort(rid)
        return pb.AbortResponse()

    async def SetFirstToken(self, request: pb.SetFirstTokenRequest, context) -> pb.SetFirstTokenResponse:
        await self.core.call(functools.partial(set_first_token, request.request_id, request.token_id))
        return pb.SetFirstTokenResponse()

    async def Health(self, request: pb.HealthRequest, context) -> pb.HealthResponse:
        healthy = self.core.is_healthy()
        if self.draining:
            self.draining_heard.set()
        return pb.HealthResponse(healthy=healthy, reason="" if healthy else self.core.dead_reason or "the engine died",
                                 draining=self.draining)

    async def Info(self, request: pb.InfoRequest, context) -> pb.InstanceInfo:
        return instance_info(self.spec, self.core.info)

    async def Stats(self, request: pb.StatsRequest, context) -> pb.StatsResponse:
        if not self.core.is_healthy():
            await context.abort(grpc.StatusCode.UNAVAILABLE, self.core.dead_reason or "the engine died")
        message = await self.core.call(collect_stats)
        # calls this service refused (KVTransfer's refusals are in the connector's counters already)
        message.transfer["num_unauthenticated_calls"] += self.auth.num_unauthenticated_calls
        return message

    async def CheckIntegrity(self, request: pb.IntegrityRequest, context) -> pb.IntegrityResponse:
        return await self.core.call(check_integrity)


def set_first_token(request_id: str, token_id: int, engine: Engine) -> None:
    engine.set_first_token(request_id, token_id)


def collect_stats(engine: Engine) -> pb.StatsResponse:
    """In the engine process: the instance's gauges and counters."""
    stats = engine.get_stats()
    message = wire.stats_to_proto(stats)
    message.num_free_blocks = engine.kv.pool.num_free_blocks
    message.num_total_blocks = engine.kv.pool.num_blocks
    message.num_remote_waiting = engine.scheduler.connector.num_pending()
    message.num_leased = len(engine.scheduler.held)
    message.num_queued_prefill_tokens = engine.num_queued_prefill_tokens()
    message.transfer.update(stats.extra["kv_transfer"])
    # swapping's counters ride the same summed map, under a prefix the metrics split back out
    message.transfer.update({f"{KV_SWAP_PREFIX}{name}": value for name, value in stats.extra["kv_swap"].items()})
    return message


def check_integrity(engine: Engine) -> pb.IntegrityResponse:
    """In the engine process: the pool's invariants, and what is still held."""
    try:
        engine.check_integrity()
        ok, error = True, ""
    except AssertionError as e:
        ok, error = False, str(e) or "check_integrity failed"
    return pb.IntegrityResponse(ok=ok, error=error, num_free_blocks=engine.kv.pool.num_free_blocks,
                                num_total_blocks=engine.kv.pool.num_blocks,
                                num_requests=len(engine.scheduler.requests),
                                num_leased=len(engine.scheduler.held))


def instance_info(spec: InstanceSpec, info: EngineInfo) -> pb.InstanceInfo:
    """pid: the instance's process (what a launcher stops), not its engine process."""
    return pb.InstanceInfo(name=spec.name, role=spec.role, model_dir=info.model_dir,
                           max_model_len=info.max_model_len, kv_address=info.kv_address, pid=os.getpid(),
                           num_blocks=info.num_blocks, block_size=info.block_size, kv_layout=info.kv_layout)


@dataclass(frozen=True)
class InstanceAddress:
    """What a started instance reports to its launcher."""
    address: str  # host:port of the Instance service
    info: pb.InstanceInfo


async def drain(servicer: InstanceServicer, timeout_s: float, force: asyncio.Event) -> None:
    """Refuse new Generate calls, then wait until the running ones are answered and the engine holds
    nothing (waiting, running, waiting for KV, KV leased until the peer acknowledges it), at most
    timeout_s or until `force` is set. If streams were running, then wait until a health check has
    heard that this instance is draining (at most `linger_s`)."""
    servicer.draining = True
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    name = servicer.spec.name
    had_streams = servicer.num_generating > 0
    logger.info("instance %s draining: no new requests; waiting up to %gs for %d running", name,
                timeout_s, servicer.num_generating)
    while servicer.num_generating or await _engine_holds_requests(servicer.core):
        if loop.time() >= deadline or force.is_set():
            logger.warning("instance %s stops with %d request(s) unfinished (%s)", name, servicer.num_generating,
                           "a second signal" if force.is_set() else "--shutdown-timeout")
            return
        await asyncio.sleep(_DRAIN_POLL_S)
    logger.info("instance %s drained", name)
    if had_streams and not servicer.draining_heard.is_set():
        # The router may not have read its streams' last messages yet: were it to find this instance
        # gone without knowing it drained, it would take it for a crash and fail those streams.
        linger = linger_s(servicer.spec.config)
        waits = [asyncio.ensure_future(servicer.draining_heard.wait()), asyncio.ensure_future(force.wait())]
        await asyncio.wait(waits, timeout=linger, return_when=asyncio.FIRST_COMPLETED)
        for wait in waits:
            wait.cancel()
        if not servicer.draining_heard.is_set():
            logger.warning("instance %s: no health check heard it drain within %gs; stopping anyway", name,
                           linger)


def linger_s(config: Config) -> float:
    """How long a drained instance waits for the router's next health check."""
    return max(_MIN_LINGER_S, 3 * config.deploy.health_check_interval_s)


def _has_unfinished(engine: Engine) -> bool:
    return engine.has_unfinished()


async def _engine_holds_requests(core: EngineProcess | EngineThread) -> bool:
    try:
        return await core.call(_has_unfinished)
    except EngineDeadError:
        return False  # nothing left to wait for


async def serve_instance(spec: InstanceSpec, on_ready: Callable[[InstanceAddress], None],
                         stop: asyncio.Event, force: asyncio.Event | None = None) -> None:
    """Start the engine (its process, or its thread), serve until `stop` is set, drain (`drain`: at
    most --shutdown-timeout, or until `force` is set), then shut down. Binds only free ports."""
    config = spec.config
    host = config.deploy.internal_host
    auth = TokenCheck(spec.token)  # both internal services refuse calls without the deployment's token
    core = start_engine(spec)
    try:
        server = grpc.aio.server(options=[("grpc.so_reuseport", 0)],
                                 interceptors=[AioServerTokenInterceptor(auth)])
        servicer = InstanceServicer(spec, core, auth)
        pb_grpc.add_InstanceServicer_to_server(servicer, server)
        port = server.add_insecure_port(f"{host}:0")
        await server.start()
        try:
            address = f"{host}:{port}"
            info = instance_info(spec, core.info)
            on_ready(InstanceAddress(address, info))
            logger.info("instance %s (%s) serving on %s, KV on %s, engine pid %d", spec.name, spec.role,
                        address, info.kv_address or "-", core.pid)
            await stop.wait()
            await drain(servicer, config.server.shutdown_timeout_s, force or asyncio.Event())
        finally:
            await server.stop(_GRACE_S)
    finally:
        await core.shutdown()
        if isinstance(core, EngineThread):
            core.engine.close()


def start_engine(spec: InstanceSpec) -> EngineProcess | EngineThread:
    """The instance's engine with --num-cpus-per-instance compute threads: in its own process (not
    restarted here: see the module's docstring), or on a thread of this one."""
    config = spec.config
    if config.deploy.engine_process:
        return EngineProcess(config, spec.role, token=spec.token,
                             placement=engine_placement(num_torch_threads(config)))
    torch.set_num_threads(num_torch_threads(config))
    return EngineThread(build_engine(config, spec.role, token=spec.token))
