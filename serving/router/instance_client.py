"""The router's handle on one instance: a grpc.aio channel to its Instance service, every call with a
deadline and the deployment's token. Create it on the event loop that will use it (grpc.aio channels
belong to one loop)."""
from __future__ import annotations

import grpc

from kvcache.transfer.auth import call_metadata
from scheduler.sampling_params import SamplingParams
from serving.instance import wire
from serving.instance._proto import instance_pb2 as pb
from serving.instance._proto import instance_pb2_grpc as pb_grpc

# a dead peer is noticed by the health checks and by TCP resets; keepalive catches a silent network
_CHANNEL_OPTIONS = [("grpc.keepalive_time_ms", 10_000), ("grpc.keepalive_timeout_ms", 5_000),
                    ("grpc.keepalive_permit_without_calls", 1), ("grpc.enable_retries", 0)]


class InstanceClient:
    def __init__(self, address: str, timeout_s: float, token: str | None) -> None:
        self.address = address
        self.timeout_s = timeout_s
        self._metadata = call_metadata(token)
        self._channel = grpc.aio.insecure_channel(address, options=_CHANNEL_OPTIONS)
        self._stub = pb_grpc.InstanceStub(self._channel)

    def generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                 kv_peer: str = "", remote_prefill: bool = False, client_id: str = "", priority: int = 0):
        """The Generate stream (a grpc.aio call: `await call.read()`, `call.cancel()`). No deadline on
        the whole stream (a long generation is fine); callers bound each read instead."""
        return self._stub.Generate(wire.generate_request(request_id, prompt_token_ids, params, kv_peer,
                                                         remote_prefill, client_id, priority),
                                   metadata=self._metadata)

    async def abort(self, request_ids: list[str]) -> None:
        await self._stub.Abort(pb.AbortRequest(request_ids=request_ids), timeout=self.timeout_s,
                               metadata=self._metadata)

    async def set_first_token(self, request_id: str, token_id: int) -> None:
        await self._stub.SetFirstToken(pb.SetFirstTokenRequest(request_id=request_id, token_id=token_id),
                                       timeout=self.timeout_s, metadata=self._metadata)

    async def health(self) -> pb.HealthResponse:
        return await self._stub.Health(pb.HealthRequest(), timeout=self.timeout_s, metadata=self._metadata)

    async def info(self) -> pb.InstanceInfo:
        return await self._stub.Info(pb.InfoRequest(), timeout=self.timeout_s, metadata=self._metadata)

    async def stats(self, timeout_s: float | None = None) -> pb.StatsResponse:
        return await self._stub.Stats(pb.StatsRequest(), timeout=timeout_s or self.timeout_s,
                                     metadata=self._metadata)

    async def check_integrity(self) -> pb.IntegrityResponse:
        return await self._stub.CheckIntegrity(pb.IntegrityRequest(), timeout=self.timeout_s,
                                               metadata=self._metadata)

    async def close(self) -> None:
        await self._channel.close(grace=None)
