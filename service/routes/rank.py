from __future__ import annotations

from fastapi import APIRouter, Request

from service.ranking import best_first, sigmoid, softmax
from service.routes.deps import ERRORS, EngineDep, MessageLimit, MessageLimitedRoute, until_disconnected
from service.schemas import Ranked, RankRequest, RankResponse, Usage

router = APIRouter(tags=["scoring"], responses=ERRORS, dependencies=[MessageLimit], route_class=MessageLimitedRoute)


@router.post("/v1/rank", response_model=RankResponse, response_model_exclude_none=True)
async def rank(req: RankRequest, engine: EngineDep, request: Request) -> RankResponse:
    """Rank responses best first; probability = softmax(score / temperature), the chance each is best
    under Bradley-Terry; with return_pairwise, P(i better than j) = sigmoid(r_i - r_j)."""
    engine.check_normalize(req.normalize)
    jobs, count_param = req.jobs()
    scored = await until_disconnected(request, engine.score(jobs, count_param))
    scores = engine.normalize(scored.scores, req.normalize)
    probs = softmax(scores, req.temperature)
    order = best_first(scores, req.top_n)
    pairwise = [[sigmoid(a - b) for b in scores] for a in scores] if req.return_pairwise else None
    return RankResponse(
        model=engine.model_id,
        ranking=[Ranked(index=i, score=scores[i], probability=probs[i], truncated=scored.truncated[i]) for i in order],
        pairwise=pairwise,
        usage=Usage(tokens=scored.tokens),
    )
