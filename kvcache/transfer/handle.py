"""One request's outgoing transfer, as the engine sees it."""
from __future__ import annotations

import enum
import threading
import time
from dataclasses import dataclass
from typing import Callable, Protocol

import torch


class TransferDriver(Protocol):
    """What a handle asks of the sender that created it (kvcache.transfer.sender.KVSender)."""

    def submit_layers(self, handle: TransferHandle, layer_start: int, layer_end: int) -> None: ...

    def first_token_set(self, handle: TransferHandle) -> None: ...

    def fail(self, handle: TransferHandle, reason: str, notify_peer: bool = True, requested: bool = False) -> None:
        ...


class TransferState(enum.Enum):
    ACTIVE = "active"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


@dataclass(frozen=True)
class TransferResult:
    request_id: str
    ok: bool
    num_bytes: int        # payload bytes acknowledged by the peer, over all attempts
    seconds: float        # begin() -> acknowledgement or failure
    num_attempts: int
    # What the engine should do: "none" on success, else TransferConfig.failure_policy
    # ("recompute": prefill again on the decode side, "fail": fail the request).
    action: str
    reason: str = ""      # why it failed; "" on success


class TransferHandle:
    """Created by KVSender.begin(). send_layers() as prefill finishes layers; then finish() or poll().

    The transfer commits by itself once every layer was handed over and every chunk acknowledged;
    finish() only waits for that. Thread-safe.
    """

    def __init__(self, sender: TransferDriver, request_id: str, num_tokens: int, src_block_ids: torch.Tensor,
                 num_layers: int, on_done: Callable[[TransferResult], None],
                 with_first_token: bool = False) -> None:
        self.request_id = request_id
        self.num_tokens = num_tokens
        self.src_block_ids = src_block_ids        # [num_blocks] int64, ids in the prefill kv_cache
        self.on_done = on_done
        self.lock = threading.Lock()
        self.started = time.monotonic()
        # Guarded by lock:
        self.state = TransferState.ACTIVE
        self.attempt = 0
        self.restarting = False                   # a retry is reserving again; chunks wait for it
        self.layers_submitted = torch.zeros(num_layers, dtype=torch.bool)   # [num_layers]
        self.layer_ranges: list[tuple[int, int]] = []   # submitted ranges, to resend on a retry
        self.num_outstanding = 0                  # chunks of the current attempt not yet acked
        self.num_bytes_acked = 0
        self.with_first_token = with_first_token  # the commit waits for the first token
        self.first_token_id: int | None = None
        self.committing = -1                      # the attempt whose commit was spawned
        self.num_in_flight = 0                    # chunks of any attempt not yet done
        self.target = None                        # a OneSidedTarget when written into the peer's pool
        self._sender = sender
        self._done = threading.Event()
        self._result: TransferResult | None = None

    @property
    def all_layers_submitted(self) -> bool:
        return bool(self.layers_submitted.all())

    @property
    def ready_to_commit(self) -> bool:
        """Every layer sent and acknowledged (and the first token known, if the commit carries it).
        Caller holds the lock."""
        return (self.num_outstanding == 0 and self.all_layers_submitted
                and (self.first_token_id is not None or not self.with_first_token)
                # one-sided: the commit vouches that no write of any attempt still runs
                and (self.target is None or self.num_in_flight == 0))

    def set_first_token(self, token_id: int) -> None:
        """The token the prefill sampled from this prompt: carried by the commit."""
        with self.lock:
            if self.first_token_id is not None:
                return
            self.first_token_id = token_id
        self._sender.first_token_set(self)

    def send_layers(self, layer_start: int, layer_end: int) -> None:
        """Ship layers [layer_start, layer_end) of this request's blocks; returns at once (the copy
        and the send run on the sender's threads). Their KV must already be in the cache. Each layer
        is sent once; after a failure this is a no-op (see finish())."""
        self._sender.submit_layers(self, layer_start, layer_end)

    def poll(self) -> TransferResult | None:
        """The result once the transfer has ended, else None. Never blocks."""
        return self._result

    def finish(self, timeout_s: float) -> TransferResult:
        """Wait up to timeout_s for the acknowledgement. If it has not come by then the transfer is
        failed (lease released, peer told to drop it) and that failure is returned."""
        if not self._done.wait(timeout_s):
            # Ends the transfer synchronously, unless a success won the race: either way the
            # result is set when this returns.
            self._sender.fail(self, f"no acknowledgement within {timeout_s:g} s")
        return self._result

    def abort(self, reason: str) -> None:
        """Give up (e.g. the client went away): no retry, lease released, peer told to drop it."""
        self._sender.fail(self, reason, requested=True)

    def set_result(self, result: TransferResult) -> None:
        """Called once by the sender (under self.lock) when the transfer ends."""
        self._result = result
        self._done.set()
