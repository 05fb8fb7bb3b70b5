"""Fair shares between clients: the Virtual Token Counter (VTC) of Sheng et al., "Fairness in Serving
Large Language Models" (OSDI '24, arXiv:2401.00588, Algorithm 2), after its reference scheduler
(github.com/Ying1123/VTC-artifact, slora/server/router/vtc_req_queue.py).

Each client (`Request.client_id`, the OpenAI `user` field; requests without one are one client, "")
has a counter of the service it received, in weighted tokens over its weight:

    counter += (prompt tokens x prefill_weight + output tokens x decode_weight) / client weight

The waiting queue serves the backlogged client with the lowest counter first, each client's requests
in arrival order, so clients that all keep requests waiting get equal service (a client of weight 2
twice as much), however many requests each sends.

As the paper, and where this differs:
- The lift (Algorithm 2): a client's request entering the queue while the client has none waiting
  lifts its counter to max(own, lowest counter of the clients with requests waiting), or, when nobody
  waits, to max(own, counter of the last client whose queue emptied). A client back from an idle hour
  so starts level with the busy ones instead of with an hour of credit. "Waiting" is the paper's Q,
  the waiting queue: a client whose requests all run is not backlogged.
- Charged when computed (`on_scheduled`, per scheduled request per step), not the whole prompt at
  admission: prompt tokens as their chunks run (prefix-cache hits are not computed, not charged) and
  one output token per step that samples one. Recomputation after a preemption is not charged again:
  a request with output already had its prompt computed, and only the position that samples a new
  token is new work. A request preempted before its first token is charged again for the prompt
  chunks it recomputes (at most those it had done); swap preemption recomputes nothing.
- The queue orders by each client's counter as of the last re-ranking (every `update_interval`
  steps that served tokens) plus, for a client just admitted from, that request's estimated cost:
  the paper charges a prompt at admission, which is what stops one client taking a whole step's
  admissions before its counter moves.
- Preemption (the paper's VTC never preempts): a waiting request preempts a running request of a
  client whose counter is ahead of its own by more than `preemption_threshold`; 0 turns it off.

The paper bounds the service difference of two backlogged clients by 2 x max(prefill_weight x
L_input, decode_weight x M) (its fairness theorem, section 4; L_input the longest prompt, M the tokens
a running batch holds). Here the order lags the counters by up to `update_interval` steps, each
serving at most prefill_weight x max_num_batched_tokens + decode_weight x max_num_seqs, which adds
that much per step of the interval (docs/fairness.md; tests/scheduler/test_vtc.py checks it).

Memory: a client is forgotten when nothing tells it from a new one: no request waiting, no service
for _IDLE_STEPS steps, and a counter at or below the floor (what an arrival is lifted to; it never
goes down), so it would come back exactly where a new client starts; the no-service condition keeps
a client whose requests all run on its counter. Past _MAX_CLIENTS clients the idle ones with the
lowest counters go too (they lose a little debt).
"""
from __future__ import annotations

import heapq
import itertools
from collections import deque
from typing import TYPE_CHECKING, Iterator

from scheduler.request import Request

if TYPE_CHECKING:
    from scheduler.config import SchedulerConfig

_SWEEP_STEPS = 1024  # steps between looks for forgettable clients
_IDLE_STEPS = 256  # steps without service before a client may be forgotten
_MAX_CLIENTS = 65536


def auto_preemption_threshold(prefill_weight: float, decode_weight: float, max_model_len: int) -> float:
    """2 x the weighted cost of the largest request (max_model_len tokens at the dearer weight): the
    per-request term of the paper's bound. Inside it, counters drift apart by VTC's own request
    granularity and preempting would only buy recomputation; past it, the gap comes from memory the
    far-ahead client's running requests hold, which only preemption frees early."""
    return 2.0 * max(prefill_weight, decode_weight) * max_model_len


class _Client:
    __slots__ = ("name", "weight", "counter", "service", "queue", "rank", "version", "last_served_step")

    def __init__(self, name: str, weight: float) -> None:
        self.name = name
        self.weight = weight
        self.counter = 0.0  # service received plus lifts: what the order compares
        self.service = 0.0  # service received (weighted tokens over the weight): what metrics show
        self.queue: deque[Request] = deque()  # its waiting requests, first come first served
        self.rank = 0.0  # the counter the queue orders by (see _VtcQueue)
        self.version = 0  # bumped whenever its heap entry changes: older entries are stale
        self.last_served_step = 0


class VtcOrdering:
    """OrderingPolicy `vtc`. Owns the counters; its queue (`make_queue`, one per ordering) owns the
    per-client queues and asks it for lifts and costs."""
    name = "vtc"

    def __init__(self, prefill_weight: float = 1.0, decode_weight: float = 2.0,
                 client_weights: tuple[tuple[str, float], ...] = (), update_interval: int = 1,
                 preemption_threshold: float = 0.0) -> None:
        self.prefill_weight = prefill_weight
        self.decode_weight = decode_weight
        self.client_weights = dict(client_weights)
        self.update_interval = update_interval
        self.preemption_threshold = preemption_threshold
        self._clients: dict[str, _Client] = {}
        self._queue: _VtcQueue | None = None
        self._last_left: _Client | None = None  # the last client whose queue emptied
        self._num_steps = 0  # steps that served tokens, counted when the queue is next used
        self._served = False  # tokens were charged since the queue was last used

    @classmethod
    def from_config(cls, config: SchedulerConfig, max_model_len: int) -> "VtcOrdering":
        threshold = config.fairness_preemption_threshold
        if threshold is None:
            threshold = auto_preemption_threshold(config.fairness_prefill_weight, config.fairness_decode_weight,
                                                  max_model_len)
        return cls(config.fairness_prefill_weight, config.fairness_decode_weight, config.client_weights,
                   config.fairness_update_interval, threshold)

    # ---- OrderingPolicy ----
    def make_queue(self) -> "_VtcQueue":
        if self._queue is not None:
            raise RuntimeError("a VtcOrdering orders one queue: build one ordering per scheduler")
        self._queue = _VtcQueue(self)
        return self._queue

    def victim(self, running: list[Request]) -> Request:
        """The latest admitted running request of the client furthest ahead."""
        best, best_counter = running[-1], float("-inf")
        for request in reversed(running):  # strictly greater: of equals, the latest admitted stays
            counter = self.counter(request.client_id)
            if counter > best_counter:
                best, best_counter = request, counter
        return best

    def outranks(self, candidate: Request, victim: Request) -> bool:
        threshold = self.preemption_threshold
        return threshold > 0 and self.counter(victim.client_id) - self.counter(candidate.client_id) > threshold

    def on_scheduled(self, request: Request, num_tokens: int) -> None:
        """Charge the request's client for tokens [num_computed_tokens, + num_tokens) of this step."""
        start = request.num_computed_tokens
        end = start + num_tokens
        num_prompt = 0 if request.output_token_ids else max(0, min(end, request.num_prompt_tokens) - start)
        num_output = 1 if end >= request.num_tokens else 0  # the step samples a token
        client = self._clients.get(request.client_id)
        if client is None:  # forgotten while its request ran (no service for a sweep): back at the floor
            client = self._client(request.client_id)
            client.counter = self.floor()
        cost = (num_prompt * self.prefill_weight + num_output * self.decode_weight) / client.weight
        client.counter += cost
        client.service += cost
        client.last_served_step = self._num_steps
        self._served = True

    def service(self) -> dict[str, float]:
        clients = self._clients.copy()  # one C call: safe against an engine thread adding a client
        return {name: client.service for name, client in clients.items()}

    # ---- introspection ----
    def counter(self, client_id: str) -> float:
        """The client's counter; one not tracked is at the floor (where it would be lifted to)."""
        client = self._clients.get(client_id)
        return client.counter if client is not None else self.floor()

    def counters(self) -> dict[str, float]:
        clients = self._clients.copy()
        return {name: client.counter for name, client in clients.items()}

    def floor(self, excluding: _Client | None = None) -> float:
        """What a client entering the queue is lifted to: the lowest counter of the (other) clients with
        requests waiting; nobody waiting: the counter of the last client whose queue emptied."""
        waiting = self._queue.waiting_clients if self._queue is not None else {}
        counters = [c.counter for c in waiting.values() if c is not excluding]
        if counters:
            return min(counters)
        return self._last_left.counter if self._last_left is not None else 0.0

    # ---- for the queue ----
    def _client(self, name: str) -> _Client:
        client = self._clients.get(name)
        if client is None:
            client = self._clients[name] = _Client(name, self.client_weights.get(name, 1.0))
        return client

    def _lift(self, client: _Client) -> None:
        client.counter = max(client.counter, self.floor(excluding=client))

    def _left(self, client: _Client) -> None:
        self._last_left = client

    def _admission_cost(self, request: Request, client: _Client) -> float:
        """What admitting the request will charge, estimated before the prefix cache is looked up."""
        num_prompt = 0 if request.output_token_ids else request.num_prompt_tokens - request.num_computed_tokens
        return (num_prompt * self.prefill_weight + self.decode_weight) / client.weight

    def _sync(self) -> None:
        """Before the queue orders anything: count a step if tokens were charged since, re-rank every
        update_interval such steps, look for forgettable clients every _SWEEP_STEPS."""
        if not self._served:
            return
        self._served = False
        self._num_steps += 1
        if self._num_steps % self.update_interval == 0:
            self._queue.rerank()
        if self._num_steps % _SWEEP_STEPS == 0:
            self._sweep()

    def _sweep(self) -> None:
        waiting = self._queue.waiting_clients
        idle = [c for c in self._clients.values() if c.name not in waiting and c is not self._last_left
                and self._num_steps - c.last_served_step >= _IDLE_STEPS]
        floor = self.floor()
        for client in idle:
            if client.counter <= floor:
                del self._clients[client.name]
        excess = len(self._clients) - _MAX_CLIENTS
        if excess > 0:
            kept = sorted((c for c in idle if c.name in self._clients), key=lambda c: c.counter)
            for client in kept[:excess]:
                del self._clients[client.name]


class _VtcQueue:
    """RequestQueue of per-client FIFO queues, the client of lowest rank first (ties: the earlier head
    request). A heap holds one live entry per client with requests waiting,

        (rank, head's arrival time, insertion number, version, client)

    and an entry whose version is no longer its client's is stale, dropped when it surfaces. The ranks
    are the counters as of the last `rerank` plus the estimated cost of what was admitted since."""

    def __init__(self, ordering: VtcOrdering) -> None:
        self._ordering = ordering
        self.waiting_clients: dict[str, _Client] = {}  # the paper's Q
        self._heap: list[tuple[float, float, int, int, _Client]] = []
        self._insertions = itertools.count()
        self._num_requests = 0

    def add(self, request: Request) -> None:
        self._ordering._sync()
        client = self._enter(request)
        client.queue.append(request)
        self._num_requests += 1
        if len(client.queue) == 1:
            self._push(client)

    def prepend(self, request: Request) -> None:
        """Ahead of its client's other requests; clients stay ordered by rank."""
        self._ordering._sync()
        client = self._enter(request)
        client.queue.appendleft(request)
        self._num_requests += 1
        self._push(client)

    def peek(self) -> Request:
        return self._top().queue[0]

    def pop(self) -> Request:
        client = self._top()
        request = client.queue.popleft()
        self._num_requests -= 1
        if client.queue:
            client.rank += self._ordering._admission_cost(request, client)
            self._push(client)
        else:
            self._leave(client)
        return request

    def remove(self, request: Request) -> bool:
        client = self.waiting_clients.get(request.client_id)
        if client is None:
            return False
        for index, queued in enumerate(client.queue):
            if queued is request:
                break
        else:
            return False
        del client.queue[index]
        self._num_requests -= 1
        if not client.queue:
            self._leave(client)
        elif index == 0:
            self._push(client)
        return True

    def __len__(self) -> int:
        return self._num_requests

    def __iter__(self) -> Iterator[Request]:
        """Clients by rank, each one's requests in order (not the interleaving pops would give). A
        snapshot: stats read it from another thread while the engine thread steps."""
        clients = list(self.waiting_clients.values())
        clients.sort(key=lambda c: (c.rank, _arrival(c.queue[0]) if c.queue else 0.0))
        return iter([request for client in clients for request in list(client.queue)])

    def rerank(self) -> None:
        for client in self.waiting_clients.values():
            client.rank = client.counter
        self._rebuild()

    # ---- internals ----
    def _enter(self, request: Request) -> _Client:
        client = self._ordering._client(request.client_id)
        if client.name not in self.waiting_clients:
            self._ordering._lift(client)
            client.rank = client.counter
            self.waiting_clients[client.name] = client
        return client

    def _leave(self, client: _Client) -> None:
        del self.waiting_clients[client.name]
        client.version += 1  # its entries go stale
        self._ordering._left(client)

    def _entry(self, client: _Client) -> tuple[float, float, int, int, _Client]:
        client.version += 1
        return (client.rank, _arrival(client.queue[0]), next(self._insertions), client.version, client)

    def _push(self, client: _Client) -> None:
        heapq.heappush(self._heap, self._entry(client))
        if len(self._heap) > 2 * len(self.waiting_clients) + 64:  # mostly stale: start over
            self._rebuild()

    def _rebuild(self) -> None:
        self._heap = [self._entry(client) for client in self.waiting_clients.values()]
        heapq.heapify(self._heap)

    def _top(self) -> _Client:
        self._ordering._sync()
        heap = self._heap
        while heap:
            _, _, _, version, client = heap[0]
            if version == client.version and self.waiting_clients.get(client.name) is client:
                return client
            heapq.heappop(heap)
        raise IndexError("peek or pop from an empty queue")


def _arrival(request: Request) -> float:
    return request.arrival_time if request.arrival_time is not None else 0.0
