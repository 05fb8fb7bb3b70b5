"""Preemption policies: what happens to a victim's KV when the pool runs out.

- `RecomputePreemption` drops it: the request is prefilled again (prompt + outputs so far) when
  resumed, and its full blocks stay in the prefix cache until evicted, so a resume often recomputes
  little.
- `SwapPreemption` (`--preemption-mode swap`) copies it to a host-memory tier (kvcache/host_tier.py):
  the victim's computed blocks get host blocks, a `SwapOut` move copies those the host does not hold
  yet, and the device blocks go back to the pool at once. The executor guarantees that a plan's swap
  copies of a layer finish before that plan's forward pass touches the layer
  (serving/kv_connector/swap.py), so a block freed here may serve another request in the same step.
  On resume the request gets device blocks and a `SwapIn`; it keeps its computed tokens and computes
  only what is new, and its host copy stays valid, so its next swap-out copies only new tokens. With
  the prefix cache on, a finished request's full blocks are offloaded to the host tier, which serves
  them to a later request with the same prefix (the next turn of a conversation) by a `SwapIn`
  instead of a recompute. When the host tier has no room, the victim is recomputed instead (counted).

The host tier's accounting lives here; its tensors live with the executor's swap worker, which uses
the same block ids.
"""
from __future__ import annotations

from typing import Protocol

from kvcache.host_tier import HostTier
from kvcache.kv_manager import KVCacheManager
from scheduler.kv_moves import FAILED, FINISHED, KVMove, MoveResult, SwapIn, SwapOut
from scheduler.request import Request, RequestStatus


class PreemptionPolicy(Protocol):
    name: str

    def preempt(self, request: Request, kv: KVCacheManager) -> list[KVMove]:
        """Take the request's device blocks back (or say how to move them off the device) and mark it
        preempted (PREEMPTED: recomputed on resume; SWAPPED: its KV waits in the host tier). Mutates
        request and kv; returns the moves to plan."""

    def resume(self, request: Request, block_ids: list[int]) -> list[KVMove]:
        """A SWAPPED request was given device blocks (its computed tokens' first): the moves that
        bring its KV back."""

    def prefix_hits(self, request: Request, num_device_blocks: int) -> list[int]:
        """Host blocks of a new request's prefix past the device prefix cache's hits ([] for none):
        the request's first blocks, in order, the first num_device_blocks of them to be skipped."""

    def bring_in(self, request: Request, hits: list[int], num_device_blocks: int,
                 block_ids: list[int]) -> list[KVMove]:
        """The new request was given device blocks (block_ids, its table) for its prefix: the moves that
        fill those past the first num_device_blocks (device cache hits) from the host blocks `hits`."""

    def offload(self, request: Request, kv: KVCacheManager) -> list[KVMove]:
        """The request finished, its device blocks about to be freed: the moves that keep its KV."""

    def on_move(self, result: MoveResult) -> None:
        """A swap move ended (failed ones before the scheduler recomputes their requests)."""

    def release(self, request_id: str) -> None:
        """The request ended (or will be recomputed): what it holds in the host tier goes back."""

    def counters(self) -> dict[str, float]: ...


class RecomputePreemption:
    name = "recompute"

    def __init__(self) -> None:
        self.num_recomputed = 0

    def preempt(self, request: Request, kv: KVCacheManager) -> list[KVMove]:
        kv.free(request.request_id)
        request.num_computed_tokens = 0
        request.status = RequestStatus.PREEMPTED
        self.num_recomputed += 1
        return []

    def resume(self, request: Request, block_ids: list[int]) -> list[KVMove]:
        raise RuntimeError(f"request {request.request_id} is swapped but the preemption mode is recompute")

    def prefix_hits(self, request: Request, num_device_blocks: int) -> list[int]:
        return []

    def bring_in(self, request: Request, hits: list[int], num_device_blocks: int,
                 block_ids: list[int]) -> list[KVMove]:
        return []

    def offload(self, request: Request, kv: KVCacheManager) -> list[KVMove]:
        return []

    def on_move(self, result: MoveResult) -> None:
        pass

    def release(self, request_id: str) -> None:
        pass

    def counters(self) -> dict[str, float]:
        return {"preemptions_recompute": self.num_recomputed}


class SwapPreemption:
    """Swap to the host tier; recompute when it has no room."""
    name = "swap"

    def __init__(self, host: HostTier) -> None:
        self.host = host
        self.num_recomputed = 0  # preemptions the host tier had no room for
        self.num_swapped_out = 0
        self.num_swapped_in = 0
        self.num_blocks_out = 0  # blocks copied out (a kept copy's blocks are not copied again)
        self.num_blocks_in = 0
        self.num_failed = 0

    def preempt(self, request: Request, kv: KVCacheManager) -> list[KVMove]:
        request_id = request.request_id
        num_computed = request.num_computed_tokens
        reserved = self.host.reserve(request_id, request.token_view, num_computed) if num_computed > 0 else None
        if reserved is None:
            self.num_recomputed += 1
            self.host.release(request_id)
            kv.free(request_id)
            request.num_computed_tokens = 0
            request.status = RequestStatus.PREEMPTED
            return []
        first, host_blocks = reserved
        blocks = kv.block_ids(request_id)[:len(host_blocks)]
        moves: list[KVMove] = []
        if first < len(blocks):
            moves.append(SwapOut(request_id, list(blocks[first:]), host_blocks[first:]))
        kv.free(request_id)  # reusable in this very step: the copy of each layer runs before its writes
        request.status = RequestStatus.SWAPPED
        self.num_swapped_out += 1
        self.num_blocks_out += len(blocks) - first
        return moves

    def resume(self, request: Request, block_ids: list[int]) -> list[KVMove]:
        host_blocks = self.host.block_ids(request.request_id)
        if len(block_ids) < len(host_blocks):
            raise RuntimeError(f"request {request.request_id} resumes with {len(block_ids)} device blocks for "
                               f"{len(host_blocks)} swapped ones")
        self.host.resuming(request.request_id)
        self.num_swapped_in += 1
        self.num_blocks_in += len(host_blocks)
        return [SwapIn(request.request_id, list(host_blocks), list(block_ids[:len(host_blocks)]))]

    def prefix_hits(self, request: Request, num_device_blocks: int) -> list[int]:
        hits = self.host.lookup_prefix(request.token_view)
        return hits if len(hits) > num_device_blocks else []

    def bring_in(self, request: Request, hits: list[int], num_device_blocks: int,
                 block_ids: list[int]) -> list[KVMove]:
        self.host.hold_prefix(request.request_id, hits)
        self.num_blocks_in += len(hits) - num_device_blocks
        return [SwapIn(request.request_id, hits[num_device_blocks:],
                       list(block_ids[num_device_blocks:len(hits)]))]

    def offload(self, request: Request, kv: KVCacheManager) -> list[KVMove]:
        request_id = request.request_id
        offloaded = self.host.offload(request_id, request.token_view, request.num_computed_tokens)
        if offloaded is None:
            return []
        first, host_blocks = offloaded
        blocks = kv.block_ids(request_id)[:len(host_blocks)]
        return [SwapOut(request_id, list(blocks[first:]), host_blocks[first:len(blocks)], offload=True)]

    def on_move(self, result: MoveResult) -> None:
        host = self.host
        if result.kind == "swap_out" and host.is_offloading(result.request_id):
            host.offload_ended(result.request_id, result.state == FINISHED)
            return
        if result.state == FAILED:
            self.num_failed += 1
            host.release(result.request_id, evict=True)  # lost or half-written: never served
        elif result.kind == "swap_in" and result.state == FINISHED:
            host.swapped_in(result.request_id)

    def release(self, request_id: str) -> None:
        self.host.release(request_id)

    def counters(self) -> dict[str, float]:
        host = self.host
        return {"preemptions_recompute": self.num_recomputed, "preemptions_swap": self.num_swapped_out,
                "swap_in_requests": self.num_swapped_in, "swap_out_blocks": self.num_blocks_out,
                "swap_in_blocks": self.num_blocks_in, "swap_failed": self.num_failed,
                "host_prefix_hit_tokens": host.num_prefix_hit_tokens,
                "host_offloaded_blocks": host.num_offloaded_blocks}

    def host_usage(self) -> float:
        """Fraction of the host tier's blocks held (by swapped requests and kept copies; cached free
        blocks count as free)."""
        return self.host.num_used_blocks / self.host.pool.num_blocks


PREEMPTION_MODES = ("recompute", "swap")


def make_preemption(mode: str, host: HostTier | None = None) -> PreemptionPolicy:
    """host: the host tier's block accounting (swap only)."""
    if mode not in PREEMPTION_MODES:
        raise ValueError(f"--preemption-mode must be one of {', '.join(PREEMPTION_MODES)}, got {mode!r}")
    if mode == "recompute":
        return RecomputePreemption()
    if host is None:
        raise ValueError("--preemption-mode swap needs a host tier: set --swap-space (GiB of host memory)")
    return SwapPreemption(host)
