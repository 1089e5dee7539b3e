"""Fixtures shared by the model tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.settings import Settings


@pytest.fixture(scope="module")
def serve() -> Iterator[Any]:
    """serve(model_dir, **settings) -> a started TestClient on that model (fp32); all closed with the module."""
    clients: list[TestClient] = []

    def make(model_dir: Path, **kw: Any) -> TestClient:
        c = TestClient(create_app(Settings(model=str(model_dir), dtype="float32", **kw)))
        c.__enter__()
        clients.append(c)
        return c

    yield make
    for c in clients:
        c.__exit__(None, None, None)
