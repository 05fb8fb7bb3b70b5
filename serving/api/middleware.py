"""Plain ASGI middleware: API-key check, request-body size limit and request-body deadline.

Plain ASGI (not Starlette's BaseHTTPMiddleware) so streaming responses and the disconnect signal on
`receive` pass through untouched.
"""
from __future__ import annotations

import asyncio
import secrets

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serving.api.errors import ApiError

# probes and scrapers must work without the key
OPEN_PATHS = frozenset({"/health", "/metrics", "/version"})


class ApiKeyAuth:
    """With a key configured, every path but OPEN_PATHS needs `Authorization: Bearer <key>`."""

    def __init__(self, app: ASGIApp, api_key: str | None) -> None:
        self.app = app
        self._expected = api_key.encode() if api_key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self._expected is None or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        scheme, _, token = Headers(scope=scope).get("authorization", "").partition(" ")
        # compare_digest: the time taken must not reveal how much of the key matched
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(),
                                                                    self._expected):
            error = ApiError(401, "Invalid or missing API key; send 'Authorization: Bearer <key>'.",
                             code="invalid_api_key")
            await error.response()(scope, receive, send)
            return
        await self.app(scope, receive, send)


def _too_large(max_bytes: int) -> ApiError:
    return ApiError(413, f"The request body is larger than the limit of {max_bytes} bytes.",
                    code="request_too_large")


class BodySizeLimit:
    """413 for bodies over `max_bytes`: at once when Content-Length says so, otherwise as soon as
    the bytes received pass the limit (chunked uploads), raised from `receive` as an ApiError."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self._max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self._max_bytes:
            await _too_large(self._max_bytes).response()(scope, receive, send)
            return
        num_received = 0

        async def limited_receive() -> Message:
            nonlocal num_received
            message = await receive()
            if message["type"] == "http.request":
                num_received += len(message.get("body", b""))
                if num_received > self._max_bytes:
                    raise _too_large(self._max_bytes)
            return message

        await self.app(scope, limited_receive, send)


class BodyDeadline:
    """408 for a request whose body is not complete within `timeout_s` of its start (its headers
    are in): each `receive` of the body waits at most what is left, and the 408 raised from it (an
    ApiError, answered by the route) goes out with `Connection: close`. Once the body is complete,
    `receive` passes through untouched: it then only reports a disconnect, which may come at any
    time (Generation's watcher and streaming responses wait on it for as long as they run)."""

    def __init__(self, app: ASGIApp, timeout_s: float) -> None:
        self.app = app
        self._timeout_s = timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._timeout_s
        body_complete = False
        timed_out = False

        async def receive_before_deadline() -> Message:
            nonlocal body_complete, timed_out
            if body_complete:
                return await receive()
            try:
                async with asyncio.timeout_at(deadline):  # not wait_for: it can drop a cancellation on 3.11
                    message = await receive()
            except asyncio.TimeoutError:
                timed_out = True
                raise ApiError(408, f"The request body did not arrive within {self._timeout_s:g}s "
                                    "(--request-body-timeout-s).", code="request_timeout") from None
            if message["type"] != "http.request" or not message.get("more_body", False):
                body_complete = True
            return message

        async def send_closing_after_timeout(message: Message) -> None:
            if timed_out and message["type"] == "http.response.start":
                # the rest of the body may still be on its way: this connection cannot be reused
                message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
            await send(message)

        await self.app(scope, receive_before_deadline, send_closing_after_timeout)
