from __future__ import annotations

import uuid

from fastapi import APIRouter, Request

from service.routes.deps import ERRORS, EngineDep, until_disconnected
from service.schemas import RerankDocument, RerankRequest, RerankResponse, RerankResult, RerankUsage

router = APIRouter(tags=["scoring"], responses=ERRORS)


@router.post("/v1/rerank", response_model=RerankResponse, response_model_exclude_none=True)
async def rerank(req: RerankRequest, engine: EngineDep, request: Request) -> RerankResponse:
    """Cohere/Jina/vLLM rerank shape: `query` is the prompt, each document a candidate answer;
    relevance_score is the raw reward, results best first."""
    texts = req.texts()
    scored = await until_disconnected(request, engine.score(*req.jobs()))
    order = sorted(range(len(texts)), key=lambda i: (-scored.scores[i], i))[: req.top_n]
    results = [
        RerankResult(
            index=i,
            relevance_score=scored.scores[i],
            document=RerankDocument(text=texts[i]) if req.return_documents else None,
        )
        for i in order
    ]
    return RerankResponse(
        id=f"rerank-{uuid.uuid4().hex}",
        model=req.model or engine.model_id,
        results=results,
        usage=RerankUsage(total_tokens=scored.tokens),
    )
