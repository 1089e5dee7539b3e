from __future__ import annotations

from fastapi import APIRouter, Request

from service.app import until_disconnected
from service.routes.deps import ERRORS, SCORING, EngineDep
from service.schemas import RewardRequest, RewardResponse

router = APIRouter(tags=["rlhf"], dependencies=SCORING, responses=ERRORS)


@router.post("/get_reward", response_model=RewardResponse)
async def get_reward(req: RewardRequest, engine: EngineDep, request: Request) -> RewardResponse:
    """OpenRLHF's remote reward model protocol: each `query` is full prompt+response text, already
    templated, scored as given (no special tokens added) at its last token. An empty list answers
    empty lists."""
    if not req.query:
        return RewardResponse(rewards=[], scores=[], extra_logs={})
    engine.check_count(len(req.query), "query")
    for i, q in enumerate(req.query):
        engine.check_text(q, f"query[{i}]")
    scored = await until_disconnected(request, engine.run(engine.encode_texts(req.query, "query")))
    return RewardResponse(rewards=scored.scores, scores=scored.scores, extra_logs={})
