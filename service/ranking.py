"""Pure functions on rewards that the routes answer with: Bradley-Terry probabilities and orderings."""

from __future__ import annotations

import math
from collections.abc import Sequence


def sigmoid(x: float) -> float:
    """P(an answer with reward x beats one with reward 0) under Bradley-Terry; stable for any x."""
    return 1 / (1 + math.exp(-x)) if x >= 0 else math.exp(x) / (1 + math.exp(x))


def softmax(xs: Sequence[float], temperature: float) -> list[float]:
    """softmax(x / temperature): each answer's chance to be the best one under Bradley-Terry."""
    m = max(xs)
    e = [math.exp((x - m) / temperature) for x in xs]  # shifted before dividing: no inf/inf at tiny temperatures
    s = sum(e)
    return [v / s for v in e]


def activate(scores: Sequence[float], on: bool | None) -> list[float]:
    """relevance_score: the raw reward, or sigmoid(reward) when the client asks (use_activation /
    TEI's raw_scores=false)."""
    return [sigmoid(s) for s in scores] if on else list(scores)


def best_first(scores: Sequence[float], top_n: int | None) -> list[int]:
    """Indices best first (ties keep input order); the best `top_n`, all when it is None or 0."""
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    return order[:top_n] if top_n else order
