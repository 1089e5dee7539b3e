"""Hugging Face text-embeddings-inference's /predict and /info (its /rerank lives in routes/rerank.py)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from service.errors import NotReady
from service.ranking import activate
from service.routes.deps import ERRORS, EngineDep, StateDep, until_disconnected
from service.schemas import TEIPrediction, TEIPredictRequest

router = APIRouter(tags=["tei"], responses=ERRORS)

LABEL = "reward"


@router.post("/predict", response_model=list[TEIPrediction] | list[list[TEIPrediction]])
async def predict(
    req: TEIPredictRequest, engine: EngineDep, request: Request
) -> list[TEIPrediction] | list[list[TEIPrediction]]:
    """TEI's /predict: a text is scored as already-templated text, a [text, text_pair] pair as (prompt,
    answer); score = sigmoid(reward) unless `raw_scores: true`; one label, "reward"."""
    scored = await until_disconnected(request, engine.score(*req.jobs()))
    scores = activate(scored.scores, not req.raw_scores)
    preds = [[TEIPrediction(score=s, label=LABEL, truncated=t)] for s, t in zip(scores, scored.truncated, strict=True)]
    return preds if req.batched else preds[0]


@router.get("/info")
async def info(state: StateDep) -> dict[str, Any]:
    """TEI's /info: the served model as a one-label reranker, and the batching limits."""
    if state.card is None:
        raise NotReady("the model is loading")
    s = state.settings
    return {
        "model_id": state.card["id"],
        "model_sha": None,
        "model_dtype": state.card["dtype"],
        "served_model_name": state.card["id"],
        "model_type": {"reranker": {"id2label": {"0": LABEL}, "label2id": {LABEL: 0}}},
        "max_concurrent_requests": s.max_queued,
        "max_input_length": state.card["max_length"],
        "max_batch_tokens": s.max_batch_tokens,
        "max_batch_requests": s.max_batch_size,
        "max_client_batch_size": s.max_responses,
        "auto_truncate": True,
        "tokenization_workers": 1,
        "version": "rmserve-0.1.0",
        "sha": None,
        "docker_label": None,
    }
