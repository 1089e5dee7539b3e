from __future__ import annotations

import math

from fastapi import APIRouter, Request

from service.routes.deps import ERRORS, EngineDep, StateDep, until_disconnected
from service.schemas import RewardRequest, RewardResponse

router = APIRouter(tags=["rlhf"], responses=ERRORS)


def reward_deadline(n: int, request_timeout_s: float, max_responses: int) -> float:
    """The /get_reward deadline: RMSERVE_REQUEST_TIMEOUT_S per started block of RMSERVE_MAX_RESPONSES
    queries (64 queries: 60 s; 1,024: 16 x 60 s), as if the batch came as that many ordinary requests."""
    return request_timeout_s * max(1, math.ceil(n / max_responses))


def reward_slice(max_batch_size: int, max_queued: int) -> int:
    """Queries per slice fed to the batcher: a few passes' worth, and two slices (the most in flight)
    well under the queue limit, so a whole rollout batch never trips the 429 that guards the queue."""
    return max(1, min(4 * max_batch_size, max_queued // 4))


@router.post("/get_reward", response_model=RewardResponse)
async def get_reward(req: RewardRequest, engine: EngineDep, state: StateDep, request: Request) -> RewardResponse:
    """OpenRLHF's remote reward model protocol: each `query` is full prompt+response text, already
    templated, scored at its last token. Takes whole rollout batches (up to RMSERVE_MAX_REWARD_QUERIES),
    fed to the batcher in slices so other clients' requests interleave. An empty list answers empty lists."""
    if not req.query:
        return RewardResponse(rewards=[], scores=[], truncated=[], extra_logs={})
    jobs, count_param = req.jobs()
    limits = engine.limits
    scoring = engine.score(
        jobs,
        count_param,
        max_count=(state.settings.max_reward_queries, "RMSERVE_MAX_REWARD_QUERIES"),
        timeout_s=reward_deadline(len(jobs), limits.request_timeout_s, limits.max_responses),
        slice_size=reward_slice(engine.batcher.max_batch_size, engine.batcher.max_queued),
    )
    scored = await until_disconnected(request, scoring)
    cut = scored.truncated
    return RewardResponse(
        rewards=scored.scores, scores=scored.scores, truncated=cut, extra_logs={"truncated": [float(t) for t in cut]}
    )
