"""The prefill side's Reserve: blocks on the decode peer for one request, asked again while the peer has
not registered the request yet (the router starts the prefill while the decode instance reserves).

    RESOURCE_EXHAUSTED                 no room: TransferRefusedError (backpressure)
    NOT_FOUND                          not registered yet: ask again, backing off 1 ms -> 20 ms, for at most
                                       rpc_timeout_s or until should_stop() (then TransferRefusedError)
    UNAVAILABLE, DEADLINE_EXCEEDED,    up to max_retries more tries, then PeerUnavailableError
    ABORTED
    anything else                      PeerUnavailableError
"""
from __future__ import annotations

import time
from typing import Callable

import grpc

from kvcache.transfer._proto import kv_transfer_pb2 as pb
from kvcache.transfer.config import TransferConfig
from kvcache.transfer.counters import TransferCounters
from kvcache.transfer.peer import TRANSIENT_CODES, PeerClient, PeerUnavailableError, TransferRefusedError

_REGISTER_WAIT_MIN_S = 0.001
_REGISTER_WAIT_MAX_S = 0.02


def reserve(peer: PeerClient, request: pb.ReserveRequest, config: TransferConfig, counters: TransferCounters,
            should_stop: Callable[[], bool]) -> pb.ReserveResponse:
    request_id = request.request_id
    give_up_at = time.monotonic() + config.rpc_timeout_s
    backoff = _REGISTER_WAIT_MIN_S
    attempt = 0
    while True:
        try:
            return peer.reserve(request, config.rpc_timeout_s)
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.NOT_FOUND:  # the peer has not registered it yet: ask again
                if should_stop():
                    raise TransferRefusedError(f"request {request_id!r} was cancelled before its decode "
                                               "instance registered it") from e
                if time.monotonic() + backoff > give_up_at:
                    counters.add(num_refused=1)
                    raise TransferRefusedError(
                        f"the decode instance at {peer.address} did not register request {request_id!r} "
                        f"within {config.rpc_timeout_s:g}s (--kv-transfer-rpc-timeout-s)") from e
                time.sleep(backoff)
                backoff = min(2 * backoff, _REGISTER_WAIT_MAX_S)
                continue
            if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                counters.add(num_refused=1)
                raise TransferRefusedError(e.details()) from e
            if e.code() not in TRANSIENT_CODES or attempt == config.max_retries:
                counters.add(num_failed=1)
                raise PeerUnavailableError(f"reserving KV blocks on {peer.address} failed: "
                                           f"{e.code().name}: {e.details()}") from e
            counters.add(num_retries=1)
            attempt += 1
