"""The connection edge: uvicorn's h11 protocol with what uvicorn lacks.

- A cap on the request line plus headers (431, then the connection closes), checked on every request of a
  connection, pipelined ones too, and a deadline for them (408 or a close).
- The connection cap, without uvicorn's `limit_concurrency` (a plain-text 503 to everything, probes
  included, once ~1,024 idle sockets are open): at `max_connections` the oldest connection with no request
  in flight is evicted so that a new one is accepted: an idle keep-alive connection first, else the oldest
  connection whose request head is not complete (nothing sent yet, or part of a head: it gets a JSON 503);
  only connections whose request is being read or served are never evicted. When none can be, up to `probe_reserve`
  more connections are accepted, on which probes and /metrics are served and every other request gets the
  service's JSON 503 with Retry-After (the edge answers it, `scope[OVER_CAP]`); past that, a JSON 503 at
  once and a close.
- Pipelining bounded: while an answer is pending, at most `PIPELINE_BYTES` of further input are read;
  a connection may have `max_pipelined` requests answered back to back from input already buffered, the
  next gets a JSON 429 and the connection closes.
- Requests start at most `START_PACE` per event-loop iteration (probes aside, first come first served),
  so that a burst of them (pipelined above all) cannot crowd out a new connection: a probe's connection
  needs several iterations to be accepted and read.
- h11's protocol errors (bad Content-Length, bad chunk size, missing Host, no HTTP version) answer the
  one JSON error shape instead of uvicorn's plain text.
- No connection left open with an unread request body after its answer (a slow upload cannot keep it).

Every answer written here is counted through `count(cause, status)`: `status` None for a close without
an answer. While a request is being served, a protocol error's status is left in the scope
(`scope[PROTOCOL_ERROR]`) for the edge to count under the request's route.

The body limit and body deadline live in the ASGI edge (service/edge.py), which sees the body as the app
reads it.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Any

import h11
from uvicorn.protocols.http.flow_control import FlowControl
from uvicorn.protocols.http.h11_impl import H11Protocol

from service.errors import BadRequest, Busy, HeadersTooLarge, RequestTimeout, ServiceError, TooManyPipelined

_REASONS = {
    400: "Bad Request",
    408: "Request Timeout",
    429: "Too Many Requests",
    431: "Request Header Fields Too Large",
    503: "Service Unavailable",
    505: "HTTP Version Not Supported",
}
LINGER_S = 1.0  # after a refusal, how long what the client still sends is read and dropped before closing
PIPELINE_BYTES = 64 * 1024  # input read ahead of a pending answer at most (reading pauses past it)
START_PACE = 4  # requests (probes aside) started per event-loop iteration, all connections together
PROBE_PATHS = ("/health", "/ready", "/metrics")  # never paced, never refused at the connection cap
OVER_CAP = "rmserve.over_cap"  # scope key: the request came on a connection past max_connections
PROTOCOL_ERROR = "rmserve.protocol_error"  # scope key: the connection answered this request's protocol error
_HEAD_END = re.compile(rb"\r?\n\r?\n")

Count = Callable[[str, int | None], None]


class _Table:
    """The connections of one server with no request in flight, in eviction order, and the requests
    waiting for their turn to start.

    `kept`: idle keep-alive connections (answered, nothing of the next head received), the first evicted,
    oldest first. `waiting`: connections whose request head is not complete (none received yet, or part of
    one), oldest first by when they started waiting. A connection whose head is complete is in neither."""

    def __init__(self) -> None:
        self.kept: OrderedDict[Any, None] = OrderedDict()
        self.waiting: OrderedDict[Any, None] = OrderedDict()
        self.turns: deque[asyncio.Future[None]] = deque()
        self._scheduled = False

    async def turn(self) -> None:
        """Wait for this request's turn to start: at most `START_PACE` requests start per event-loop
        iteration, first come first served. Without this, a burst of requests (pipelined ones above all,
        which need no round trip) starts all at once on every iteration, and a new connection, which needs
        several iterations to be accepted and read, waits behind all of them on each."""
        loop = asyncio.get_running_loop()
        turn = loop.create_future()
        self.turns.append(turn)
        if not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._release)
        await turn

    def _release(self) -> None:
        for _ in range(min(START_PACE, len(self.turns))):
            turn = self.turns.popleft()
            if not turn.done():
                turn.set_result(None)
        self._scheduled = bool(self.turns)
        if self._scheduled:
            asyncio.get_running_loop().call_soon(self._release)


class _GuardedFlow(FlowControl):
    """uvicorn's flow control, except that reading stays paused while the owner holds it (`held`):
    uvicorn resumes reading on every `receive()` of the app, which would let a pipelining client fill
    the buffer while an answer is pending."""

    held = False

    def resume_reading(self) -> None:
        if not self.held:
            super().resume_reading()


def bounded_h11(
    max_header_bytes: int,
    header_timeout_s: float,
    count: Count | None = None,
    *,
    max_connections: int = 1024,
    probe_reserve: int = 64,
    max_pipelined: int = 16,
) -> type[H11Protocol]:
    """An h11 protocol class for `uvicorn.Config(http=...)`: headers at most `max_header_bytes`, complete
    within `header_timeout_s` of the connection opening (or of the previous answer on a kept-alive
    connection); at most `max_connections` open (+ `probe_reserve` for probes when none can be evicted);
    at most `max_pipelined` requests answered back to back from buffered input. `count(cause, status)`
    counts what it refuses (status None: closed without an answer)."""

    table = _Table()

    def paced(app: Any) -> Any:
        async def paced_app(scope: Any, receive: Any, send: Any) -> None:
            if scope["type"] == "http" and scope["path"] not in PROBE_PATHS:
                await table.turn()
            await app(scope, receive, send)

        return paced_app

    def counted(cause: str, status: int | None) -> None:
        if count is not None:
            count(cause, status)

    class BoundedH11Protocol(H11Protocol):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._header_timer: asyncio.TimerHandle | None = None
            self._refused = False  # answered a refusal: input is discarded until the lingering close
            self._pipelined = 0  # requests answered back to back from input already buffered
            self._error: h11.RemoteProtocolError | None = None
            next_event = self.conn.next_event

            def remembering_next_event() -> Any:  # keeps h11's reason for uvicorn's 400
                try:
                    return next_event()
                except h11.RemoteProtocolError as e:
                    self._error = e
                    raise

            self.conn.next_event = remembering_next_event  # type: ignore[method-assign]
            self.app = paced(self.app)

        # -- waiting for a head: the header deadline and the eviction order -------------------------
        def _arm(self, kept: bool = False) -> None:
            """Start waiting for a head: on a new connection, or (`kept`) after an answer on a kept-alive one."""
            self._disarm()
            self._header_timer = self.loop.call_later(header_timeout_s, self._headers_late)
            (table.kept if kept and not self._buffered() else table.waiting)[self] = None

        def _disarm(self) -> None:
            table.kept.pop(self, None)
            table.waiting.pop(self, None)
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _buffered(self) -> bytes:
            return self.conn.trailing_data[0]

        def _headers_late(self) -> None:
            self._header_timer = None
            if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
                return
            if not self._buffered():  # an idle connection: close it without a word
                self._disarm()
                self.transport.close()
                return
            self._refuse(
                RequestTimeout(
                    f"the request headers did not arrive within {header_timeout_s:g} s (RMSERVE_HEADER_TIMEOUT_S)",
                    code="header_timeout",
                ),
            )

        def _evict_one(self) -> bool:
            """Close one connection with no request in flight (not this one): the oldest idle keep-alive one,
            else the one that has waited longest for its request head. False when there is none."""
            other = next((c for c in (*_first2(table.kept), *_first2(table.waiting)) if c is not self), None)
            if other is None:
                return False
            other._disarm()
            self.connections.discard(other)  # closing: no longer counts against the cap
            if other._buffered():  # part of a head: it gets an answer
                other._refuse(
                    Busy(
                        "the server is at its connection limit and this request head was the slowest; retry",
                        code="evicted",
                    )
                )
            else:  # an idle keep-alive connection: closing it is allowed at any time
                counted("evicted_idle", None)
                other.transport.close()
            return True

        # -- answers written directly --------------------------------------------------------------
        def _refuse(self, err: ServiceError, cause: str | None = None) -> None:
            """Answer `err` in the one error shape, written directly (no request is being served), count
            it, and close."""
            self._disarm()
            counted(cause or err.code or err.type, err.status)
            body = json.dumps(err.body()).encode()
            retry = getattr(err, "retry_after", None)
            head = (
                f"HTTP/1.1 {err.status} {_REASONS.get(err.status, 'Error')}\r\ncontent-type: application/json\r\n"
                f"content-length: {len(body)}\r\n{f'retry-after: {retry}' + chr(13) + chr(10) if retry else ''}"
                "connection: close\r\n\r\n"
            )
            self.transport.write(head.encode("latin-1") + body)
            self._linger_close()

        def _linger_close(self) -> None:
            """Close after the answer, the way a refusal must: stop sending (FIN), keep discarding what
            the client still sends for a moment, then close. Closing at once with unread input makes the
            kernel send a reset, which can destroy the answer before the client reads it."""
            self._refused = True
            self.connections.discard(self)  # on its way out: no longer counts against the cap
            if isinstance(self.flow, _GuardedFlow):
                self.flow.held = False
            self.flow.resume_reading()
            if self.transport.can_write_eof():
                self.transport.write_eof()
                self.loop.call_later(LINGER_S, self.transport.close)
            else:  # pragma: no cover - every TCP transport can
                self.transport.close()

        def send_400_response(self, msg: str) -> None:
            """uvicorn's answer to an h11 protocol error, in the JSON error shape (status from h11's
            hint: 400, or 431 for an oversized head)."""
            err = self._error
            # h11 hints 431 for an oversized head; anything else it refuses (501 for a Transfer-Encoding
            # other than chunked, ...) is a 400 bad_http, as for every other protocol error
            status = 431 if err is not None and err.error_status_hint == 431 else 400
            text = f"invalid HTTP request: {_readable(str(err))}" if err is not None else msg
            error: ServiceError = (
                HeadersTooLarge(text, code="headers_too_large") if status == 431 else BadRequest(text, code="bad_http")
            )
            error.status = status
            cycle = self.cycle
            if cycle is not None and not cycle.response_complete:
                cycle.disconnected = True  # the app's answer, if any, goes nowhere: this one replaces it
                cycle.message_event.set()
                if cycle.response_started:  # half an answer already sent: all that can be done is close
                    cycle.scope[PROTOCOL_ERROR] = None  # type: ignore[literal-required]
                    self.transport.close()
                    return
                cycle.scope[PROTOCOL_ERROR] = status  # type: ignore[literal-required]
                self._disarm()
                body = json.dumps(error.body()).encode()
                self.transport.write(
                    f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\ncontent-type: application/json\r\n"
                    f"content-length: {len(body)}\r\nconnection: close\r\n\r\n".encode("latin-1")
                    + body
                )
                self._linger_close()
                return
            self._refuse(error, cause="bad_http")

        # -- protocol interface ---------------------------------------------------------------
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self.flow = _GuardedFlow(transport)
            while len(self.connections) > max_connections and self._evict_one():
                pass
            open_now = len(self.connections)
            if open_now > max_connections + probe_reserve:
                self._refuse(
                    Busy(
                        f"{open_now - 1} connections are open; at most {max_connections} are allowed "
                        "(RMSERVE_MAX_CONNECTIONS); retry shortly",
                        code="too_many_connections",
                    )
                )
                return
            self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            if self.transport.is_closing() or self._refused:
                return
            if self in table.kept:  # part of the next head: evicted after the idle ones, oldest first
                table.kept.pop(self)
                table.waiting[self] = None
            self._unset_keepalive_if_required()
            self.conn.receive_data(data)
            self.handle_events()
            if self.conn.their_state is h11.DONE and len(self._buffered()) > PIPELINE_BYTES:
                assert isinstance(self.flow, _GuardedFlow)
                self.flow.held = True  # an answer is pending: read nothing more until it is sent
                self.flow.pause_reading()

        def handle_events(self) -> None:
            if self._refused or self.transport.is_closing():
                return
            if self.conn.their_state is h11.IDLE:
                refusal = self._check_head(self._buffered())
                if refusal is not None:
                    self._refuse(refusal)
                    return
            was_idle = self.conn.their_state is h11.IDLE
            super().handle_events()
            if was_idle and self.conn.their_state is not h11.IDLE:
                self._disarm()  # the head is complete: the body has its own deadline in the ASGI edge
                if len(self.connections) > max_connections and self.cycle is not None:
                    self.cycle.scope[OVER_CAP] = True  # type: ignore[literal-required]

        def _check_head(self, buf: bytes) -> ServiceError | None:
            """The refusal for the request head at the start of `buf`, if any: past the header cap
            (431), or a request line with no HTTP version (HTTP/0.9, which has no headers: 400)."""
            end = _HEAD_END.search(buf, 0, max_header_bytes + 4)
            size = len(buf) if end is None else end.end()
            if size > max_header_bytes:
                return HeadersTooLarge(
                    f"the request line and headers passed {max_header_bytes:,} bytes (RMSERVE_MAX_HEADER_BYTES)",
                    code="headers_too_large",
                )
            line_end = buf.find(b"\n")
            if line_end > 0 and not buf[:line_end].rstrip(b"\r").rpartition(b" ")[2].startswith(b"HTTP/"):
                return BadRequest(
                    "the request line has no HTTP version (HTTP/0.9 is not supported); send HTTP/1.1",
                    code="bad_http",
                )
            return None

        def on_response_complete(self) -> None:
            assert isinstance(self.flow, _GuardedFlow)
            self.flow.held = False
            if self.transport.is_closing():
                super().on_response_complete()
                return
            if self.conn.their_state is h11.SEND_BODY:
                # answered before its body was read (refused, or a route that ignores it): the client
                # cannot reuse the connection without sending the rest, so do not wait for it
                super().on_response_complete()
                self.transport.close()
                return
            pipelined = self.conn.their_state is h11.DONE and bool(self._buffered())
            self._pipelined = self._pipelined + 1 if pipelined else 0
            if self._pipelined >= max_pipelined:  # `max_pipelined` answered back to back: the next is refused
                self.server_state.total_requests += 1
                self._refuse(
                    TooManyPipelined(
                        f"more than {max_pipelined} requests were pipelined on this connection without reading "
                        "the answers (RMSERVE_MAX_PIPELINED); send the rest on a new connection"
                    )
                )
                return
            super().on_response_complete()
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing() and not self._refused:
                self._arm(kept=True)

    return BoundedH11Protocol


def _first2(d: OrderedDict[Any, None]) -> list[Any]:
    """The first two keys of `d` (the oldest; one of them may be the caller)."""
    it = iter(d)
    return [c for c, _ in zip(it, range(2), strict=False)]


_BYTES_REPR = re.compile(r"""(?:bytearray\()?\bb(['"])(.*?)\1\)?""")


def _readable(message: str) -> str:
    """h11's message with the bytes it quotes as text: "illegal chunk header: bytearray(b'zz\\r\\n')" ->
    "illegal chunk header: 'zz'"."""
    return _BYTES_REPR.sub(lambda m: repr(m.group(2).replace("\\r", "").replace("\\n", "").strip()), message)
