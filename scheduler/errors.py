"""Why a request cannot be taken (raised by Scheduler.add_request)."""
from __future__ import annotations


class RequestTooLargeError(ValueError):
    """The request can never be scheduled with this configuration."""


class NoKVSpaceError(RuntimeError):
    """No free blocks to receive a remote prefill's KV right now (backpressure): try later or elsewhere."""


class ExecutorDeadError(RuntimeError):
    """The executor can run no more steps (a tensor-parallel rank died or fell out of step): the engine
    loop ends, so that the engine restarts whole, instead of failing every later step's requests."""
