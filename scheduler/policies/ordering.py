"""Ordering policies: the waiting queue's order and who gets preempted.

- `FcfsOrdering`: first come, first served. Waiting requests in arrival order; a request put back
  (preempted, or holding blocks already) goes to the front; the latest admitted running request is
  the victim; a waiting request never preempts a running one.
- `PriorityOrdering` (vLLM's `--scheduling-policy priority`): lower `priority` value first, then
  arrival time. The running request with the highest (priority, arrival) is the victim, and a waiting
  request of strictly better priority may preempt it when there is no room.

- `VtcOrdering` (scheduler/policies/fairness.py): per-client service counters, the client furthest
  behind first (Virtual Token Counter fairness).
"""
from __future__ import annotations

import heapq
import itertools
from collections import deque
from typing import TYPE_CHECKING, Callable, Iterator, Protocol

from scheduler.policies.fairness import VtcOrdering
from scheduler.request import Request

if TYPE_CHECKING:
    from scheduler.config import SchedulerConfig


class RequestQueue(Protocol):
    def add(self, request: Request) -> None:
        """A new arrival."""

    def prepend(self, request: Request) -> None:
        """A request going back (preempted, or promoted with its blocks already reserved): ahead of
        the requests its policy ranks it with."""

    def peek(self) -> Request: ...

    def pop(self) -> Request: ...

    def remove(self, request: Request) -> bool:
        """Take it out wherever it is; False if it was not queued."""

    def __len__(self) -> int: ...

    def __iter__(self) -> Iterator[Request]: ...


class OrderingPolicy(Protocol):
    name: str

    def make_queue(self) -> RequestQueue: ...

    def victim(self, running: list[Request]) -> Request:
        """The running request to preempt first when blocks run out."""

    def outranks(self, candidate: Request, victim: Request) -> bool:
        """Whether a waiting candidate may preempt this running victim to get room."""

    def on_scheduled(self, request: Request, num_tokens: int) -> None:
        """num_tokens of the request were scheduled this step, from request.num_computed_tokens (not
        advanced yet). Called once per scheduled request after the plan is made, so for accounting
        (fairness counters), never for this step's decisions; must be cheap (the scheduler's hot loop)."""

    def service(self) -> dict[str, float]:
        """Service received per client so far, for metrics; empty for a policy that does not count."""


class _FifoQueue:
    def __init__(self) -> None:
        self._queue: deque[Request] = deque()

    def add(self, request: Request) -> None:
        self._queue.append(request)

    def prepend(self, request: Request) -> None:
        self._queue.appendleft(request)

    def peek(self) -> Request:
        return self._queue[0]

    def pop(self) -> Request:
        return self._queue.popleft()

    def remove(self, request: Request) -> bool:
        try:
            self._queue.remove(request)
        except ValueError:
            return False
        return True

    def __len__(self) -> int:
        return len(self._queue)

    def __iter__(self) -> Iterator[Request]:
        return iter(self._queue)


class FcfsOrdering:
    name = "fcfs"

    def make_queue(self) -> RequestQueue:
        return _FifoQueue()

    def victim(self, running: list[Request]) -> Request:
        return running[-1]

    def outranks(self, candidate: Request, victim: Request) -> bool:
        return False

    def on_scheduled(self, request: Request, num_tokens: int) -> None:
        pass

    def service(self) -> dict[str, float]:
        return {}


def _priority_key(request: Request) -> tuple[int, float]:
    return (request.priority, request.arrival_time)


class _PriorityQueue:
    """A heap on (priority, arrival time, insertion order)."""

    def __init__(self) -> None:
        self._heap: list[tuple[int, float, int, Request]] = []
        self._order = itertools.count()

    def add(self, request: Request) -> None:
        heapq.heappush(self._heap, (*_priority_key(request), next(self._order), request))

    def prepend(self, request: Request) -> None:
        # its key already ranks it: a preempted request keeps its arrival time, so it comes before
        # later arrivals of its priority
        self.add(request)

    def peek(self) -> Request:
        return self._heap[0][3]

    def pop(self) -> Request:
        return heapq.heappop(self._heap)[3]

    def remove(self, request: Request) -> bool:
        kept = [entry for entry in self._heap if entry[3] is not request]
        if len(kept) == len(self._heap):
            return False
        self._heap = kept
        heapq.heapify(self._heap)
        return True

    def __len__(self) -> int:
        return len(self._heap)

    def __iter__(self) -> Iterator[Request]:
        return (entry[3] for entry in sorted(self._heap))


class PriorityOrdering:
    name = "priority"

    def make_queue(self) -> RequestQueue:
        return _PriorityQueue()

    def victim(self, running: list[Request]) -> Request:
        return max(running, key=_priority_key)

    def outranks(self, candidate: Request, victim: Request) -> bool:
        return candidate.priority < victim.priority

    def on_scheduled(self, request: Request, num_tokens: int) -> None:
        pass

    def service(self) -> dict[str, float]:
        return {}


# name -> factory(config, max_model_len)
_POLICIES: dict[str, Callable[["SchedulerConfig", int], OrderingPolicy]] = {
    "fcfs": lambda config, max_model_len: FcfsOrdering(),
    "priority": lambda config, max_model_len: PriorityOrdering(),
    "vtc": VtcOrdering.from_config,
}
SCHEDULING_POLICIES = tuple(_POLICIES)


def make_ordering(config: SchedulerConfig, max_model_len: int) -> OrderingPolicy:
    """The policy config.scheduling_policy names (max_model_len: VTC's default preemption threshold)."""
    name = config.scheduling_policy
    if name not in _POLICIES:
        raise ValueError(f"--scheduling-policy must be one of {', '.join(_POLICIES)}, got {name!r}")
    return _POLICIES[name](config, max_model_len)
