"""KV moves: plan items that copy a request's KV somewhere, and the bookkeeping of those in flight.

The scheduler decides moves (through its connector policy and, later, its preemption policy), puts
them in `StepPlan.kv_moves`, and the executor's connector worker carries them out. A move can outlast
the step that issued it (a transfer over the network); its end comes back in a later `StepResult` as a
`MoveResult`:

    SendKV   a finished prompt's KV to a decode peer, layer group by layer group as prefill computes
    RecvKV   accept a peer's KV into blocks the scheduler reserved (decode side of SendKV)
    SwapOut  device blocks -> host blocks (preemption by swapping)
    SwapIn   host blocks -> device blocks
    AdoptKV  take over blocks another worker wrote into a shared pool (semi-PD)
    CancelKV stop a request's moves still in flight; they end as failed (or finished, if they won the race)

A copy may be reading or writing a request's blocks while the move is in flight, so `MoveTracker`
keeps the blocks of a finished request until every one of its moves has ended: the pool never hands
a block to another request under a running copy.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Union

STARTED, ACTIVE, FINISHED, FAILED = "started", "active", "finished", "failed"


@dataclass(frozen=True)
class SendKV:
    request_id: str
    block_ids: list[int]
    num_tokens: int  # the prompt's: these tokens' KV is sent (the first output token's is not)
    peer: str  # the decode instance's KV-transfer address
    kind = "send"


@dataclass(frozen=True)
class RecvKV:
    request_id: str
    block_ids: list[int]  # reserved for the prompt's KV
    num_tokens: int
    kind = "recv"


@dataclass(frozen=True)
class SwapOut:
    request_id: str
    block_ids: list[int]
    host_block_ids: list[int]
    # a finished request's KV copied to the host prefix cache: it outlives its request, so the
    # scheduler does not track it (its host blocks are the host tier's to settle)
    offload: bool = False
    kind = "swap_out"


@dataclass(frozen=True)
class SwapIn:
    request_id: str
    host_block_ids: list[int]
    block_ids: list[int]
    kind = "swap_in"


def spans(pairs: list[tuple[int, int]]) -> list[tuple[int, int, int]]:
    """(source, destination) block pairs -> runs (first source, first destination, length) where both
    sides continue by one."""
    runs: list[tuple[int, int, int]] = []
    for src, dst in pairs:
        if runs and runs[-1][0] + runs[-1][2] == src and runs[-1][1] + runs[-1][2] == dst:
            runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + 1)
        else:
            runs.append((src, dst, 1))
    return runs


@dataclass(frozen=True)
class AdoptKV:
    request_id: str
    block_ids: list[int]
    kind = "adopt"


@dataclass(frozen=True)
class CancelKV:
    request_id: str
    reason: str
    kind = "cancel"


KVMove = Union[SendKV, RecvKV, SwapOut, SwapIn, AdoptKV, CancelKV]


@dataclass(frozen=True)
class MoveResult:
    """What became of a move: `started` (the worker took it: a RecvKV is ready to receive), `active`
    (data began to move: a peer's transfer into a RecvKV's blocks began), `finished` or `failed` (it
    ended; no copy touches its blocks any more)."""
    request_id: str
    kind: str  # the move's kind ("send", "recv", ...)
    state: str  # STARTED, ACTIVE, FINISHED or FAILED
    reason: str = ""  # why it failed
    first_token_id: int | None = None  # a RecvKV's commit may carry the prefill's first token

    @property
    def ended(self) -> bool:
        return self.state in (FINISHED, FAILED)


@dataclass
class MoveTracker:
    """Moves in flight per request. Mutated only by the scheduler (issue when planned, end on results)."""
    _in_flight: dict[str, dict[str, KVMove]] = field(default_factory=dict)
    num_started: dict[str, int] = field(default_factory=dict)  # per kind, cumulative
    num_finished: dict[str, int] = field(default_factory=dict)
    num_failed: dict[str, int] = field(default_factory=dict)

    def issue(self, move: KVMove) -> None:
        if isinstance(move, CancelKV) or getattr(move, "offload", False):
            return  # not a move of its own (it ends the request's moves), or one that outlives its request
        moves = self._in_flight.setdefault(move.request_id, {})
        if move.kind in moves:
            raise ValueError(f"request {move.request_id!r} already has a {move.kind} move in flight")
        moves[move.kind] = move
        self.num_started[move.kind] = self.num_started.get(move.kind, 0) + 1

    def end(self, result: MoveResult) -> KVMove | None:
        """Record a move's end; returns the move, or None if it had ended already (e.g. a cancel lost
        the race with a completion: the second report is dropped)."""
        moves = self._in_flight.get(result.request_id)
        move = moves.pop(result.kind, None) if moves else None
        if move is None:
            return None
        if not moves:
            del self._in_flight[result.request_id]
        counts = self.num_finished if result.state == FINISHED else self.num_failed
        counts[result.kind] = counts.get(result.kind, 0) + 1
        return move

    def in_flight(self, request_id: str) -> list[KVMove]:
        return list(self._in_flight.get(request_id, {}).values())

    def has(self, request_id: str, kind: str) -> bool:
        return kind in self._in_flight.get(request_id, {})

    def __len__(self) -> int:
        return sum(len(m) for m in self._in_flight.values())

    @property
    def request_ids(self) -> list[str]:
        return list(self._in_flight)
