"""create_app(settings) + lifespan: the one place that builds and wires the service's parts."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.batcher import Batcher
from service.engine import Limits, ScoringEngine
from service.errors import NotReady, PayloadTooLarge, ServiceError, Unauthorized
from service.metrics import Metrics
from service.runtimes.base import Runtime
from service.settings import Settings

log = logging.getLogger("rmserve.service")

OPEN_ROUTES = ("/health", "/ready", "/metrics")


@dataclass
class ServiceState:
    settings: Settings
    metrics: Metrics
    engine: ScoringEngine | None = None
    batcher: Batcher | None = None
    runtime: Runtime | None = None
    card: dict[str, Any] | None = None
    ready: bool = False


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def resolve_model_dir(settings: Settings) -> Path:
    if settings.model:
        return Path(settings.model)
    from models.default import default_model_dir

    return default_model_dir()


def load_runtime(settings: Settings, model_dir: Path) -> tuple[Runtime, Any, Any, dict[str, Any]]:
    """Load the model directory into the chosen runtime: (runtime, tokenizer, reward config, card)."""
    import torch

    from models.backbone import auto_dtype

    runtime: Runtime
    from models.reward_model import RewardModel, read_config

    torch.set_num_threads(settings.threads or _cores())
    runtime_name = settings.runtime
    if runtime_name == "auto":
        from models.export import ONNX_FP32, ONNX_INT8

        # ONNX fp32 when exported (499 vs 443 tokens/s for torch fp32 here, same scores within 1e-5);
        # int8 only when asked (--dtype int8): it failed the pair-order parity bound.
        wanted = (model_dir / ONNX_INT8) if settings.dtype == "int8" else (model_dir / ONNX_FP32)
        cpu = settings.device == "cpu" and settings.dtype != "bfloat16"
        runtime_name = "onnx" if wanted.is_file() and cpu else "torch"
    if runtime_name == "onnx":
        from service.runtimes.onnx_runtime import OnnxRuntime

        int8 = None if settings.dtype == "auto" else settings.dtype == "int8"
        runtime, tokenizer = OnnxRuntime.load(model_dir, threads=settings.threads or _cores(), int8=int8)
        cfg = read_config(model_dir)
        params = int(cfg.backbone_info.get("params_after_trim", 0)) + cfg.hidden_size + 1
    else:
        from service.runtimes.torch_runtime import TorchRuntime

        dtype = auto_dtype(settings.device) if settings.dtype == "auto" else settings.dtype
        model, tokenizer = RewardModel.load(
            model_dir, dtype=dtype, device=settings.device, trust_remote_code=settings.trust_remote_code
        )
        runtime = TorchRuntime(
            model, tokenizer.pad_token_id, prefix_sharing=settings.prefix_sharing, min_prefix=settings.prefix_min_tokens
        )
        cfg = model.config
        params = sum(p.numel() for p in model.parameters())
    card = {
        "id": settings.model_id or model_dir.name,
        "backbone": cfg.backbone_info.get("source") or cfg.backbone,
        "parameters": params,
        "max_length": cfg.max_length,
        "dtype": runtime.dtype,
        "runtime": runtime.name,
        "normalization": cfg.normalization,
        "training": {k: cfg.training.get(k) for k in ("steps", "dev", "train_pairs", "recipe") if k in cfg.training},
    }
    return runtime, tokenizer, cfg, card


class EdgeMiddleware:
    """Pure ASGI: body size limit (413 before reading), request metrics by route and status."""

    def __init__(self, app: ASGIApp, state: ServiceState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.state.settings.max_body_bytes
        path = scope.get("path", "")
        t0 = time.perf_counter()
        status_holder = {"status": 500}

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status_holder["status"] = message["status"]
            await send(message)

        try:
            length = int(dict(scope.get("headers") or []).get(b"content-length", b"0") or 0)
        except ValueError:
            length = 0
        if length > limit:
            await _send_error(
                send_wrapper,
                PayloadTooLarge(
                    f"the request body is {length:,} bytes; at most {limit:,} are allowed (RMSERVE_MAX_BODY_BYTES)",
                    code="body_too_large",
                ),
            )
        else:
            seen = 0

            async def limited_receive() -> Message:
                nonlocal seen
                msg = await receive()
                if msg["type"] == "http.request":
                    seen += len(msg.get("body", b""))
                    if seen > limit:
                        raise _BodyTooLarge()
                return msg

            try:
                await self.app(scope, limited_receive, send_wrapper)
            except _BodyTooLarge:
                await _send_error(
                    send_wrapper,
                    PayloadTooLarge(
                        f"the request body passed {limit:,} bytes (RMSERVE_MAX_BODY_BYTES)",
                        code="body_too_large",
                    ),
                )
        route = scope.get("route")
        label = getattr(route, "path", None) or ("other" if path not in OPEN_ROUTES else path)
        self.state.metrics.requests.labels(label, str(status_holder["status"])).inc()
        self.state.metrics.latency.labels(label).observe(time.perf_counter() - t0)


class _BodyTooLarge(Exception):
    pass


async def _send_error(send: Send, err: ServiceError, headers: dict[str, str] | None = None) -> None:
    body = json.dumps(err.body()).encode()
    hdrs = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    hdrs += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": err.status, "headers": hdrs})
    await send({"type": "http.response.body", "body": body})


def _validation_to_error(exc: RequestValidationError) -> tuple[int, dict[str, Any]]:
    errors = list(exc.errors())
    # With unions (str | list[Message]) the deepest location is the informative one.
    errors.sort(key=lambda e: -len(e.get("loc", ())))
    first = errors[0] if errors else {"msg": "invalid request", "loc": ()}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    # Drop pydantic's union-branch names (e.g. 'str', 'list[Message]', 'function-after[...]').
    loc = [p for p in loc if not (p in ("str", "list[Message]", "RerankDocument") or p.startswith("function-"))]
    param = ".".join(loc) or None
    if first.get("type") == "json_invalid":
        ctx: Any = first.get("ctx") or {}
        msg = f"the request body is not valid JSON: {ctx.get('error', first.get('msg'))}"
        return 400, {"error": {"message": msg, "type": "invalid_request_error", "param": None, "code": "json_invalid"}}
    if param is None and first.get("type") in ("model_attributes_type", "dict_type"):
        msg = "the request body must be a JSON object (send Content-Type: application/json)"
        return 422, {
            "error": {
                "message": msg,
                "type": "invalid_request_error",
                "param": None,
                "code": "body_not_object",
            }
        }
    msg = f"{param + ': ' if param else ''}{first.get('msg')}"
    if len(errors) > 1:
        msg += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
    return 422, {
        "error": {
            "message": msg,
            "type": "invalid_request_error",
            "param": param,
            "code": str(first.get("type", "invalid")),
        }
    }


def create_app(
    settings: Settings,
    *,
    runtime_wrapper: Callable[[Runtime], Runtime] | None = None,
) -> FastAPI:
    """Build the service; the model loads in the lifespan (never at import). `runtime_wrapper` lets
    tests wrap the runtime (fault injection)."""
    state = ServiceState(settings=settings, metrics=Metrics())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        model_dir = resolve_model_dir(settings)
        runtime, tokenizer, cfg, card = await asyncio.to_thread(load_runtime, settings, model_dir)
        if runtime_wrapper is not None:
            runtime = runtime_wrapper(runtime)
        await asyncio.to_thread(runtime.warmup)
        batcher = Batcher(
            runtime.score,
            max_batch_tokens=settings.max_batch_tokens,
            max_batch_size=settings.max_batch_size,
            max_wait_s=settings.max_wait_ms / 1000,
            max_queued=settings.max_queued,
            observer=state.metrics,
            share_prefixes=bool(getattr(runtime, "prefix_sharing", False)),
            min_prefix=settings.prefix_min_tokens,
            max_pad_ratio=settings.max_pad_ratio,
        )
        batcher.start()
        from models.formatting import Formatter

        formatter = Formatter(tokenizer, cfg.max_length, cfg.truncation)
        state.engine = ScoringEngine(
            formatter,
            batcher,
            model_id=card["id"],
            normalization=cfg.normalization,
            limits=Limits(
                settings.max_responses, settings.max_chars, settings.request_timeout_s, settings.retry_after_s
            ),
            metrics=state.metrics,
            log_texts=settings.log_texts,
        )
        state.batcher, state.runtime, state.card = batcher, runtime, card
        state.metrics.model_info.info({k: str(card[k]) for k in ("id", "backbone", "dtype", "runtime", "max_length")})
        state.ready = True
        log.info("serving %s (%s, %s) from %s", card["id"], runtime.name, runtime.dtype, model_dir)
        try:
            yield
        finally:
            state.ready = False
            await batcher.close()

    app = FastAPI(
        title="rmserve",
        version="0.1.0",
        description="Reward-model scoring: score, rank, rerank, and the OpenRLHF reward oracle.",
        lifespan=lifespan,
    )
    app.state.rm = state

    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError) -> JSONResponse:
        headers = {"Retry-After": str(exc.retry_after)} if hasattr(exc, "retry_after") else None
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        status, body = _validation_to_error(exc)
        return JSONResponse(body, status_code=status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        detail = str(exc.detail)
        if exc.status_code == 400 and "parsing the body" in detail:
            detail = "the request body could not be parsed: send UTF-8 JSON"
        kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "invalid_request_error")
        return JSONResponse(
            {"error": {"message": detail, "type": kind, "param": None, "code": kind}},
            status_code=exc.status_code,
            headers=getattr(exc, "headers", None),
        )

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s", request.url.path)
        return JSONResponse(
            {
                "error": {
                    "message": f"internal error: {type(exc).__name__}",
                    "type": "internal_error",
                    "param": None,
                    "code": "internal_error",
                }
            },
            status_code=500,
        )

    from service.routes import health, openrlhf, rank, rerank, score

    app.include_router(health.router)
    for r in (score.router, rank.router, rerank.router, openrlhf.router):
        app.include_router(r)
    app.add_middleware(EdgeMiddleware, state=state)
    return app


# -- dependencies shared by the routes ---------------------------------------------------------------
def get_state(request: Request) -> ServiceState:
    state: ServiceState = request.app.state.rm
    return state


def get_engine(request: Request) -> ScoringEngine:
    state = get_state(request)
    if not state.ready or state.engine is None:
        raise NotReady("the model is not loaded yet; retry when GET /ready answers 200")
    return state.engine


def check_key(state: ServiceState, request: Request) -> None:
    key = state.settings.api_key
    if key is None:
        return
    auth = request.headers.get("authorization", "")
    scheme, _, token = auth.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.get_secret_value().encode()):
        raise Unauthorized("a valid API key is required: send 'Authorization: Bearer <key>'", code="invalid_api_key")


def require_key(request: Request) -> None:
    check_key(get_state(request), request)


def require_key_on_open_routes(request: Request) -> None:
    state = get_state(request)
    if state.settings.auth_open_routes:
        check_key(state, request)


async def until_disconnected(request: Request, aw: Awaitable[Any]) -> Any:
    """Await `aw`, cancelling it (so its queued work is dropped) if the client goes away."""
    task = asyncio.ensure_future(aw)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.05)
            if done:
                return task.result()
            if await request.is_disconnected():
                task.cancel()
                get_state(request).metrics.failures.labels("client_gone").inc()
                raise ClientGone()
    except asyncio.CancelledError:
        task.cancel()
        raise


class ClientGone(ServiceError):
    status = 499
    type = "client_closed_request"

    def __init__(self) -> None:
        super().__init__("the client closed the connection before the answer was ready")
