"""A shared token on internal gRPC calls: what a call carries, and the server side's check.

Every process of one deployment holds the same token (the API server makes one per launch). A client
sends it as call metadata, `authorization: Bearer <token>`; a server interceptor lets a call through
only if it carries exactly that, and otherwise answers UNAUTHENTICATED before any handler runs. The
KV receiver's sync `grpc.server` uses `ServerTokenInterceptor`; the instance's `grpc.aio.server` uses
`AioServerTokenInterceptor` (serving/instance/servicer.py). Both count refusals into the given
TransferCounters (`num_unauthenticated_calls`) and log each one with the caller's address, never the
token or what was sent in its place.
"""
from __future__ import annotations

import logging
import secrets

import grpc

from kvcache.transfer.counters import TransferCounters

logger = logging.getLogger(__name__)

METADATA_KEY = "authorization"  # gRPC metadata keys are lowercase
REFUSAL = ("this internal pdserve service needs the deployment's token (call metadata "
           f"'{METADATA_KEY}: Bearer <token>'); the call carried none or a wrong one")


def call_metadata(token: str | None) -> tuple[tuple[str, str], ...] | None:
    """The metadata a client attaches to every call; None (nothing) without a token."""
    return ((METADATA_KEY, f"Bearer {token}"),) if token else None


class TokenCheck:
    """Compares a call's metadata with the token (in constant time) and counts what it refuses.
    Thread-safe; one check may serve several servers."""

    def __init__(self, token: str | None, counters: TransferCounters | None = None) -> None:
        if not token:
            raise ValueError("an internal gRPC service needs the deployment's token; the launcher "
                             "generates one per deployment and hands it to every instance")
        self.token = token
        self.counters = counters or TransferCounters()
        self._expected = f"Bearer {token}".encode()

    def allows(self, metadata) -> bool:
        """True if the metadata ((key, value) pairs) carries the token. Mutates nothing."""
        for key, value in metadata or ():
            if key == METADATA_KEY:
                sent = value.encode() if isinstance(value, str) else bytes(value)
                return secrets.compare_digest(sent, self._expected)
        return False

    def refused(self, method: str, peer: str) -> None:
        """Count and log one refused call."""
        self.counters.add(num_unauthenticated_calls=1)
        logger.warning("refused an internal call to %s from %s: no or wrong deployment token", method, peer)

    @property
    def num_unauthenticated_calls(self) -> int:
        return self.counters.snapshot()["num_unauthenticated_calls"]


def _refusing_handler(handler: grpc.RpcMethodHandler | None, refuse) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` (unary or streaming each way) whose behaviour is
    `refuse`; requests stay raw bytes (nothing from an unauthenticated caller is parsed). An unknown
    method is refused the same way, so that a caller without the token learns nothing."""
    if handler is None or not (handler.request_streaming or handler.response_streaming):
        return grpc.unary_unary_rpc_method_handler(refuse)
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(refuse)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(refuse)
    return grpc.unary_stream_rpc_method_handler(refuse)


class ServerTokenInterceptor(grpc.ServerInterceptor):
    """For a sync grpc.server: calls without the token end UNAUTHENTICATED before any handler runs."""

    def __init__(self, check: TokenCheck) -> None:
        self.check = check

    def intercept_service(self, continuation, handler_call_details):
        if self.check.allows(handler_call_details.invocation_metadata):
            return continuation(handler_call_details)
        method = handler_call_details.method

        def refuse(request, context: grpc.ServicerContext):
            self.check.refused(method, context.peer())
            context.abort(grpc.StatusCode.UNAUTHENTICATED, REFUSAL)
        return _refusing_handler(continuation(handler_call_details), refuse)


class AioServerTokenInterceptor(grpc.aio.ServerInterceptor):
    """For a grpc.aio.server: calls without the token end UNAUTHENTICATED before any handler runs."""

    def __init__(self, check: TokenCheck) -> None:
        self.check = check

    async def intercept_service(self, continuation, handler_call_details):
        if self.check.allows(handler_call_details.invocation_metadata):
            return await continuation(handler_call_details)
        method = handler_call_details.method

        async def refuse(request, context: grpc.aio.ServicerContext):
            self.check.refused(method, context.peer())
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, REFUSAL)
        return _refusing_handler(await continuation(handler_call_details), refuse)
