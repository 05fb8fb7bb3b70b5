"""uvicorn's h11 connection with a deadline on request headers (slow-header clients, "slowloris").

uvicorn closes a connection that stays silent after a response (`timeout_keep_alive`), but any byte
cancels that timer, and nothing bounds a connection that never sends a byte or sends its headers a
byte at a time. Here a timer runs from the moment the connection can take a request (opened, or the
previous response sent) until that request's headers are complete, and closes the connection, with
no answer, when it fires:

    open ──headers──► [handled] ──response sent──► idle ──headers──► [handled] ...
    |<- header deadline ->|                         |<- header deadline ->|

After an early response (a 413 before the body was read, say) uvicorn keeps the connection and
discards the rest of that body as it comes; the clock runs through that too, so trickling the old
body cannot hold the connection either. The body of a request being handled has its own deadline
(middleware.BodyDeadline), which answers 408. uvicorn would pick its httptools protocol when that
package is installed; this one always uses h11.
"""
from __future__ import annotations

import asyncio
import logging

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

logger = logging.getLogger(__name__)


class HeaderDeadlineProtocol(H11Protocol):
    """Set `header_timeout_s` on a subclass (`with_header_deadline`)."""

    header_timeout_s: float = 10.0

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._header_timer: asyncio.TimerHandle | None = None
        # uvicorn makes a new `cycle` for each request whose headers it has parsed: the clock
        # stops once `self.cycle` is no longer the one it was started after
        self._cycle_before = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_deadline(after=None)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._stop_once_headers_complete()

    def on_response_complete(self) -> None:
        finished = self.cycle
        super().on_response_complete()  # may already parse a pipelined request
        self._arm_header_deadline(after=finished)
        self._stop_once_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_deadline()
        super().connection_lost(exc)

    def _arm_header_deadline(self, after) -> None:
        """Start the clock for the headers of the request that follows the cycle `after`."""
        self._cancel_header_deadline()
        if self.transport.is_closing():
            return
        self._cycle_before = after
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._on_header_deadline)

    def _stop_once_headers_complete(self) -> None:
        if self._header_timer is not None and self.cycle is not self._cycle_before:
            self._cancel_header_deadline()

    def _cancel_header_deadline(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _on_header_deadline(self) -> None:
        self._header_timer = None
        if self.transport.is_closing():
            return
        client = "%s:%d" % self.client if self.client else "a client"
        if self.conn.trailing_data[0] or self.conn.their_state is not h11.IDLE:  # a request is on its way
            logger.info("closing the connection from %s: no complete request headers within %gs "
                        "(--request-header-timeout-s)", client, self.header_timeout_s)
        else:
            logger.debug("closing the idle connection from %s after %gs", client, self.header_timeout_s)
        try:
            self.conn.send(h11.ConnectionClosed())
        except h11.LocalProtocolError:
            pass  # mid-message: closing the transport is all there is to do
        self.transport.close()


def with_header_deadline(header_timeout_s: float) -> type[HeaderDeadlineProtocol]:
    """The protocol class to pass as `uvicorn.Config(http=...)`."""
    return type("HeaderDeadlineProtocol", (HeaderDeadlineProtocol,), {"header_timeout_s": header_timeout_s})
