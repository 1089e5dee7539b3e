from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends

from service.app import ServiceState, get_engine, get_state, require_key, require_key_on_open_routes
from service.engine import ScoringEngine
from service.schemas import ErrorBody, Message

EngineDep = Annotated[ScoringEngine, Depends(get_engine)]
StateDep = Annotated[ServiceState, Depends(get_state)]
SCORING = [Depends(require_key)]
OPEN = [Depends(require_key_on_open_routes)]
ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody} for code in (400, 401, 413, 422, 429, 500, 503, 504)
}


def prompt_value(prompt: str | list[Message]) -> str | list[dict[str, str]]:
    return prompt if isinstance(prompt, str) else [m.model_dump() for m in prompt]
