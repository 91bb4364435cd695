"""uvicorn's HTTP/1.1 protocol with deadlines for slow clients.

uvicorn closes idle kept-alive connections, but not a client that connects
and sends nothing, sends its request line and headers a byte at a time
(slowloris), or stops in the middle of a body: each would hold a connection
open forever. Here, with ``EMBER_HEADER_TIMEOUT`` seconds:

* a request's line and headers must be complete that long after its first
  byte (or after the connection opened);
* a body may come slowly, but not stop: that long without a byte of it (while
  the server is not the one holding reading back) closes the connection.

Responses are not limited: long generations take what they take.
"""

from __future__ import annotations

import asyncio
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol


class DeadlineProtocol(H11Protocol):
    """:class:`H11Protocol` closing connections of stalled clients (make one
    with :func:`protocol_with_deadline`)."""

    timeout = 30.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._waiting_for_head():
            self._arm()  # from the request's first byte, never pushed back
        elif self._receiving_body():
            self._disarm()  # slow is fine, stopped is not: from the last byte
            self._arm()
        else:
            self._disarm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _waiting_for_head(self) -> bool:
        return self.conn.their_state is h11.IDLE and (self.cycle is None or self.cycle.response_complete)

    def _receiving_body(self) -> bool:
        return self.conn.their_state is h11.SEND_BODY

    def _arm(self) -> None:
        if self._timer is None:
            self._timer = self.loop.call_later(self.timeout, self._late)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _late(self) -> None:
        self._timer = None
        if self.transport.is_closing():
            return
        if self._receiving_body() and self.flow.read_paused:
            self._arm()  # the app has not caught up with the body yet: not the client's stall
        elif self._waiting_for_head() or self._receiving_body():
            self.transport.close()


def protocol_with_deadline(seconds: float) -> type[DeadlineProtocol]:
    """The protocol class for uvicorn's ``http=``, with ``seconds`` as the deadline."""
    return type("DeadlineProtocol", (DeadlineProtocol,), {"timeout": seconds})
