"""Admission, formatting/tokenizing, submission to the batcher, and assembling results."""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from models.formatting import Encoded, Formatter, FormattingError
from service.batcher import Batcher, QueueFull
from service.errors import DeadlineExceeded, InferenceFailed, InvalidRequest, Overloaded, PayloadTooLarge
from service.metrics import Metrics

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Limits:
    max_responses: int = 64  # responses / items / queries per request
    max_chars: int = 200_000  # characters per text
    request_timeout_s: float = 60.0
    retry_after_s: int = 1


@dataclass(frozen=True)
class Scored:
    scores: list[float]  # raw rewards, input order
    truncated: list[bool]
    tokens: int


class ScoringEngine:
    """Turns validated requests into scores: checks limits, formats with the model's own formatter
    (the trainer's), submits every sequence to the shared batcher and waits within the deadline."""

    def __init__(
        self,
        formatter: Formatter,
        batcher: Batcher,
        *,
        model_id: str,
        normalization: dict[str, float] | None,
        limits: Limits,
        metrics: Metrics,
        log_texts: bool = False,
    ) -> None:
        self.formatter = formatter
        self.batcher = batcher
        self.model_id = model_id
        self.normalization = normalization
        self.limits = limits
        self.metrics = metrics
        self.log_texts = log_texts

    # -- checks ---------------------------------------------------------------------------------
    def check_count(self, n: int, param: str) -> None:
        if n == 0:
            raise InvalidRequest(f"'{param}' is empty; give at least one", param=param)
        if n > self.limits.max_responses:
            raise PayloadTooLarge(
                f"'{param}' has {n} entries; at most {self.limits.max_responses} are allowed per request "
                "(RMSERVE_MAX_RESPONSES)",
                param=param,
                code="too_many_responses",
            )

    def check_text(self, text: str, param: str, *, allow_empty: bool = False) -> None:
        if not allow_empty and not text:
            raise InvalidRequest(f"'{param}' is empty; give non-empty text", param=param, code="empty_text")
        if len(text) > self.limits.max_chars:
            raise PayloadTooLarge(
                f"'{param}' has {len(text):,} characters; at most {self.limits.max_chars:,} are allowed "
                "(RMSERVE_MAX_CHARS)",
                param=param,
                code="text_too_long",
            )

    def check_prompt(self, prompt: str | Sequence[dict[str, str]], param: str) -> None:
        if isinstance(prompt, str):
            self.check_text(prompt, param)
            return
        if not prompt:
            raise InvalidRequest(f"'{param}' is an empty message list; give at least one message", param=param)
        for i, m in enumerate(prompt):
            self.check_text(m["content"], f"{param}[{i}].content", allow_empty=True)

    # -- scoring --------------------------------------------------------------------------------
    def encode_pairs(self, pairs: Sequence[tuple[Any, str, str]]) -> list[Encoded]:
        """(prompt, response, param naming the response) -> token ids, through the trainer's formatter."""
        out = []
        for prompt, response, param in pairs:
            try:
                out.append(self.formatter.encode(prompt, response, param=param))
            except FormattingError as e:
                raise InvalidRequest(str(e), param=e.param or param) from None
        return out

    def encode_texts(self, texts: Sequence[str], param: str) -> list[Encoded]:
        out = []
        for i, t in enumerate(texts):
            try:
                out.append(self.formatter.encode_text(t, param=f"{param}[{i}]"))
            except FormattingError as e:
                raise InvalidRequest(str(e), param=e.param or f"{param}[{i}]") from None
        return out

    async def run(self, encoded: Sequence[Encoded]) -> Scored:
        seqs = [e.ids for e in encoded]
        if self.log_texts:
            log.debug("scoring %d sequences: %s", len(seqs), [self.formatter.tokenizer.decode(s) for s in seqs])
        try:
            scores = await asyncio.wait_for(self.batcher.submit(seqs), self.limits.request_timeout_s)
        except QueueFull as e:
            self.metrics.failures.labels("overloaded").inc()
            raise Overloaded(
                f"the service is at its admission limit: {e}; retry later",
                retry_after=self.limits.retry_after_s,
            ) from None
        except TimeoutError:
            self.metrics.failures.labels("timeout").inc()
            raise DeadlineExceeded(
                f"the request did not finish within {self.limits.request_timeout_s:g} s (RMSERVE_REQUEST_TIMEOUT_S)"
            ) from None
        except asyncio.CancelledError:
            raise
        except Exception as e:
            self.metrics.failures.labels("inference").inc()
            raise InferenceFailed(f"the forward pass failed: {type(e).__name__}: {e}") from None
        bad = [i for i, s in enumerate(scores) if not math.isfinite(s)]
        if bad:
            self.metrics.failures.labels("non_finite").inc()
            raise InferenceFailed(f"the model produced non-finite rewards for sequence(s) {bad}")
        for s in scores:
            self.metrics.rewards.observe(s)
        truncated = [e.truncated for e in encoded]
        self.metrics.truncated.inc(sum(truncated))
        return Scored(scores, truncated, sum(len(e.ids) for e in encoded))

    def check_normalize(self, on: bool) -> None:
        if on and not self.normalization:
            raise InvalidRequest(
                "normalize=true was asked but this model stores no normalization statistics",
                param="normalize",
            )

    def normalize(self, scores: Sequence[float], on: bool) -> list[float]:
        if not on:
            return list(scores)
        self.check_normalize(on)
        n = self.normalization
        assert n is not None
        return [(s - n["mean"]) / n["std"] for s in scores]
