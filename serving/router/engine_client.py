"""The router's EngineClient, in the API server: over prefill and decode instances (disaggregated), or
over colocated replicas (data parallel, `--num-replicas`).

`build_disaggregated_client(config)` launches the instances (local subprocesses or Ray actors), checks
that every prefill instance can send KV to every decode instance, and returns the client. Its gRPC
channels and background checks start on the event loop that first uses it (the server's).
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import time
from typing import AsyncIterator

from transformers import AutoTokenizer

from kvcache.transfer._proto import kv_transfer_pb2 as kv_pb
from kvcache.transfer.layout import IncompatibleLayoutError, KVLayout
from scheduler.sampling_params import SamplingParams
from serving.config import Config
from serving.router.flow import RequestFlow
from serving.launchers import LaunchedInstance, Launcher, make_launcher, make_specs
from serving.router.pool import InstancePool
from serving.router.stats import aggregate_stats
from serving.engine.protocol import EngineDeadError, EngineStats, ModelInfo, RequestOutput, RequestRejectedError

logger = logging.getLogger(__name__)

_REFRESH_TIMEOUT_S = 2.0  # a metrics scrape waits at most this long for the instances' figures


def build_disaggregated_client(config: Config) -> "DisaggregatedClient":
    launcher = make_launcher(config)
    token = secrets.token_urlsafe(32)  # this deployment's: every internal call carries it; never logged
    try:
        launched = launcher.start(make_specs(config, token))
        for instance in launched:
            check_peers(instance, launched)
        return DisaggregatedClient(config, launcher, launched)
    except BaseException:
        launcher.shutdown()
        raise


def kv_layout(instance: LaunchedInstance) -> KVLayout:
    return KVLayout.from_proto(kv_pb.KVLayout.FromString(instance.info.kv_layout))


def check_peers(instance: LaunchedInstance, others: list[LaunchedInstance]) -> None:
    """Raise ValueError (naming the differing fields) unless `instance` can exchange KV with every
    instance of the other role."""
    other_role = {"prefill": "decode", "decode": "prefill"}.get(instance.spec.role)
    for other in others:
        if other.spec.role != other_role:
            continue
        prefill, decode = (instance, other) if instance.spec.role == "prefill" else (other, instance)
        try:
            kv_layout(prefill).check_compatible(kv_layout(decode), ours="prefill", theirs="decode")
        except IncompatibleLayoutError as e:
            raise ValueError(f"prefill instance {prefill.name} cannot send KV to decode instance "
                             f"{decode.name}: {e}") from None


class DisaggregatedClient:
    """EngineClient over remote instances. All methods but get_stats/is_healthy run on one event loop."""

    def __init__(self, config: Config, launcher: Launcher, launched: list[LaunchedInstance]) -> None:
        self.config = config
        self._launcher = launcher
        self._launched = launched
        model_dir = launched[0].info.model_dir
        self.tokenizer = AutoTokenizer.from_pretrained(config.model.tokenizer or model_dir)
        self.model_info = ModelInfo(
            name=config.model.served_model_name or config.model.model or os.path.basename(model_dir),
            path=model_dir, max_model_len=min(i.info.max_model_len for i in launched), created=int(time.time()))
        # advanced by the flows and the pool; exported as extra["router"]
        self.counters = {"num_reroutes": 0, "num_decode_failures": 0, "num_reprefills": 0, "num_kv_waits": 0,
                         "num_instance_failures": 0, "num_instance_restarts": 0, "num_kv_transferred": 0,
                         "num_kv_recomputed": 0, "num_early_prefills_cancelled": 0}
        self._pool: InstancePool | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._flows: dict[str, RequestFlow] = {}
        self._closed = False

    @property
    def pool(self) -> InstancePool:
        """The instances (created on first use, on the running loop)."""
        loop = asyncio.get_running_loop()
        if self._pool is None:
            self._pool = InstancePool(self._launched, self._launcher, self.config.deploy, self._check_restarted,
                                      self.counters)
            self._pool.start_monitor()
            self._loop = loop
        elif self._loop is not loop:
            raise RuntimeError("the disaggregated client belongs to the event loop that first used it")
        return self._pool

    def _check_restarted(self, instance: LaunchedInstance) -> None:
        check_peers(instance, [s.launched for s in self._pool.instances if s.name != instance.name])

    # ---- EngineClient ----
    async def generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                       client_id: str = "", priority: int = 0) -> AsyncIterator[RequestOutput]:
        if self._closed:
            raise EngineDeadError("the server is shutting down")
        if request_id in self._flows:
            raise RequestRejectedError(f"request id {request_id!r} is already in use")
        flow = RequestFlow(self.pool, self.tokenizer, self.config.deploy, request_id, prompt_token_ids,
                           params, self.counters, client_id, priority)
        self._flows[request_id] = flow
        try:
            async with contextlib.aclosing(flow.outputs()) as outputs:
                async for output in outputs:
                    yield output
        finally:
            self._flows.pop(request_id, None)

    async def abort(self, request_id: str) -> None:
        flow = self._flows.get(request_id)
        if flow is not None:
            flow.abort()

    def is_healthy(self) -> bool:
        if self._closed:
            return False
        if self._pool is None:
            return True  # launched and checked; nothing has failed yet
        if self._pool.replicas:
            return bool(self._pool.up("colocated"))
        return bool(self._pool.up("prefill")) and bool(self._pool.up("decode"))

    def get_stats(self) -> EngineStats:
        """The sum over instances (as of their last poll) plus, in `extra`, KV transfer counters,
        router counters and per-instance queue depths."""
        return aggregate_stats(self._pool.instances if self._pool is not None else [], self.counters)

    async def refresh_stats(self) -> None:
        """Poll every instance now, so that stats reflect every request finished before the call."""
        await self.pool.refresh_stats(_REFRESH_TIMEOUT_S)

    async def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        for flow in list(self._flows.values()):
            flow.abort()
        if self._pool is not None:
            await self._pool.close()
        await asyncio.get_running_loop().run_in_executor(None, self._launcher.shutdown)

    # ---- tests and admin ----
    async def check_integrity(self) -> dict:
        """Per up instance: (ok, error, free blocks, total blocks, requests still held)."""
        states = [s for s in self.pool.instances if s.up]
        replies = await asyncio.gather(*(s.client.check_integrity() for s in states))
        return {s.name: r for s, r in zip(states, replies)}
