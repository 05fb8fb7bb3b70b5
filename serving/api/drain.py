"""Graceful shutdown of the HTTP server: stop taking requests, let the running ones finish for up to
`--shutdown-timeout`, then end the rest with a 503 in OpenAI's error shape.

One `Drain` per app (`app.state.drain`), shared by three parts:

    DrainGate (outermost ASGI middleware)   counts the requests in flight; once draining, answers
                                            every new one 503 (/health too: load balancers stop
                                            routing here)
    Generation (generation.py)              registers while it runs; `expire()` ends each one with
                                            ServerShuttingDown: its engine requests are aborted and
                                            the client gets a 503 (before the first chunk) or an
                                            error event and `data: [DONE]` (in a stream)
    run_server (server.py)                  signal -> `begin()` -> `wait_idle(timeout)` -> `expire()`
                                            -> `wait_idle(grace)` -> uvicorn stops -> engine stops

Everything here runs on the server's event loop.
"""
from __future__ import annotations

import asyncio
from typing import Callable, Protocol

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from serving.api.errors import ApiError

_POLL_S = 0.05


class ServerShuttingDown(ApiError):
    """503: the server is stopping. `code` is the status, as in vLLM's error events."""

    def __init__(self, message: str) -> None:
        super().__init__(503, message, code=503)


def refused_error() -> ServerShuttingDown:
    return ServerShuttingDown("The server is shutting down and accepts no new requests; retry on "
                              "another server.")


def expired_error() -> ServerShuttingDown:
    return ServerShuttingDown("The server is shutting down; this request did not finish within the "
                              "shutdown timeout and was stopped. Retry it on another server.")


class Endable(Protocol):
    def end(self, error: Exception) -> None:
        """Stop now: abort what is unfinished and hand `error` to whoever answers the client."""


class Drain:
    """Shutdown state of one app. `draining`: new requests are refused; `expired`: the deadline
    passed, running requests are ended. Both only ever go from False to True."""

    def __init__(self) -> None:
        self.draining = False
        self.expired = False
        self.num_in_flight = 0  # HTTP requests admitted and not yet answered (streams included)
        self._running: set[Endable] = set()

    def track(self, generation: Endable) -> None:
        """Called by a starting Generation; it must call `untrack` when it closes."""
        self._running.add(generation)

    def untrack(self, generation: Endable) -> None:
        self._running.discard(generation)

    @property
    def num_running(self) -> int:
        return len(self._running)

    def begin(self) -> None:
        self.draining = True

    def expire(self) -> int:
        """End every running generation with `expired_error()`, and any that starts later; returns
        how many were running."""
        self.draining = self.expired = True
        running = list(self._running)
        for generation in running:
            generation.end(expired_error())
        return len(running)

    async def wait_idle(self, timeout_s: float, give_up: Callable[[], bool]) -> bool:
        """Wait until no request is in flight (True), at most timeout_s or until give_up() (False)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while self.num_in_flight:
            if loop.time() >= deadline or give_up():
                return False
            await asyncio.sleep(_POLL_S)
        return True


class DrainGate:
    """Plain ASGI: counts requests in flight; while draining, answers new ones 503 at once. Other
    requests also get `Connection: close`, so the client's next try opens a connection, which is
    refused; /health keeps its connection, so a prober sees 503 for as long as the drain lasts."""

    def __init__(self, app: ASGIApp, drain: Drain) -> None:
        self.app = app
        self._drain = drain

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self._drain.draining:
            error = refused_error()
            headers = None if scope["path"] == "/health" else {"Connection": "close"}
            await JSONResponse(error.body(), status_code=503, headers=headers)(scope, receive, send)
            return
        self._drain.num_in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self._drain.num_in_flight -= 1
