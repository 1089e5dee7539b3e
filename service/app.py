"""create_app(settings) + lifespan: the one place that builds and wires the service's parts."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI

from models.formatting import Formatter, RewardRule
from service.batcher import Batcher
from service.edge import install_edge
from service.engine import Limits, ScoringEngine
from service.metrics import Metrics
from service.routes import docs, health, openrlhf, rank, rerank, score, tei
from service.runtimes import calibrate, load_runtime, resolve_model_dir
from service.runtimes.base import Runtime
from service.settings import Settings
from service.state import ServiceState

log = logging.getLogger("rmserve.service")


PROBE = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello?"}]


def probe_formatter(formatter: Formatter, model_id: str) -> None:
    """Render one conversation at start-up: a chat template that cannot render fails start-up here,
    instead of every request failing behind a green /ready."""
    try:
        formatter.encode(PROBE, "Hello!", param="probe")
    except Exception as e:
        raise RuntimeError(
            f"model {model_id!r}: its chat template cannot render a conversation ({type(e).__name__}: {e}); "
            "fix chat_template in the model's tokenizer files"
        ) from e


def create_app(
    settings: Settings,
    *,
    runtime_wrapper: Callable[[Runtime], Runtime] | None = None,
) -> FastAPI:
    """Build the service; the model loads in the lifespan (never at import). `runtime_wrapper` lets
    tests wrap the runtime (fault injection)."""
    state = ServiceState(settings=settings, metrics=Metrics())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        documents = asyncio.create_task(docs.prerender(app))  # /openapi.json, /docs, /redoc: rendered once
        model_dir = resolve_model_dir(settings)
        runtime, tokenizer, cfg, card = await asyncio.to_thread(load_runtime, settings, model_dir)
        await asyncio.to_thread(runtime.warmup)
        rate = await asyncio.to_thread(calibrate, runtime)  # the batcher's prior drain rate
        if runtime_wrapper is not None:
            runtime = runtime_wrapper(runtime)
        formatter = Formatter(tokenizer, cfg.max_length, cfg.truncation, RewardRule.from_dict(cfg.rule))
        await asyncio.to_thread(probe_formatter, formatter, card["id"])
        batcher = Batcher(
            runtime.score,
            max_batch_tokens=settings.max_batch_tokens,
            max_batch_size=settings.max_batch_size,
            max_wait_s=settings.max_wait_ms / 1000,
            max_queued=settings.max_queued,
            observer=state.metrics,
            share_prefixes=bool(getattr(runtime, "prefix_sharing", False)),
            min_prefix=settings.prefix_min_tokens,
            max_pad_ratio=settings.max_pad_ratio,
            packed=bool(getattr(runtime, "packed", False)),
        )
        batcher.seed_rate(rate)
        batcher.start()
        state.engine = ScoringEngine(
            formatter,
            batcher,
            model_id=card["id"],
            normalization=cfg.normalization,
            normalize_rollouts=bool(getattr(cfg, "normalize_rollouts", False)),
            limits=Limits(
                settings.max_responses,
                settings.max_chars,
                settings.request_timeout_s,
                settings.retry_after_s,
                admit_wait_fraction=settings.admit_wait_fraction,
                max_reward_queries=settings.max_reward_queries,
                max_messages=settings.max_messages,
            ),
            metrics=state.metrics,
            log_texts=settings.log_texts,
        )
        state.batcher, state.runtime, state.card = batcher, runtime, card
        state.metrics.model_info.info({k: str(card[k]) for k in ("id", "backbone", "dtype", "runtime", "max_length")})
        await documents
        state.ready = True
        log.info("serving %s (%s, %s) from %s", card["id"], runtime.name, runtime.dtype, model_dir)
        try:
            yield
        finally:
            state.ready = False
            await batcher.close()

    app = FastAPI(
        title="rmserve",
        version="0.1.0",
        description="Reward-model scoring: score, rank, rerank (Cohere, Jina, vLLM and TEI dialects), and the "
        "OpenRLHF reward oracle.",
        lifespan=lifespan,
        docs_url=None,  # /docs, /redoc and /openapi.json come from routes/docs.py: no CDN, rendered once
        openapi_url=None,
        redoc_url=None,
    )
    app.state.rm = state
    for module in (health, score, rank, rerank, tei, openrlhf, docs):
        app.include_router(module.router)
    install_edge(
        app, settings, state.metrics, overloaded=lambda n: state.engine.refuse_before_body(n) if state.engine else None
    )
    return app
