from __future__ import annotations

import time
import uuid

from fastapi import APIRouter, Request

from service.ranking import activate
from service.routes.deps import ERRORS, EngineDep, MessageLimit, MessageLimitedRoute, until_disconnected
from service.schemas import (
    AnyScoreRequest,
    ScoreRequest,
    ScoreResponse,
    Usage,
    VLLMScoreData,
    VLLMScoreRequest,
    VLLMScoreResponse,
    VLLMUsage,
)

router = APIRouter(tags=["scoring"], responses=ERRORS, dependencies=[MessageLimit], route_class=MessageLimitedRoute)


@router.post("/v1/score", response_model=ScoreResponse | VLLMScoreResponse)
async def score(req: AnyScoreRequest, engine: EngineDep, request: Request) -> ScoreResponse | VLLMScoreResponse:
    """Score responses to one prompt, or `items` with a prompt each; scores come in input order.
    vLLM's body (`text_1`/`text_2`, `data_1`/`data_2`, `queries`/`documents`) is answered in vLLM's shape."""
    if isinstance(req, VLLMScoreRequest):
        return await vllm_score(req, engine, request)
    return await own_score(req, engine, request)


@router.post("/score", response_model=VLLMScoreResponse)
async def score_vllm(req: VLLMScoreRequest, engine: EngineDep, request: Request) -> VLLMScoreResponse:
    """vLLM's score API: each first text (the prompt) with its second text (the answer); `score` is
    the raw reward, or sigmoid(reward) with `use_activation: true`."""
    return await vllm_score(req, engine, request)


async def own_score(req: ScoreRequest, engine: EngineDep, request: Request) -> ScoreResponse:
    engine.check_normalize(req.normalize)
    jobs, count_param = req.jobs()
    scored = await until_disconnected(request, engine.score(jobs, count_param))
    return ScoreResponse(
        model=engine.model_id,
        scores=engine.normalize(scored.scores, req.normalize),
        truncated=scored.truncated,
        usage=Usage(tokens=scored.tokens),
    )


async def vllm_score(req: VLLMScoreRequest, engine: EngineDep, request: Request) -> VLLMScoreResponse:
    scored = await until_disconnected(request, engine.score(*req.jobs()))
    scores = activate(scored.scores, req.use_activation)
    return VLLMScoreResponse(
        id=f"score-{uuid.uuid4().hex}",
        created=int(time.time()),
        model=engine.model_id,
        data=[VLLMScoreData(index=i, score=s, truncated=scored.truncated[i]) for i, s in enumerate(scores)],
        usage=VLLMUsage(prompt_tokens=scored.tokens, total_tokens=scored.tokens),
    )
