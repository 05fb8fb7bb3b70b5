"""Ordering policies: the waiting queue's order and who gets preempted.

- `FcfsOrdering`: first come, first served. Waiting requests in arrival order; a request put back
  (preempted, or holding blocks already) goes to the front; the latest admitted running request is
  the victim; a waiting request never preempts a running one.
- `PriorityOrdering` (vLLM's `--scheduling-policy priority`): lower `priority` value first, then
  arrival time. The running request with the highest (priority, arrival) is the victim, and a waiting
  request of strictly better priority may preempt it when there is no room.

A fairness policy (VTC) implements the same interface with per-client service counters.
"""
from __future__ import annotations

import heapq
import itertools
from collections import deque
from typing import Iterator, Protocol

from scheduler.request import Request


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


_POLICIES = {"fcfs": FcfsOrdering, "priority": PriorityOrdering}
SCHEDULING_POLICIES = tuple(_POLICIES)


def make_ordering(name: str) -> OrderingPolicy:
    if name not in _POLICIES:
        raise ValueError(f"--scheduling-policy must be one of {', '.join(_POLICIES)}, got {name!r}")
    return _POLICIES[name]()
