"""One instance: an engine in a role (prefill, decode, colocated) behind the Instance gRPC service.

The engine runs on AsyncLLM's thread; the gRPC server (grpc.aio) and every handler run on the event
loop that `serve_instance` is awaited on. The decode role also serves KVTransfer on a second port
(the connector's receiver), which prefill instances push KV to.

Stopping drains: new Generate calls are refused (UNAVAILABLE, `wire.draining_details`: the router
sends them elsewhere), running ones go on until the engine holds nothing — on a prefill instance that
includes KV leased until the decode side acknowledged it — for at most --shutdown-timeout.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from dataclasses import dataclass
from typing import AsyncIterator, Callable

import grpc
import torch

from scheduler.scheduler import NoKVSpaceError
from serving.config import Config
from serving.disagg import wire
from serving.disagg._proto import instance_pb2 as pb
from serving.disagg._proto import instance_pb2_grpc as pb_grpc
from serving.disagg.connector import make_connector
from serving.disagg.instance_core import InstanceCore
from serving.engine.async_llm import AsyncLLM
from serving.engine.protocol import EngineDeadError, RequestRejectedError

logger = logging.getLogger(__name__)

_ACCEPT_POLL_S = 0.002
_GRACE_S = 2.0
_DRAIN_POLL_S = 0.05


@dataclass(frozen=True)
class InstanceSpec:
    """What a launcher needs to start one instance."""
    name: str
    role: str
    config: Config  # with the role's overrides applied


def num_torch_threads(config: Config) -> int:
    return max(1, int(config.deploy.num_cpus_per_instance))


class InstanceServicer(pb_grpc.InstanceServicer):
    def __init__(self, spec: InstanceSpec, llm: AsyncLLM, core: InstanceCore, kv_address: str) -> None:
        self.spec = spec
        self.llm = llm
        self.core = core
        self.kv_address = kv_address
        self.draining = False  # set once: new Generate calls are refused
        self.num_generating = 0  # Generate calls being answered

    async def Generate(self, request: pb.GenerateRequest, context) -> AsyncIterator[pb.GenerateOutput]:
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
        rid = request.request_id
        try:
            params = wire.params_from_proto(request.params)
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        stream = self.llm.generate(rid, list(request.prompt_token_ids), params, client_id=request.client_id,
                                   kv_peer=request.kv_peer or None, remote_prefill=request.remote_prefill)
        first: asyncio.Future | None = None
        try:
            if request.remote_prefill:
                first = await self._accept(rid, stream)
                yield pb.GenerateOutput(request_id=rid, accepted=True)
                output = await first
                yield wire.output_to_proto(output)
                if output.finished:
                    return
            async for output in stream:
                yield wire.output_to_proto(output)
        except RequestRejectedError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except NoKVSpaceError as e:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
        except EngineDeadError as e:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
        finally:
            if first is not None and not first.done():
                first.cancel()
                await asyncio.wait({first})  # the generator unwinds there; it cannot be closed while running
            await stream.aclose()  # unfinished (call cancelled): AsyncLLM aborts it, freeing its blocks

    async def _accept(self, rid: str, stream) -> asyncio.Future:
        """Submit a remote_prefill request and return once its blocks are reserved and registered with
        the KV receiver; the returned future is the stream's first output. Raises what add_request
        raised (NoKVSpaceError: no room)."""
        first = asyncio.ensure_future(stream.__anext__())
        await asyncio.sleep(0)  # let it post add_request before the registration below
        while not first.done():
            if await self.llm.call(lambda core: core.register_remote(rid)):
                return first
            await asyncio.wait({first}, timeout=_ACCEPT_POLL_S)
        first.result()  # raises add_request's error
        return first  # finished already (aborted before we looked): the caller yields that output

    async def Abort(self, request: pb.AbortRequest, context) -> pb.AbortResponse:
        for rid in request.request_ids:
            await self.llm.abort(rid)
        return pb.AbortResponse()

    async def SetFirstToken(self, request: pb.SetFirstTokenRequest, context) -> pb.SetFirstTokenResponse:
        await self.llm.call(lambda core: core.set_first_token(request.request_id, request.token_id))
        return pb.SetFirstTokenResponse()

    async def Health(self, request: pb.HealthRequest, context) -> pb.HealthResponse:
        healthy = self.llm.is_healthy()
        return pb.HealthResponse(healthy=healthy, reason="" if healthy else "the engine thread died")

    async def Info(self, request: pb.InfoRequest, context) -> pb.InstanceInfo:
        return instance_info(self.spec, self.core, self.kv_address)

    async def Stats(self, request: pb.StatsRequest, context) -> pb.StatsResponse:
        if not self.llm.is_healthy():
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the engine thread died")
        message = await self.llm.call(_collect_stats)
        message.transfer.update(self.core.connector.counters())
        return message

    async def CheckIntegrity(self, request: pb.IntegrityRequest, context) -> pb.IntegrityResponse:
        return await self.llm.call(_check_integrity)


def _collect_stats(core: InstanceCore) -> pb.StatsResponse:
    message = wire.stats_to_proto(core.get_stats())
    message.num_free_blocks = core.kv.pool.num_free_blocks
    message.num_total_blocks = core.kv.pool.num_blocks
    message.num_remote_waiting = len(core.scheduler.remote_waiting)
    message.num_leased = len(core.scheduler.leased)
    message.num_queued_prefill_tokens = core.num_queued_prefill_tokens()
    return message


def _check_integrity(core: InstanceCore) -> pb.IntegrityResponse:
    ok, error = core.integrity()
    return pb.IntegrityResponse(ok=ok, error=error, num_free_blocks=core.kv.pool.num_free_blocks,
                                num_total_blocks=core.kv.pool.num_blocks,
                                num_requests=len(core.scheduler.requests),
                                num_leased=len(core.scheduler.leased))


def instance_info(spec: InstanceSpec, core: InstanceCore, kv_address: str) -> pb.InstanceInfo:
    return pb.InstanceInfo(name=spec.name, role=spec.role, model_dir=core.model_dir,
                           max_model_len=core.max_model_len, kv_address=kv_address, pid=os.getpid(),
                           num_blocks=core.kv.pool.num_blocks, block_size=core.kv.block_size,
                           kv_layout=core.connector.layout.to_proto().SerializeToString())


@dataclass(frozen=True)
class InstanceAddress:
    """What a started instance reports to its launcher."""
    address: str  # host:port of the Instance service
    info: pb.InstanceInfo


async def drain(servicer: InstanceServicer, llm: AsyncLLM, timeout_s: float, force: asyncio.Event) -> None:
    """Refuse new Generate calls, then wait until the running ones are answered and the engine holds
    nothing (waiting, running, waiting for KV, KV leased until the peer acknowledges it), at most
    timeout_s or until `force` is set."""
    servicer.draining = True
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    name = servicer.spec.name
    logger.info("instance %s draining: no new requests; waiting up to %gs for %d running", name,
                timeout_s, servicer.num_generating)
    while servicer.num_generating or await _engine_holds_requests(llm):
        if loop.time() >= deadline or force.is_set():
            logger.warning("instance %s stops with %d request(s) unfinished (%s)", name, servicer.num_generating,
                           "a second signal" if force.is_set() else "--shutdown-timeout")
            return
        await asyncio.sleep(_DRAIN_POLL_S)
    logger.info("instance %s drained", name)


async def _engine_holds_requests(llm: AsyncLLM) -> bool:
    try:
        return await llm.call(lambda core: core.has_unfinished())
    except EngineDeadError:
        return False  # nothing left to wait for


async def serve_instance(spec: InstanceSpec, on_ready: Callable[[InstanceAddress], None],
                         stop: asyncio.Event, force: asyncio.Event | None = None) -> None:
    """Build the engine, serve until `stop` is set, drain (`drain`: at most --shutdown-timeout, or
    until `force` is set), then shut down. Binds only free ports."""
    config = spec.config
    torch.set_num_threads(num_torch_threads(config))
    host = config.deploy.internal_host
    connector = make_connector(spec.role, config)
    try:
        core = InstanceCore(config, spec.role, connector)
        kv_address = connector.start_receiver(host)
        llm = AsyncLLM(core, spec.name)
        server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        servicer = InstanceServicer(spec, llm, core, kv_address)
        pb_grpc.add_InstanceServicer_to_server(servicer, server)
        port = server.add_insecure_port(f"{host}:0")
        await server.start()
        try:
            address = f"{host}:{port}"
            on_ready(InstanceAddress(address, instance_info(spec, core, kv_address)))
            logger.info("instance %s (%s) serving on %s, KV on %s", spec.name, spec.role, address,
                        kv_address or "-")
            await stop.wait()
            await drain(servicer, llm, config.server.shutdown_timeout_s, force or asyncio.Event())
        finally:
            await server.stop(_GRACE_S)
            await llm.shutdown()
    finally:
        connector.close()
