"""Routing policy: which prefill and which decode instance a request goes to. The runtime's router
(serving/router/pool.py) and the simulator both ask it, about whatever they know of each instance.

    prefill  the one with the fewest prompt tokens sent to it and not yet answered (queueing delay
             is what TTFT waits behind)
    decode   candidates best first: most free KV blocks (estimated: last poll minus what the router has
             reserved there since), then fewest requests streaming from it
    replica  (colocated replicas, data parallel) the one with the fewest prompt tokens sent to it and
             not yet answered, then the fewest requests streaming from it: a new prompt waits behind
             queued prompts first, and shares its decode batch with the streaming ones after
    overlap  the prefill starts while the decode instance reserves (rather than once it has accepted)
             when that instance's estimate says the blocks are free: the reservation answers only after
             the decode step running when it arrives and the next one (1-2 steps of TTFT saved); when
             the estimate is short the reservation may be refused, and a prefill started for it would
             be thrown away, so it waits
"""
from __future__ import annotations

from typing import Protocol, Sequence, TypeVar


class InstanceView(Protocol):
    """What routing reads of an instance (an InstanceState of the router, a simulated instance)."""
    role: str
    num_queued_prefill_tokens: int
    num_active: int

    @property
    def accepting(self) -> bool:
        """Up, and taking new requests (not draining)."""

    @property
    def num_free_blocks_estimate(self) -> int: ...


I = TypeVar("I", bound=InstanceView)


class LeastLoadedRouting:
    def up(self, instances: Sequence[I], role: str) -> list[I]:
        """The instances of `role` that take new requests."""
        return [i for i in instances if i.accepting and i.role == role]

    def pick_prefill(self, instances: Sequence[I]) -> I | None:
        return min(self.up(instances, "prefill"), key=lambda i: i.num_queued_prefill_tokens, default=None)

    def pick_replica(self, instances: Sequence[I]) -> I | None:
        return min(self.up(instances, "colocated"), key=lambda i: (i.num_queued_prefill_tokens, i.num_active),
                   default=None)

    def decode_candidates(self, instances: Sequence[I]) -> list[I]:
        return sorted(self.up(instances, "decode"), key=lambda i: (-i.num_free_blocks_estimate, i.num_active))

    def prefill_while_reserving(self, decode: I, num_blocks: int) -> bool:
        """Start the prefill before `decode` has accepted a reservation of num_blocks (asked before the
        reservation is counted in its estimate)."""
        return decode.num_free_blocks_estimate >= num_blocks
