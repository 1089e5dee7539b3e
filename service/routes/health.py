from __future__ import annotations

import functools
from pathlib import Path

from fastapi import APIRouter, Response
from fastapi.responses import HTMLResponse, JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.errors import NotReady
from service.routes.deps import ERRORS, StateDep
from service.schemas import ModelCard, ModelList

router = APIRouter(tags=["health"], responses=ERRORS)


@router.get("/", include_in_schema=False)
async def index() -> dict[str, str]:
    """Where to start: the API docs, the playground, the probes."""
    return {
        "service": "rmserve",
        "docs": "/docs",
        "playground": "/playground",
        "openapi": "/openapi.json",
        "health": "/health",
        "ready": "/ready",
        "metrics": "/metrics",
        "models": "/v1/models",
    }


@router.get("/health")
async def health() -> dict[str, str]:
    """Alive (the process answers)."""
    return {"status": "ok"}


@router.get("/ready")
async def ready(state: StateDep) -> JSONResponse:
    """200 once the model is loaded and warmed up and the runtime is not failing; 503 otherwise."""
    if not state.ready or state.batcher is None:
        raise NotReady("the model is loading")
    if state.batcher.consecutive_failures >= state.settings.unhealthy_after_failures:
        raise NotReady(f"the last {state.batcher.consecutive_failures} forward passes failed", code="runtime_failing")
    return JSONResponse(
        {"status": "ready", "model": state.card["id"] if state.card else None, "queued": state.batcher.queued}
    )


@router.get("/metrics")
async def metrics(state: StateDep) -> Response:
    """Prometheus metrics, prefix rmserve_."""
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)


@router.get("/v1/models", response_model=ModelList)
async def models(state: StateDep) -> ModelList:
    """The served model: backbone, parameters, max length, dtype, runtime, normalization, training metrics."""
    if state.card is None:
        raise NotReady("the model is loading")
    return ModelList(data=[ModelCard(**state.card)])


PLAYGROUND = Path(__file__).resolve().parents[1] / "static" / "playground.html"


@router.get("/playground", response_class=HTMLResponse, include_in_schema=False)
async def playground() -> HTMLResponse:
    """A small page to paste a prompt and answers and see them ranked (calls /v1/rank)."""
    return HTMLResponse(_playground_html())


@functools.cache
def _playground_html() -> str:
    """The playground page, read once (a static document: never re-read per request)."""
    return PLAYGROUND.read_text(encoding="utf-8")
