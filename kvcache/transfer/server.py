"""Serving a KVReceiver over gRPC: method table, (de)serializers, lifecycle."""
from __future__ import annotations

from concurrent import futures
from typing import Callable

import grpc

from kvcache.transfer import wire
from kvcache.transfer._proto import kv_transfer_pb2 as pb
from kvcache.transfer.auth import ServerTokenInterceptor, TokenCheck
from kvcache.transfer.receiver import KVReceiver, RpcError


def _unary(method: Callable, request_deserializer: Callable, response_serializer: Callable
           ) -> grpc.RpcMethodHandler:
    def handle(request, context: grpc.ServicerContext):
        try:
            return method(request)
        except RpcError as e:
            if e.trailing_metadata:
                context.set_trailing_metadata(e.trailing_metadata)
            context.abort(e.code, e.details)
    return grpc.unary_unary_rpc_method_handler(handle, request_deserializer=request_deserializer,
                                               response_serializer=response_serializer)


def receiver_handler(receiver: KVReceiver) -> grpc.GenericRpcHandler:
    """The KVTransfer service of proto/kv_transfer.proto; PushChunk takes its message as raw bytes
    (wire.parse_chunk reads it in place) instead of decoding it with protobuf."""
    def proto(method: Callable, request_type) -> grpc.RpcMethodHandler:
        return _unary(method, request_type.FromString, lambda response: response.SerializeToString())
    return grpc.method_handlers_generic_handler(wire.SERVICE_NAME, {
        "Handshake": proto(receiver.handshake, pb.HandshakeRequest),
        "AttachShm": proto(receiver.attach_shm, pb.AttachShmRequest),
        "DetachShm": proto(receiver.detach_shm, pb.DetachShmRequest),
        "Reserve": proto(receiver.reserve, pb.ReserveRequest),
        "PushChunk": _unary(receiver.push_chunk, wire.identity, lambda ack: ack.SerializeToString()),
        "Commit": proto(receiver.commit, pb.CommitRequest),
        "Abort": proto(receiver.abort, pb.AbortRequest),
    })


class ReceiverServer:
    """A gRPC server hosting one KVReceiver on host:port (port 0: the OS picks a free one).

    With a token, every call must carry it (kvcache.transfer.auth); refusals are counted in the
    receiver's counters. Without one (None) nothing is checked: for use outside a deployment only.
    """

    def __init__(self, receiver: KVReceiver, host: str = "127.0.0.1", port: int = 0, max_workers: int = 16,
                 token: str | None = None) -> None:
        self.receiver = receiver
        self.host = host
        interceptors = [ServerTokenInterceptor(TokenCheck(token, receiver.counters))] if token else []
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers, thread_name_prefix="kv-receiver"),
                                  options=wire.grpc_options(receiver.config), interceptors=interceptors)
        self.server.add_generic_rpc_handlers((receiver_handler(receiver),))
        bind_host = f"[{host}]" if ":" in host else host
        self.port = self.server.add_insecure_port(f"{bind_host}:{port}")
        if self.port == 0:
            raise OSError(f"cannot bind the KV receiver to {host}:{port}; pick another --kv-port or host")

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def start(self) -> ReceiverServer:
        self.receiver.start()
        self.server.start()
        return self

    def stop(self, grace_s: float = 1.0) -> None:
        """Stop serving (in-flight RPCs get grace_s), then drop open transfers."""
        self.server.stop(grace_s).wait(grace_s + 5.0)
        self.receiver.close()
