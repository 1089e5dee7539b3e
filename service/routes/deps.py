"""What the routes depend on: the service state, the engine, and waiting while the client stays."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable, Coroutine
from typing import Annotated, Any, TypeVar

from fastapi import Depends, Request, Response
from fastapi.routing import APIRoute

from service.engine import ScoringEngine
from service.errors import NotReady, PayloadTooLarge, ServiceError
from service.schemas import ErrorBody
from service.state import ServiceState

T = TypeVar("T")

ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody} for code in (400, 401, 413, 415, 422, 429, 500, 503, 504)
}


def get_state(request: Request) -> ServiceState:
    state: ServiceState = request.app.state.rm
    return state


def get_engine(request: Request) -> ScoringEngine:
    state = get_state(request)
    if not state.ready or state.engine is None:
        raise NotReady("the model is not loaded yet; retry when GET /ready answers 200")
    return state.engine


async def limit_messages(request: Request) -> None:
    """413 for a prompt with more than RMSERVE_MAX_MESSAGES messages (`prompt`, `items[i].prompt`), decided
    on the parsed JSON before the body is validated: validating 100,000 messages alone costs about half a
    second of the event loop. FastAPI solves a route's dependencies before it validates the body."""
    if not await request.body():
        return
    try:
        body = await request.json()  # parsed once: Starlette keeps it for the body's validation
    except ValueError:
        return  # invalid JSON: the validation answers it
    limit = get_state(request).settings.max_messages
    for param, prompt in _prompts(body):
        if isinstance(prompt, list) and len(prompt) > limit:
            raise too_many_messages(param, len(prompt), limit)


def too_many_messages(param: str, n: int, limit: int, whole_body: bool = False) -> PayloadTooLarge:
    where = f"the prompts of '{param}' hold" if whole_body else f"'{param}' has"
    return PayloadTooLarge(
        f"{where} {n:,} messages; at most {limit:,} are allowed per prompt (RMSERVE_MAX_MESSAGES)",
        param=param,
        code="too_many_messages",
    )


def _prompts(body: Any) -> list[tuple[str, Any]]:
    """The message lists a score or rank body may carry, with their field names."""
    if not isinstance(body, dict):
        return []
    found = [("prompt", body.get("prompt"))]
    items = body.get("items")
    if isinstance(items, list):
        found += [(f"items[{i}].prompt", it.get("prompt")) for i, it in enumerate(items) if isinstance(it, dict)]
    return found


MessageLimit = Depends(limit_messages)
ROLE_KEY = re.compile(rb'"role"\s*:')  # a "role" key: inside a JSON string its quotes would be escaped


class MessageLimitedRoute(APIRoute):
    """A route whose body may carry message lists: before the body is parsed, its "role" keys are counted
    in the raw bytes (a few ms for 3 MB; parsing 100,000 messages takes 0.2 s of the event loop, validating
    them another 0.5 s). More than any valid body can hold (RMSERVE_MAX_MESSAGES per prompt, and with
    `items` at most RMSERVE_MAX_RESPONSES prompts) is a 413 at once; the exact per-prompt check follows
    on the parsed body (`limit_messages`)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def handle(request: Request) -> Response:
            body = await request.body()  # Starlette keeps it for the handler
            settings = get_state(request).settings
            limit = settings.max_messages
            items = b'"items"' in body
            bound = limit * (settings.max_responses if items else 1)
            if body.count(b'"role"') > bound:  # an upper bound on the "role" keys: 7 ms for 3 MB
                n = body.count(b'"role":') + body.count(b'"role" :')  # keys as JSON encoders write them
                if n <= bound:
                    n = len(ROLE_KEY.findall(body))  # other spacing: the exact count, slower
                if n > bound:
                    raise too_many_messages("items" if items else "prompt", n, limit, whole_body=items)
            return await handler(request)

        return handle


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
