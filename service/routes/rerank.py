"""Rerank in every client's dialect: Cohere v1 and v2, Jina and vLLM (`documents`), and TEI (`texts`)."""

from __future__ import annotations

import math
import uuid

from fastapi import APIRouter, Request

from service.engine import ScoringEngine
from service.ranking import activate, best_first
from service.routes.deps import ERRORS, EngineDep, until_disconnected
from service.schemas import (
    AnyRerankRequest,
    ApiVersion,
    BilledUnits,
    MetaTokens,
    RerankMeta,
    RerankRequest,
    RerankResponse,
    RerankResult,
    RerankUsage,
    TEIRank,
    TEIRerankRequest,
)

router = APIRouter(tags=["rerank"], responses=ERRORS)

SEARCH_UNIT_DOCUMENTS = 100  # Cohere bills one search unit per query and up to 100 documents


async def rerank_documents(
    req: RerankRequest, engine: ScoringEngine, request: Request, api_version: str
) -> RerankResponse:
    texts = req.texts()
    scored = await until_disconnected(request, engine.score(*req.jobs()))
    scores = activate(scored.scores, req.use_activation)
    results = [
        RerankResult(
            index=i,
            relevance_score=scores[i],
            document=req.returned(i) if req.return_documents else None,
            truncated=scored.truncated[i],
        )
        for i in best_first(scores, req.top_n)
    ]
    return RerankResponse(
        id=f"rerank-{uuid.uuid4().hex}",
        model=engine.model_id,
        results=results,
        usage=RerankUsage(prompt_tokens=scored.tokens, total_tokens=scored.tokens),
        meta=RerankMeta(
            api_version=ApiVersion(version=api_version),
            billed_units=BilledUnits(
                search_units=math.ceil(len(texts) / SEARCH_UNIT_DOCUMENTS), input_tokens=scored.tokens
            ),
            tokens=MetaTokens(input_tokens=scored.tokens),
        ),
    )


async def rerank_tei(req: TEIRerankRequest, engine: ScoringEngine, request: Request) -> list[TEIRank]:
    scored = await until_disconnected(request, engine.score(*req.jobs()))
    scores = activate(scored.scores, not req.raw_scores)
    return [
        TEIRank(index=i, score=scores[i], text=req.texts[i] if req.return_text else None, truncated=scored.truncated[i])
        for i in best_first(scores, None)
    ]


@router.post("/v1/rerank", response_model=RerankResponse, response_model_exclude_none=True)
async def rerank_v1(req: RerankRequest, engine: EngineDep, request: Request) -> RerankResponse:
    """Cohere v1, Jina and vLLM rerank: `query` is the prompt, each document a candidate answer;
    results best first; relevance_score is the raw reward (sigmoid with `use_activation: true`)."""
    return await rerank_documents(req, engine, request, "1")


@router.post("/v2/rerank", response_model=RerankResponse, response_model_exclude_none=True)
async def rerank_v2(req: RerankRequest, engine: EngineDep, request: Request) -> RerankResponse:
    """Cohere v2 (`cohere.ClientV2().rerank`, LangChain, llama-index) and vLLM's v2 rerank."""
    return await rerank_documents(req, engine, request, "2")


@router.post(
    "/rerank",
    response_model=RerankResponse | list[TEIRank],
    response_model_exclude_none=True,
)
async def rerank_any(req: AnyRerankRequest, engine: EngineDep, request: Request) -> RerankResponse | list[TEIRank]:
    """Jina and vLLM (`documents`, answered like /v1/rerank) or Hugging Face TEI (`texts`, answered as
    TEI does: a bare list of {index, score, text?} best first, score = sigmoid(reward) unless
    `raw_scores: true`)."""
    if isinstance(req, TEIRerankRequest):
        return await rerank_tei(req, engine, request)
    return await rerank_documents(req, engine, request, "1")
