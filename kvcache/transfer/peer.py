"""The prefill side's connection to one decode peer: a small pool of channels and typed calls.

Every call takes a timeout and carries the deployment's token, if one is given (kvcache.transfer.auth);
chunk pushes rotate over the channels, each of which is its own TCP connection (a local subchannel
pool), so several chunks travel on separate sockets at once.
"""
from __future__ import annotations

import itertools
import threading

import grpc

from kvcache.transfer import wire
from kvcache.transfer._proto import kv_transfer_pb2 as pb
from kvcache.transfer.auth import call_metadata
from kvcache.transfer.config import TransferConfig

# Failures worth one more try: the peer may be restarting or briefly overloaded.
TRANSIENT_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                             grpc.StatusCode.ABORTED})


class TransferRefusedError(RuntimeError):
    """The decode peer has no room for the request's blocks now (backpressure); nothing is held."""


class PeerUnavailableError(ConnectionError):
    """The decode peer did not answer (after one retry) or refused the call for a reason other than
    layout or room; the message carries the gRPC status."""


def describe_rpc_error(error: BaseException | str) -> str:
    if isinstance(error, grpc.RpcError):
        return f"{error.code().name}: {error.details()}"
    return str(error) or type(error).__name__


class PeerClient:
    def __init__(self, address: str, config: TransferConfig, token: str | None = None) -> None:
        options = wire.grpc_options(config) + [("grpc.use_local_subchannel_pool", 1)]
        self.address = address
        self._metadata = call_metadata(token)
        self._channels = [grpc.insecure_channel(address, options=options) for _ in range(config.num_channels)]
        self._push_calls = [channel.unary_unary(wire.method_path("PushChunk"), request_serializer=wire.identity,
                                                response_deserializer=pb.ChunkAck.FromString)
                            for channel in self._channels]
        self._next_channel = itertools.count()
        self._next_lock = threading.Lock()
        control = self._channels[0]

        def call(name: str, response_type):
            return control.unary_unary(wire.method_path(name), request_serializer=lambda m: m.SerializeToString(),
                                       response_deserializer=response_type.FromString)
        self._handshake = call("Handshake", pb.HandshakeResponse)
        self._attach_shm = call("AttachShm", pb.AttachShmResponse)
        self._detach_shm = call("DetachShm", pb.DetachShmResponse)
        self._reserve = call("Reserve", pb.ReserveResponse)
        self._commit = call("Commit", pb.CommitResponse)
        self._abort = call("Abort", pb.AbortResponse)

    def handshake(self, request: pb.HandshakeRequest, timeout_s: float) -> pb.HandshakeResponse:
        # wait_for_ready: the peer may still be starting; the timeout bounds the wait.
        return self._handshake(request, timeout=timeout_s, wait_for_ready=True, metadata=self._metadata)

    def attach_shm(self, request: pb.AttachShmRequest, timeout_s: float) -> pb.AttachShmResponse:
        return self._attach_shm(request, timeout=timeout_s, metadata=self._metadata)

    def detach_shm(self, request: pb.DetachShmRequest, timeout_s: float) -> pb.DetachShmResponse:
        return self._detach_shm(request, timeout=timeout_s, metadata=self._metadata)

    def reserve(self, request: pb.ReserveRequest, timeout_s: float) -> pb.ReserveResponse:
        return self._reserve(request, timeout=timeout_s, metadata=self._metadata)

    def push(self, message: bytes, timeout_s: float) -> pb.ChunkAck:
        with self._next_lock:
            index = next(self._next_channel) % len(self._push_calls)
        return self._push_calls[index](message, timeout=timeout_s, metadata=self._metadata)

    def commit(self, request: pb.CommitRequest, timeout_s: float) -> pb.CommitResponse:
        return self._commit(request, timeout=timeout_s, metadata=self._metadata)

    def abort(self, request: pb.AbortRequest, timeout_s: float) -> pb.AbortResponse:
        return self._abort(request, timeout=timeout_s, metadata=self._metadata)

    def close(self) -> None:
        for channel in self._channels:
            channel.close()
