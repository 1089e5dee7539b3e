"""Started service clients for tests: one factory behind the model and service fixtures."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient

from service.app import create_app
from service.settings import Settings


@contextmanager
def started_clients() -> Iterator[Callable[..., TestClient]]:
    """Yield start(model_dir, runtime_wrapper=None, **settings) -> a TestClient with its lifespan entered;
    every client started is closed on exit.

    The dtype is float32 unless the call asks for another: tests compare scores with float32
    references, and RMSERVE_DTYPE in the environment must not change that (the default dtype has its
    own tests)."""
    clients: list[TestClient] = []

    def start(model_dir: Path, runtime_wrapper: Any = None, **overrides: Any) -> TestClient:
        overrides.setdefault("dtype", "float32")
        c = TestClient(create_app(Settings(model=str(model_dir), **overrides), runtime_wrapper=runtime_wrapper))
        c.__enter__()
        clients.append(c)
        return c

    try:
        yield start
    finally:
        for c in clients:
            c.__exit__(None, None, None)
