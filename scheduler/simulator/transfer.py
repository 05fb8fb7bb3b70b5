"""KV transfer timing: the `MoveModel` of every simulated instance, backed by one network.

A decode instance's `RecvKV` registers its reserved blocks: `started` at once (the runtime's worker
registers them with its receiver in the step that carries the move). A prefill instance's `SendKV`
is planned in the step that computes the prompt's last chunk; that step's forward pass is cut into G
layer groups (⌈L / layers_per_group⌉) and group g's KV leaves as soon as the group is computed:

    step starts at s, lasts T; group g is computed at c_g = s + T·(g+1)/G
    bytes per group  B/G, with B = prompt tokens x KV bytes per token (all layers, K and V)
    x = (B/G) / (bandwidth x lanes)         lanes = min(tp_p, tp_d) rank pairs moving their slices at
                                            once (x pp stage pairs when both phases have the same pp)
    group g leaves at max(c_g, end of group g−1, link free);  the last ends at
    done = max(s + T + x,  s + T/G + G·x,  link_free + G·x) + transfer_latency
           (last group after its compute; a link slower than compute; a link busy with earlier sends)

A SendKV planned before the receiver registered its RecvKV (the router starts the prefill while the
decode instance reserves) waits for it: its groups leave from the registration on (the runtime's sender
asks again until then), so `first_leaves` is at least the registration time. A send whose receive was
cancelled, or ended, fails at the step's end.

bandwidth is the cluster's intra-node figure when both instances share a node, its inter-node figure
otherwise. A link is the sender's egress and the receiver's ingress: transfers through either are
served one after another (link_free is the later of the two). At `done` the decode side's receive
finishes (the commit carries the first token) and the prefill side's send finishes (its lease ends);
data begins to move (`active`) when the first group leaves. `CancelKV` from either side ends an
unfinished transfer as failed on both sides at once.
"""
from __future__ import annotations

import heapq
import math
from dataclasses import dataclass
from typing import Callable

from scheduler.kv_moves import ACTIVE, FAILED, FINISHED, STARTED, CancelKV, KVMove, MoveResult, RecvKV, SendKV
from scheduler.simulator.spec import LinkSpec, SimInstanceSpec

IDEAL_PEER = "ideal"  # a decode peer that takes any KV at once (the prefill phase simulated alone)


class InstanceMoves:
    """The MoveModel of one instance: moves go to the network, results come back on a timeline."""

    def __init__(self, network: "TransferNetwork", spec: SimInstanceSpec) -> None:
        self.network = network
        self.spec = spec
        self._due: list[tuple[float, int, MoveResult]] = []
        self.num_events = 0  # moves started + results handed over (a step that moved nothing changes neither)

    def start(self, move: KVMove, now: float, step_seconds: float) -> None:
        self.num_events += 1
        self.network.start(self, move, now, step_seconds)

    def push(self, when: float, result: MoveResult) -> None:
        heapq.heappush(self._due, (when, self.network.next_seq(), result))
        self.network.notify(self, when)

    def due(self, now: float) -> list[MoveResult]:
        results = []
        while self._due and self._due[0][0] <= now:
            result = heapq.heappop(self._due)[2]
            if result.state == FAILED or not self.network.is_cancelled(result.request_id):
                results.append(result)  # a cancelled transfer's later results never happen
        self.num_events += len(results)
        return results


@dataclass
class _Transfer:
    receiver: InstanceMoves | None = None
    sender: InstanceMoves | None = None
    done_s: float | None = None  # when the send ends (known once it is planned)
    cancelled: bool = False
    waiting_send: tuple | None = None  # (sender, SendKV, step start, step seconds) planned before the receive


@dataclass
class TransferStats:
    num_transfers: int = 0
    num_bytes: int = 0
    num_cancelled: int = 0
    seconds_exposed: float = 0.0  # sum over transfers of done - end of the prefill step (what decode waits)
    seconds_link_wait: float = 0.0  # sum of time the first group waited for a busy link


class TransferNetwork:
    def __init__(self, links: LinkSpec, notify: Callable[[InstanceMoves, float], None], token_id: int = 0) -> None:
        self.links = links
        self.notify = notify  # a result is due for this instance at this time (wake it then)
        self.token_id = token_id  # the first token a commit carries (the latency executor's dummy)
        self.instances: dict[str, InstanceMoves] = {}
        self._transfers: dict[str, _Transfer] = {}
        self._link_free: dict[tuple[str, str], float] = {}  # ("out"|"in", instance) -> free at
        self._seq = 0
        self.stats = TransferStats()

    def register(self, spec: SimInstanceSpec) -> InstanceMoves:
        moves = InstanceMoves(self, spec)
        self.instances[spec.name] = moves
        return moves

    def next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def start(self, moves: InstanceMoves, move: KVMove, now: float, step_seconds: float) -> None:
        if isinstance(move, RecvKV):
            transfer = self._transfers.setdefault(move.request_id, _Transfer())
            transfer.receiver = moves
            moves.push(now, MoveResult(move.request_id, "recv", STARTED))
            if transfer.waiting_send is not None:
                sender, send, start, step_seconds = transfer.waiting_send
                transfer.waiting_send = None
                self._send(sender, send, start, step_seconds, registered_at=now)
        elif isinstance(move, SendKV):
            self._send(moves, move, now, step_seconds)
        elif isinstance(move, CancelKV):
            self._cancel(move.request_id, now, move.reason)
        else:  # swaps end with the step that carries them (their copies are priced in it: latency_executor.py)
            moves.push(now + step_seconds, MoveResult(move.request_id, move.kind, FINISHED))

    def deliver_now(self, moves: InstanceMoves, request_id: str, now: float) -> None:
        """The decode phase simulated alone: the prompt's KV and first token land at once."""
        moves.push(now, MoveResult(request_id, "recv", ACTIVE))
        moves.push(now, MoveResult(request_id, "recv", FINISHED, first_token_id=self.token_id))
        self._transfers.setdefault(request_id, _Transfer()).done_s = now

    def _send(self, sender: InstanceMoves, move: SendKV, start: float, step_seconds: float,
              registered_at: float = 0.0) -> None:
        step_end = start + step_seconds
        if move.peer == IDEAL_PEER:
            sender.push(step_end, MoveResult(move.request_id, "send", FINISHED))
            return
        transfer = self._transfers.setdefault(move.request_id, _Transfer())
        if transfer.receiver is None and not transfer.cancelled:  # planned before the receive: wait for it
            transfer.waiting_send = (sender, move, start, step_seconds)
            return
        if transfer.cancelled:  # the receive was cancelled: the send fails when it tries
            sender.push(step_end, MoveResult(move.request_id, "send", FAILED, "the receiver is gone"))
            return
        receiver = transfer.receiver
        p, d = sender.spec, receiver.spec
        bandwidth = self.links.intra_node_bytes_per_s if p.node == d.node else self.links.inter_node_bytes_per_s
        lanes = min(p.tp, d.tp) * (p.pp if p.pp == d.pp else 1)
        num_bytes = move.num_tokens * p.kv_bytes_per_token
        groups = max(1, math.ceil(p.num_layers / self.links.layers_per_group))
        per_group_s = num_bytes / groups / (bandwidth * lanes)
        out_key, in_key = ("out", p.name), ("in", d.name)
        link_free = max(self._link_free.get(out_key, 0.0), self._link_free.get(in_key, 0.0))
        first_leaves = max(start + step_seconds / groups, link_free, registered_at)
        done = max(step_end + per_group_s, first_leaves + groups * per_group_s) + self.links.transfer_latency_s
        self._link_free[out_key] = self._link_free[in_key] = done
        transfer.sender, transfer.done_s = sender, done
        stats = self.stats
        stats.num_transfers += 1
        stats.num_bytes += num_bytes
        stats.seconds_exposed += done - step_end
        stats.seconds_link_wait += max(0.0, link_free - (start + step_seconds / groups))
        receiver.push(first_leaves, MoveResult(move.request_id, "recv", ACTIVE))
        receiver.push(done, MoveResult(move.request_id, "recv", FINISHED, first_token_id=self.token_id))
        sender.push(done, MoveResult(move.request_id, "send", FINISHED))

    def _cancel(self, request_id: str, now: float, reason: str) -> None:
        transfer = self._transfers.get(request_id)
        if transfer is None or transfer.cancelled:
            return
        if transfer.done_s is not None and transfer.done_s <= now:
            return  # it ended already; its results are on their way
        transfer.cancelled = True
        self.stats.num_cancelled += 1
        if transfer.waiting_send is not None:  # planned, never started: its sender was still waiting
            transfer.sender, transfer.waiting_send = transfer.waiting_send[0], None
        for side, kind in ((transfer.receiver, "recv"), (transfer.sender, "send")):
            if side is not None:
                side.push(now, MoveResult(request_id, kind, FAILED, f"cancelled: {reason}"))

    def is_cancelled(self, request_id: str) -> bool:
        transfer = self._transfers.get(request_id)
        return transfer is not None and transfer.cancelled

    def done_time(self, request_id: str) -> float | None:
        """When the request's KV reached its decode instance (None: it did not move)."""
        transfer = self._transfers.get(request_id)
        return None if transfer is None or transfer.cancelled else transfer.done_s
