from __future__ import annotations

from fastapi import APIRouter, Request

from service.routes.deps import ERRORS, EngineDep, until_disconnected
from service.schemas import ScoreRequest, ScoreResponse, Usage

router = APIRouter(tags=["scoring"], responses=ERRORS)


@router.post("/v1/score", response_model=ScoreResponse)
async def score(req: ScoreRequest, engine: EngineDep, request: Request) -> ScoreResponse:
    """Score responses to one prompt, or `items` with a prompt each; scores come in input order."""
    engine.check_normalize(req.normalize)
    scored = await until_disconnected(request, engine.score(*req.jobs()))
    return ScoreResponse(
        model=engine.model_id,
        scores=engine.normalize(scored.scores, req.normalize),
        truncated=scored.truncated,
        usage=Usage(tokens=scored.tokens),
    )
