"""The KV receiver with a deployment token: calls without it (or with a wrong one) end UNAUTHENTICATED
before any handler runs, and are counted; a KVSender holding the token transfers as before. Sender and
receiver share this process (two gRPC servers/clients on loopback), so this runs in seconds."""
from __future__ import annotations

import grpc
import pytest
import torch

from kvcache.transfer import KVLayout, KVReceiver, KVSender, PeerUnavailableError, ReceiverServer, TransferConfig
from kvcache.transfer import wire
from kvcache.transfer._proto import kv_transfer_pb2 as pb
from kvcache.transfer.auth import METADATA_KEY, TokenCheck
from tests.kvcache.test_transfer import NUM_SRC_BLOCKS, RecordingAllocator, make_kv_cache

TOKEN = "deployment-token-for-tests"
CONFIG = TransferConfig(rpc_timeout_s=10.0, enable_shm=False)


@pytest.fixture
def server():
    kv_cache = make_kv_cache(32)
    receiver = KVReceiver(kv_cache, KVLayout.from_kv_cache(kv_cache, "test-model"), RecordingAllocator(32), CONFIG)
    server = ReceiverServer(receiver, token=TOKEN).start()
    yield server
    server.stop(grace_s=0.5)


def _raw_call(address: str, method: str, message: bytes, metadata) -> bytes:
    """One call with exactly the given metadata, as any local process could make it."""
    with grpc.insecure_channel(address) as channel:
        call = channel.unary_unary(wire.method_path(method))  # raw bytes both ways
        return call(message, timeout=10.0, metadata=metadata)


def _handshake_request() -> bytes:
    layout = KVLayout.from_kv_cache(make_kv_cache(1), "test-model")
    return pb.HandshakeRequest(layout=layout.to_proto(), host_id="elsewhere", sender_id="raw").SerializeToString()


@pytest.mark.parametrize("metadata", [None, ((METADATA_KEY, "Bearer wrong-token"),),
                                      ((METADATA_KEY, TOKEN),), (("x-other", f"Bearer {TOKEN}"),)],
                         ids=["none", "wrong", "no-bearer", "other-key"])
@pytest.mark.parametrize("method", ["Handshake", "PushChunk", "NoSuchMethod"])
def test_calls_without_the_token_are_refused_and_counted(server, metadata, method):
    message = _handshake_request() if method == "Handshake" else b"\x0a\x00"
    with pytest.raises(grpc.RpcError) as error:
        _raw_call(server.address, method, message, metadata)
    assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "needs the deployment's token" in error.value.details()
    assert TOKEN not in error.value.details()
    assert server.receiver.counters.snapshot()["num_unauthenticated_calls"] == 1
    assert server.receiver.num_open == 0


def test_a_call_with_the_token_reaches_the_receiver(server):
    reply = pb.HandshakeResponse.FromString(
        _raw_call(server.address, "Handshake", _handshake_request(), ((METADATA_KEY, f"Bearer {TOKEN}"),)))
    assert reply.layout.model_fingerprint == "test-model"
    assert server.receiver.counters.snapshot()["num_unauthenticated_calls"] == 0


def test_a_sender_with_the_token_transfers_and_one_without_is_refused(server):
    src = torch.randn(make_kv_cache(NUM_SRC_BLOCKS).shape)
    layout = KVLayout.from_kv_cache(src, "test-model")
    released = []
    sender = KVSender(src, layout, server.address, released.append, CONFIG, token=TOKEN).connect()
    try:
        handle = sender.begin("r", 40, [3, 17, 40])
        handle.send_layers(0, layout.num_layers)
        assert handle.finish(timeout_s=60.0).ok
    finally:
        sender.close()
    assert released == ["r"]
    for token in (None, "wrong-token"):
        with pytest.raises(PeerUnavailableError, match="UNAUTHENTICATED"):
            KVSender(src, layout, server.address, released.append, CONFIG, token=token).connect()
    assert server.receiver.counters.snapshot()["num_unauthenticated_calls"] == 2


def test_a_token_check_needs_a_token():
    with pytest.raises(ValueError, match="needs the deployment's token"):
        TokenCheck(None)
    with pytest.raises(ValueError, match="needs the deployment's token"):
        TokenCheck("")
