"""Fixtures shared by the model tests."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from fastapi.testclient import TestClient

from tests.clients import started_clients


@pytest.fixture(scope="module")
def serve() -> Iterator[Callable[..., TestClient]]:
    """serve(model_dir, **settings) -> a started TestClient on that model (fp32); all closed with the module."""
    with started_clients() as start:
        yield start
