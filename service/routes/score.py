from __future__ import annotations

from fastapi import APIRouter, Request

from service.app import until_disconnected
from service.routes.deps import ERRORS, SCORING, EngineDep, prompt_value
from service.schemas import ScoreRequest, ScoreResponse, Usage

router = APIRouter(tags=["scoring"], dependencies=SCORING, responses=ERRORS)


@router.post("/v1/score", response_model=ScoreResponse)
async def score(req: ScoreRequest, engine: EngineDep, request: Request) -> ScoreResponse:
    """Score responses to one prompt, or `items` with a prompt each; scores come in input order."""
    engine.check_normalize(req.normalize)
    if req.items is not None:
        engine.check_count(len(req.items), "items")
        pairs = [(prompt_value(it.prompt), it.response, f"items[{i}].response") for i, it in enumerate(req.items)]
        for i, it in enumerate(req.items):
            engine.check_prompt(pairs[i][0], f"items[{i}].prompt")
            engine.check_text(it.response, f"items[{i}].response")
    else:
        assert req.prompt is not None and req.responses is not None
        engine.check_count(len(req.responses), "responses")
        engine.check_prompt(prompt_value(req.prompt), "prompt")
        for i, r in enumerate(req.responses):
            engine.check_text(r, f"responses[{i}]")
        p = prompt_value(req.prompt)
        pairs = [(p, r, f"responses[{i}]") for i, r in enumerate(req.responses)]
    scored = await until_disconnected(request, engine.run(engine.encode_pairs(pairs)))
    return ScoreResponse(
        model=engine.model_id,
        scores=engine.normalize(scored.scores, req.normalize),
        truncated=scored.truncated,
        usage=Usage(tokens=scored.tokens),
    )
