"""uvicorn's HTTP/1.1 protocol with a deadline for each request's head.

uvicorn closes idle kept-alive connections, but not a client that connects
and sends nothing, or sends its request line and headers a byte at a time
(slowloris): each would hold a connection open forever. Here a request whose
line and headers are not complete ``EMBER_HEADER_TIMEOUT`` seconds after its
first byte (or after the connection opened) loses its connection. Bodies and
responses are not limited: uploads and long generations take what they take.
"""

from __future__ import annotations

import asyncio
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol


class HeadDeadlineProtocol(H11Protocol):
    """:class:`H11Protocol` closing connections whose request head is late
    (make one with :func:`protocol_with_deadline`)."""

    head_timeout = 30.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._waiting_for_head():
            self._arm()  # a deadline from the request's first byte, never pushed back
        else:
            self._disarm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _waiting_for_head(self) -> bool:
        return self.conn.their_state is h11.IDLE and (self.cycle is None or self.cycle.response_complete)

    def _arm(self) -> None:
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(self.head_timeout, self._head_late)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_late(self) -> None:
        self._head_timer = None
        if self._waiting_for_head() and not self.transport.is_closing():
            self.transport.close()


def protocol_with_deadline(seconds: float) -> type[HeadDeadlineProtocol]:
    """The protocol class for uvicorn's ``http=`` with a ``seconds`` deadline."""
    return type("HeadDeadlineProtocol", (HeadDeadlineProtocol,), {"head_timeout": seconds})
