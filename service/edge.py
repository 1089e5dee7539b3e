"""The HTTP edge, pure ASGI: the API key checked before the body is read, the body size limit (chunked
bodies too), one error body for everything that reaches the edge, and request metrics (5xx included).

Also the mapping of the framework's errors (validation, 404/405, unexpected exceptions) to the one error
shape `{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import (
    BadRequest,
    Busy,
    DeadlineExceeded,
    InferenceFailed,
    PayloadTooLarge,
    RequestTimeout,
    ServiceError,
    Unauthorized,
    UnsupportedMediaType,
    validation_error,
)
from service.metrics import Metrics
from service.protocol import OVER_CAP, PROBE_PATHS, PROTOCOL_ERROR
from service.settings import Settings

log = logging.getLogger("rmserve.edge")

# Routes that answer without a key unless RMSERVE_AUTH_OPEN_ROUTES=true: probes, metrics and the docs.
PROBES = PROBE_PATHS  # never refused for being busy: the orchestrator must see the truth
OPEN_ROUTES = ("/", "/health", "/ready", "/metrics", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json")
OPEN_PREFIXES = ("/playground", "/static/")


def is_open(path: str) -> bool:
    return path in OPEN_ROUTES or path.startswith(OPEN_PREFIXES)


KEY_PREFIX = "/k/"  # /k/<key>/get_reward: the key in the path, for clients that send no header (OpenRLHF)


def take_path_key(scope: Scope) -> str | None:
    """The key of a `/k/<key>/...` path, removed from the scope in place: routing, metric labels, error
    logs and uvicorn's access log (which reads this same scope) see `/...` alone. None without one."""
    path: str = scope.get("path", "")
    if not path.startswith(KEY_PREFIX):
        return None
    key, _, rest = path[len(KEY_PREFIX) :].partition("/")
    scope["path"] = "/" + rest
    raw: bytes = scope.get("raw_path") or b""
    if raw.startswith(KEY_PREFIX.encode()):
        scope["raw_path"] = b"/" + raw[len(KEY_PREFIX) :].partition(b"/")[2]
    return key


def check_bearer(headers: dict[bytes, bytes], key: str) -> bool:
    """True when the `Authorization: Bearer <key>` header carries `key` (constant-time comparison)."""
    scheme, _, token = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), key.encode())


class EdgeMiddleware:
    """Pure ASGI layer in front of the app: key before body, body limit and deadline, 5xx caught and
    counted, metrics.

    Counting: every request is counted once in `rmserve_requests_total{route, status}` with the status
    the client received; a request whose client left before its answer (mid-body, or while it was
    scored) is counted with status 499 (never sent; nginx's "client closed request") and
    `failures{cause="client_gone"}`. Refusals made before routing carry the route their path matches."""

    def __init__(
        self,
        app: ASGIApp,
        settings: Settings,
        metrics: Metrics,
        overloaded: Callable[[int], ServiceError | None] | None = None,
        routes: list[BaseRoute] | None = None,
    ) -> None:
        self.app = app
        self.routes = routes if routes is not None else []  # for the route label of refusals before routing
        self.settings = settings
        self.metrics = metrics
        self.overloaded = overloaded  # admission's refusal from the headers alone (the engine's)
        self.key = settings.api_key.get_secret_value() if settings.api_key is not None else None
        self.in_flight = 0  # requests past the early refusals, probes and /metrics aside

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path_key = take_path_key(scope)
        path = scope.get("path", "")
        t0 = time.perf_counter()
        status = {"code": 500, "started": False, "done": False, "gone": False}
        body_error: list[ServiceError] = []  # set when the body passed its limit or its deadline

        async def send_wrapper(message: Message) -> None:
            if body_error:  # the app's answer to a body it could not read is replaced by ours
                if not status["started"]:
                    await send_error(send_raw, body_error[0], {"Connection": "close"})
                return
            await send_raw(message)

        async def send_raw(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"], status["started"] = message["status"], True
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                status["done"] = True
            await send(message)

        headers = dict(scope.get("headers") or [])
        counted = path not in PROBES
        try:
            refusal = self._refuse_early(path, headers, path_key)
            if refusal is None and scope.get(OVER_CAP) and path not in PROBES:
                refusal = Busy(
                    f"the server is at its connection limit (RMSERVE_MAX_CONNECTIONS={self.settings.max_connections}) "
                    "with no idle connection to close; only probes are served on this one; retry shortly",
                    code="too_many_connections",
                )
            if refusal is None and self.overloaded is not None and scope.get("method") == "POST":
                # /get_reward's deadline grows with its batch: the engine decides for it after parsing
                refusal = None if path == "/get_reward" else self.overloaded(content_length(headers))
            if refusal is not None:
                if refusal.status == 401:
                    self.metrics.failures.labels("unauthorized").inc()
                elif refusal.status != 429:  # the engine counts its own 429s
                    self.metrics.failures.labels(refusal.code or refusal.type).inc()
                hdrs = refusal_headers(refusal)
                if has_body(headers) or refusal.code == "too_many_connections":  # do not keep the connection
                    hdrs["Connection"] = "close"
                await send_error(send_raw, refusal, hdrs)
            elif counted and self.in_flight >= self.settings.max_in_flight:
                self.metrics.failures.labels("busy").inc()
                busy = Busy(
                    f"{self.in_flight} requests are in flight; at most {self.settings.max_in_flight} are allowed "
                    "(RMSERVE_MAX_IN_FLIGHT); retry shortly"
                )
                hdrs = refusal_headers(busy) | ({"Connection": "close"} if has_body(headers) else {})
                await send_error(send_raw, busy, hdrs)
            else:
                self.in_flight += counted
                try:
                    await self.app(scope, self._limited(receive, body_error, status), send_wrapper)
                finally:
                    self.in_flight -= counted
        except Exception as exc:  # the one place an unexpected error becomes a counted 500
            if body_error:
                if not status["started"]:
                    await send_error(send_raw, body_error[0], {"Connection": "close"})
            elif status["gone"] or PROTOCOL_ERROR in scope or isinstance(exc, ClientDisconnect):
                # the client left (or h11 refused its body) while the app read it: Starlette raises
                # ClientDisconnect; no answer can be sent, and it is counted below (499 or bad_http)
                status["gone"] = True
                log.debug("client left before the request body was read on %s (%s)", path, type(exc).__name__)
            else:
                log.exception("unexpected error on %s", path)
                self.metrics.failures.labels("internal").inc()
                status["code"] = 500
                if not status["started"]:
                    await send_error(send_raw, internal_error(exc))
        finally:
            code = int(status["code"])
            if PROTOCOL_ERROR in scope:  # the connection layer answered (h11 refused the body): its status
                self.metrics.failures.labels("bad_http").inc()
                code = scope[PROTOCOL_ERROR] or code
            elif body_error:
                self.metrics.failures.labels(body_error[0].code or "body").inc()
            elif status["gone"] and code != 499:  # no answer reached the client (499: ClientGone, counted)
                self.metrics.failures.labels("client_gone").inc()
                code = 499
            label = self.route_label(scope)
            self.metrics.requests.labels(label, str(code)).inc()
            self.metrics.latency.labels(label).observe(time.perf_counter() - t0)

    def route_label(self, scope: Scope) -> str:
        """The route's path template (never the raw path: no ids or keys in labels); before routing, the
        template of the route the path matches; "other" when none does."""
        route = scope.get("route")
        if route is None:
            route = next((r for r in _flatten(self.routes) if r.matches(scope)[0] is not Match.NONE), None)
        return str(getattr(route, "path", None) or "other")

    def _refuse_early(self, path: str, headers: dict[bytes, bytes], path_key: str | None = None) -> ServiceError | None:
        """Refusals decided from the headers alone, before a byte of the body is read."""
        guarded = self.key is not None and (self.settings.auth_open_routes or not is_open(path))
        key = self.key or ""
        by_path = path_key is not None and hmac.compare_digest(path_key.encode(), key.encode())
        if guarded and not (by_path or check_bearer(headers, key)):
            return Unauthorized(
                "a valid API key is required: send 'Authorization: Bearer <key>' (or use /k/<key>/ before the "
                "route's path, for clients that cannot send headers)",
                code="invalid_api_key",
            )
        media = unsupported_media(headers) if has_body(headers) else None  # probes never carry a body
        if media is not None:
            return media
        if b"content-length" in headers and b"chunked" in headers.get(b"transfer-encoding", b"").lower():
            return BadRequest(
                "the request has both Content-Length and Transfer-Encoding: chunked; send one of them",
                code="ambiguous_length",
            )
        length = content_length(headers)
        limit = self.settings.max_body_bytes
        if length > limit:
            return PayloadTooLarge(
                f"the request body is {length:,} bytes; at most {limit:,} are allowed (RMSERVE_MAX_BODY_BYTES)",
                code="body_too_large",
            )
        return None

    def _limited(self, receive: Receive, body_error: list[ServiceError], status: dict[str, Any]) -> Receive:
        """`receive` with the body limit (chunked bodies too) and the body deadline: past either, the
        error is recorded (the edge answers it: 413 or 408, then closes) and reading stops. A disconnect
        before the answer was sent marks the request `status["gone"]`."""
        limit, seen = self.settings.max_body_bytes, 0
        timeout = self.settings.body_timeout_s
        deadline: float | None = None
        body_done = False

        async def limited_receive() -> Message:
            nonlocal seen, deadline, body_done
            if body_done:  # after the body: disconnect polling, no deadline
                msg = await receive()
                if msg["type"] == "http.disconnect" and not status["done"]:
                    status["gone"] = True
                return msg
            loop = asyncio.get_running_loop()
            if deadline is None:
                deadline = loop.time() + timeout
            try:
                msg = await asyncio.wait_for(receive(), max(deadline - loop.time(), 0.0))
            except asyncio.TimeoutError:
                body_error.append(
                    RequestTimeout(
                        f"the request body did not arrive within {timeout:g} s (RMSERVE_BODY_TIMEOUT_S)",
                        code="body_timeout",
                    )
                )
                raise _BodyRefused() from None
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > limit:
                    body_error.append(
                        PayloadTooLarge(
                            f"the request body passed {limit:,} bytes (RMSERVE_MAX_BODY_BYTES)", code="body_too_large"
                        )
                    )
                    raise _BodyRefused()
                body_done = not msg.get("more_body", False)
            else:
                body_done = True
                if msg["type"] == "http.disconnect" and not status["done"]:
                    status["gone"] = True  # left mid-body
            return msg

        return limited_receive


def _flatten(routes: list[BaseRoute]) -> Iterator[Any]:
    """The app's routes, included routers opened up (FastAPI includes them as branches whose `matches`
    names no route)."""
    for r in routes:
        contexts = getattr(r, "effective_route_contexts", None)
        if callable(contexts):
            yield from contexts()
        else:
            yield r


class _BodyRefused(Exception):
    pass


def unsupported_media(headers: dict[bytes, bytes]) -> UnsupportedMediaType | None:
    """415 for a body the service would misread: a Content-Encoding other than identity (gzip, ...), or
    a Content-Type charset other than UTF-8 (JSON is UTF-8, RFC 8259)."""
    encoding = headers.get(b"content-encoding", b"identity").decode("latin-1").strip().lower()
    if encoding not in ("identity", ""):
        return UnsupportedMediaType(
            f"Content-Encoding {encoding!r} is not supported; send the body uncompressed (identity)",
            param="Content-Encoding",
            code="unsupported_content_encoding",
        )
    for part in headers.get(b"content-type", b"").decode("latin-1").split(";")[1:]:
        name, _, value = part.partition("=")
        charset = value.strip().strip('"').lower()
        if name.strip().lower() == "charset" and charset not in ("utf-8", "utf8"):
            return UnsupportedMediaType(
                f"charset {charset!r} is not supported; send UTF-8 JSON (Content-Type: application/json)",
                param="Content-Type",
                code="unsupported_charset",
            )
    return None


def has_body(headers: dict[bytes, bytes]) -> bool:
    return headers.get(b"content-length", b"0") not in (b"0", b"") or b"transfer-encoding" in headers


# 5xx errors the engine counts in rmserve_failures_total itself (inference, non_finite, timeout).
ENGINE_COUNTED = (InferenceFailed, DeadlineExceeded)


def refusal_headers(err: ServiceError) -> dict[str, str]:
    """Headers an error answer carries: Retry-After on 429/503 with a delay, WWW-Authenticate on 401."""
    headers = {}
    if getattr(err, "retry_after", None) is not None:
        headers["Retry-After"] = str(err.retry_after)  # type: ignore[attr-defined]
    if err.status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    return headers


def internal_error(exc: Exception) -> ServiceError:
    return ServiceError(f"internal error: {type(exc).__name__}", code="internal_error")


async def send_error(send: Send, err: ServiceError, headers: dict[str, str] | None = None) -> None:
    body = json.dumps(err.body()).encode()
    hdrs = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    hdrs += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": err.status, "headers": hdrs})
    await send({"type": "http.response.body", "body": body})


def error_response(err: ServiceError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=refusal_headers(err) or None)


def content_length(headers: dict[bytes, bytes]) -> int:
    """The Content-Length header's value; 0 when absent or not a number (a chunked body)."""
    try:
        return max(0, int(headers.get(b"content-length", b"0") or 0))
    except ValueError:
        return 0


def install_edge(
    app: FastAPI, settings: Settings, metrics: Metrics, overloaded: Callable[[int], ServiceError | None] | None = None
) -> None:
    """Register the error mapping and the edge middleware on `app`."""

    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError) -> JSONResponse:
        if exc.status >= 500 and not isinstance(exc, ENGINE_COUNTED):
            metrics.failures.labels(exc.code or exc.type).inc()  # the engine counts its own by cause
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(validation_error(list(exc.errors())))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        detail, param = str(exc.detail), None
        if exc.status_code == 400 and "parsing the body" in detail:
            detail, param = "the request body could not be parsed: send UTF-8 JSON", "body"
        kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "invalid_request_error")
        body: dict[str, Any] = {"error": {"message": detail, "type": kind, "param": param, "code": kind}}
        return JSONResponse(body, status_code=exc.status_code, headers=getattr(exc, "headers", None))

    app.add_middleware(
        EdgeMiddleware, settings=settings, metrics=metrics, overloaded=overloaded, routes=app.router.routes
    )
