from __future__ import annotations

import functools
import gc
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.settings import Settings
from tests.clients import started_clients


@pytest.fixture()
def make_client(rm_dir: Path) -> Iterator[Callable[..., TestClient]]:
    """Build a TestClient (lifespan entered) over the tiny model with setting overrides (float32 unless
    asked: see `tests.clients.started_clients`)."""
    with started_clients() as start:
        yield functools.partial(start, rm_dir)


@pytest.fixture()
def client(make_client: Callable[..., TestClient]) -> TestClient:
    return make_client()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def live_server(settings: Settings, runtime_wrapper: Any = None) -> Iterator[str]:
    """A real uvicorn server on loopback in a thread, with the service's own uvicorn options (the bounded
    edge); yields its base URL."""
    import uvicorn

    from service.server import uvicorn_config

    port = free_port()
    settings.port, settings.host = port, "127.0.0.1"
    app = create_app(settings, runtime_wrapper=runtime_wrapper)
    server = uvicorn.Server(uvicorn_config(app, settings, log_level="warning"))
    th = threading.Thread(target=server.run, daemon=True)
    th.start()
    deadline = time.time() + 60
    while not server.started:
        if time.time() > deadline or not th.is_alive():
            raise RuntimeError("server did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        th.join(30)


@contextmanager
def frozen_heap() -> Iterator[None]:
    """The test process's heap (the whole suite's objects, torch's) left out of garbage collection while
    it lasts: the server runs in a thread of this process, and a full collection of that heap (0.1-0.9 s,
    measured under pytest) stalls its event loop, which a server process of its own does not see."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
