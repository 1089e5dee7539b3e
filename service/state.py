"""The service's state: what the lifespan builds and the routes read (no fastapi here)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from service.batcher import Batcher
from service.engine import ScoringEngine
from service.metrics import Metrics
from service.runtimes.base import Runtime
from service.settings import Settings


@dataclass
class ServiceState:
    settings: Settings
    metrics: Metrics
    engine: ScoringEngine | None = None
    batcher: Batcher | None = None
    runtime: Runtime | None = None
    card: dict[str, Any] | None = None
    ready: bool = False
