"""Secure by default inside a deployment: no secret and no config on an instance's command line, and
both internal gRPC services (Instance, KVTransfer) refuse calls that do not carry the deployment's
token. The deployment tests run real instance processes (local launcher) on the tiny model."""
from __future__ import annotations

import asyncio
import os
import time

import grpc
import pytest

from kvcache.transfer import wire as kv_wire
from kvcache.transfer._proto import kv_transfer_pb2 as kv_pb
from kvcache.transfer.auth import METADATA_KEY
from serving.config import Config
from serving.instance._proto import instance_pb2 as pb
from serving.instance.servicer import InstanceSpec
from serving.instance.main import decode_start, encode_start
from serving.launchers import make_specs
from serving.router.engine_client import build_disaggregated_client
from serving.metrics import ServingMetrics
from tests.serving.test_disagg_support import (LoopThread, collect, instance_children, make_cases,
                                               reference_outputs, tiny_config, token_ids)

API_KEY = "sk-api-key-that-instances-never-see"
WRONG = ((METADATA_KEY, "Bearer not-the-token"),)


# ---- in-process: what a launcher hands an instance ----
def test_specs_carry_the_token_beside_the_config_and_never_the_api_key():
    config = Config.from_dict({"mode": "disaggregated", "api_key": API_KEY, "num_prefill": 2,
                               "prefill_overrides": {"max_num_seqs": 4}})
    specs = make_specs(config, "the-token")
    assert [s.name for s in specs] == ["prefill-0", "prefill-1", "decode-0"]
    for spec in specs:
        assert spec.config.server.api_key is None and spec.token == "the-token"
        assert "the-token" not in repr(spec) and "the-token" not in str(spec.config.to_dict())
        document = encode_start(spec)
        assert API_KEY not in document
        again = decode_start(spec.name, spec.role, document)
        assert again.config == spec.config and again.token == "the-token"
    with pytest.raises(ValueError, match="must not carry the API key"):
        InstanceSpec("decode-0", "decode", config)


# ---- a deployment started with an API key ----
@pytest.fixture(scope="module")
def loop():
    thread = LoopThread()
    yield thread
    thread.close()


@pytest.fixture(scope="module")
def deployment(loop, tiny_model_dir):
    config = tiny_config(tiny_model_dir, mode="disaggregated", api_key=API_KEY)
    client = build_disaggregated_client(config)
    try:
        yield client
    finally:
        loop.run(client.shutdown())


async def _instances(client) -> dict:
    return {s.name: s for s in client.pool.instances}


def _token(loop, client) -> str:
    states = loop.run(_instances(client))
    tokens = {s.launched.spec.token for s in states.values()}
    assert len(tokens) == 1  # one token per deployment, shared by every instance
    return tokens.pop()


@pytest.mark.slow
def test_instance_command_lines_hold_neither_the_api_key_nor_the_token(loop, deployment):
    token = _token(loop, deployment)
    pids = instance_children(os.getpid())
    assert len(pids) == 2
    for pid in pids:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            command = f.read()
        assert API_KEY.encode() not in command and token.encode() not in command, command
        assert b"{" not in command, f"a config on the command line: {command}"


_INSTANCE_SERVICE = pb.DESCRIPTOR.services_by_name["Instance"].full_name


async def _raw_health(address: str, metadata) -> pb.HealthResponse:
    """Health with exactly the given metadata, as any local process could call it."""
    async with grpc.aio.insecure_channel(address) as channel:
        call = channel.unary_unary(f"/{_INSTANCE_SERVICE}/Health",
                                   request_serializer=pb.HealthRequest.SerializeToString,
                                   response_deserializer=pb.HealthResponse.FromString)
        return await call(pb.HealthRequest(), timeout=30, metadata=metadata)


async def _raw_generate(address: str, metadata) -> pb.GenerateOutput:
    """The first message of a Generate stream (a streaming method) with exactly the given metadata."""
    async with grpc.aio.insecure_channel(address) as channel:
        call = channel.unary_stream(f"/{_INSTANCE_SERVICE}/Generate",
                                    request_serializer=pb.GenerateRequest.SerializeToString,
                                    response_deserializer=pb.GenerateOutput.FromString)
        stream = call(pb.GenerateRequest(request_id="raw", prompt_token_ids=[11, 12]), timeout=30,
                      metadata=metadata)
        try:
            return await stream.read()
        finally:
            stream.cancel()


def _raw_handshake(address: str, layout: kv_pb.KVLayout, metadata) -> kv_pb.HandshakeResponse:
    with grpc.insecure_channel(address) as channel:
        call = channel.unary_unary(kv_wire.method_path("Handshake"),
                                   request_serializer=kv_pb.HandshakeRequest.SerializeToString,
                                   response_deserializer=kv_pb.HandshakeResponse.FromString)
        return call(kv_pb.HandshakeRequest(layout=layout, host_id="elsewhere", sender_id="raw"), timeout=30,
                    metadata=metadata)


def _assert_refused(error: grpc.RpcError) -> None:
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED, error
    assert "needs the deployment's token" in error.details()


async def _wait_for_refusals(client, num_calls: int, timeout_s: float = 30.0) -> float:
    """The deployment's count of refused calls once it reaches num_calls (stats are polled)."""
    deadline = time.monotonic() + timeout_s
    while True:
        count = client.get_stats().extra["kv_transfer"].get("num_unauthenticated_calls", 0)
        if count >= num_calls or time.monotonic() > deadline:
            return count
        await asyncio.sleep(0.2)


@pytest.mark.slow
def test_internal_services_refuse_calls_without_the_token(loop, deployment, tiny_model_dir):
    token = _token(loop, deployment)
    right = ((METADATA_KEY, f"Bearer {token}"),)
    states = loop.run(_instances(deployment))
    num_refused = 0
    for state in states.values():
        for call in (_raw_health, _raw_generate):
            for metadata in (None, WRONG):
                with pytest.raises(grpc.RpcError) as error:
                    loop.run(call(state.launched.address, metadata))
                _assert_refused(error.value)
                num_refused += 1
        assert loop.run(_raw_health(state.launched.address, right)).healthy

    decode = states["decode-0"].launched.info
    layout = kv_pb.KVLayout.FromString(decode.kv_layout)
    for metadata in (None, WRONG):
        with pytest.raises(grpc.RpcError) as error:
            _raw_handshake(decode.kv_address, layout, metadata)
        _assert_refused(error.value)
        num_refused += 1
    assert _raw_handshake(decode.kv_address, layout, right).layout == layout

    assert loop.run(_wait_for_refusals(deployment, num_refused)) == num_refused
    metrics = ServingMetrics("m", 128)
    metrics.observe_engine_stats(deployment.get_stats())
    assert (f'pdserve:kv_transfer_num_unauthenticated_calls_total{{model_name="m"}} {float(num_refused)}'
            in metrics.render().decode())
    # and the deployment itself, whose calls carry the token, serves as before
    config = tiny_config(tiny_model_dir)
    case = make_cases("auth", 21, [40], [6])[0]
    expected = reference_outputs(config, [case])[case.request_id]
    assert token_ids(loop.run(collect(deployment, case))) == token_ids(expected)
