"""The connection edge: uvicorn's h11 protocol with what uvicorn lacks. A cap on the request line plus
headers (431, then the connection closes), a deadline for them (408 or a close), and no connection left
open with an unread request body after its answer (a slow upload cannot keep it).

uvicorn already gives the connection cap (`limit_concurrency`: 503 at once) and the keep-alive timeout;
the body limit and body deadline live in the ASGI edge (service/edge.py), which sees the body as the app
reads it.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from service.errors import HeadersTooLarge, RequestTimeout, ServiceError

_REASONS = {408: "Request Timeout", 431: "Request Header Fields Too Large"}
LINGER_S = 1.0  # after a refusal, how long what the client still sends is read and dropped before closing


def bounded_h11(
    max_header_bytes: int, header_timeout_s: float, on_refusal: Callable[[str], None] | None = None
) -> type[H11Protocol]:
    """An h11 protocol class for `uvicorn.Config(http=...)`: headers at most `max_header_bytes`, complete
    within `header_timeout_s` of the connection opening (or of the previous answer on a kept-alive
    connection). `on_refusal(cause)` counts what it refuses."""

    class BoundedH11Protocol(H11Protocol):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._header_bytes = 0  # bytes of the current request head seen so far
            self._tail = b""  # last bytes of the head so far (a terminator split across reads)
            self._header_timer: asyncio.TimerHandle | None = None
            self._refused = False  # answered a refusal: input is discarded until the lingering close

        # -- header deadline -----------------------------------------------------------------
        def _arm(self) -> None:
            self._disarm()
            self._header_bytes, self._tail = 0, b""
            self._header_timer = self.loop.call_later(header_timeout_s, self._headers_late)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_late(self) -> None:
            self._header_timer = None
            if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
                return
            if self._header_bytes == 0:  # an idle connection: close it without a word
                self.transport.close()
                return
            self._refuse(
                RequestTimeout(
                    f"the request headers did not arrive within {header_timeout_s:g} s (RMSERVE_HEADER_TIMEOUT_S)",
                    code="header_timeout",
                ),
                "header_timeout",
            )

        def _refuse(self, err: ServiceError, cause: str) -> None:
            """Answer `err` in the one error shape, written directly (no request was parsed), and close."""
            self._disarm()
            if on_refusal is not None:
                on_refusal(cause)
            body = json.dumps(err.body()).encode()
            head = (
                f"HTTP/1.1 {err.status} {_REASONS.get(err.status, 'Error')}\r\ncontent-type: application/json\r\n"
                f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
            )
            self.transport.write(head.encode("latin-1") + body)
            self._linger_close()

        def _linger_close(self) -> None:
            """Close after the answer, the way a refusal must: stop sending (FIN), keep discarding what
            the client still sends for a moment, then close. Closing at once with unread input makes the
            kernel send a reset, which can destroy the answer before the client reads it."""
            self._refused = True
            if self.transport.can_write_eof():
                self.transport.write_eof()
                self.loop.call_later(LINGER_S, self.transport.close)
            else:  # pragma: no cover - every TCP transport can
                self.transport.close()

        # -- protocol interface ---------------------------------------------------------------
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            if self.transport.is_closing() or self._refused:
                return
            awaiting_head = self.conn.their_state is h11.IDLE
            if awaiting_head and self._head_too_large(data):
                self._refuse(
                    HeadersTooLarge(
                        f"the request line and headers passed {max_header_bytes:,} bytes (RMSERVE_MAX_HEADER_BYTES)",
                        code="headers_too_large",
                    ),
                    "headers_too_large",
                )
                return
            super().data_received(data)
            if awaiting_head and self.conn.their_state is not h11.IDLE:
                self._disarm()  # the head is complete: the body has its own deadline in the ASGI edge

        def _head_too_large(self, data: bytes) -> bool:
            seen = self._tail + data
            end = seen.find(b"\r\n\r\n")
            head_part = len(data) if end < 0 else end + 4 - len(self._tail)
            self._header_bytes += head_part
            self._tail = seen[-3:]
            return self._header_bytes > max_header_bytes

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if self.transport.is_closing():
                return
            if self.conn.their_state is h11.SEND_BODY:
                # answered before its body was read (refused, or a route that ignores it): the client
                # cannot reuse the connection without sending the rest, so do not wait for it
                self.transport.close()
            elif self.conn.their_state is h11.IDLE:
                self._arm()

    return BoundedH11Protocol
