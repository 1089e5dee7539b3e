"""What the routes depend on: the service state, the engine, and waiting while the client stays."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Annotated, Any, TypeVar

from fastapi import Depends, Request

from service.engine import ScoringEngine
from service.errors import NotReady, ServiceError
from service.schemas import ErrorBody
from service.state import ServiceState

T = TypeVar("T")

ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody} for code in (400, 401, 413, 422, 429, 500, 503, 504)
}


def get_state(request: Request) -> ServiceState:
    state: ServiceState = request.app.state.rm
    return state


def get_engine(request: Request) -> ScoringEngine:
    state = get_state(request)
    if not state.ready or state.engine is None:
        raise NotReady("the model is not loaded yet; retry when GET /ready answers 200")
    return state.engine


EngineDep = Annotated[ScoringEngine, Depends(get_engine)]
StateDep = Annotated[ServiceState, Depends(get_state)]


class ClientGone(ServiceError):
    status = 499
    type = "client_closed_request"

    def __init__(self) -> None:
        super().__init__("the client closed the connection before the answer was ready")


async def until_disconnected(request: Request, aw: Awaitable[T]) -> T:
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
