from __future__ import annotations

from fastapi import APIRouter, Request

from service.routes.deps import ERRORS, EngineDep, until_disconnected
from service.schemas import RewardRequest, RewardResponse

router = APIRouter(tags=["rlhf"], responses=ERRORS)


@router.post("/get_reward", response_model=RewardResponse)
async def get_reward(req: RewardRequest, engine: EngineDep, request: Request) -> RewardResponse:
    """OpenRLHF's remote reward model protocol: each `query` is full prompt+response text, already
    templated, scored at its last token. Takes whole rollout batches (up to RMSERVE_MAX_REWARD_QUERIES),
    fed to the batcher in slices so other clients' requests interleave. An empty list answers empty lists."""
    if not req.query:
        return RewardResponse(rewards=[], scores=[], truncated=[], extra_logs={})
    scored = await until_disconnected(request, engine.score_rollout(*req.jobs()))
    cut = scored.truncated
    scores = engine.normalize(scored.scores, engine.normalize_rollouts)
    return RewardResponse(
        rewards=scores, scores=scores, truncated=cut, extra_logs={"truncated": [float(t) for t in cut]}
    )
