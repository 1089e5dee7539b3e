from __future__ import annotations

import logging
from collections.abc import Callable

import pytest
from fastapi.testclient import TestClient

BODY = {"prompt": "secret prompt text", "responses": ["secret answer text"]}


def test_api_key_required_on_scoring_routes(make_client: Callable[..., TestClient]) -> None:
    c = make_client(api_key="s3cret")
    for route, body in (
        ("/v1/score", BODY),
        ("/v1/rank", BODY),
        ("/get_reward", {"query": ["x"]}),
        ("/v1/rerank", {"query": "q", "documents": ["d"]}),
    ):
        r = c.post(route, json=body)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error", route
        assert c.post(route, json=body, headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert c.post(route, json=body, headers={"Authorization": "Basic s3cret"}).status_code == 401
        assert c.post(route, json=body, headers={"Authorization": "Bearer s3cret"}).status_code == 200, route
    assert c.get("/v1/models").status_code == 401
    for route in ("/health", "/ready", "/metrics"):
        assert c.get(route).status_code == 200, route


def test_open_routes_can_be_closed_too(make_client: Callable[..., TestClient]) -> None:
    c = make_client(api_key="k", auth_open_routes=True)
    assert c.get("/metrics").status_code == 401
    assert c.get("/metrics", headers={"Authorization": "Bearer k"}).status_code == 200


def test_logs_hold_no_request_text_unless_asked(
    make_client: Callable[..., TestClient], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    c = make_client()
    assert c.post("/v1/score", json=BODY).status_code == 200
    assert "secret" not in caplog.text
    caplog.clear()
    c2 = make_client(log_texts=True)
    assert c2.post("/v1/score", json=BODY).status_code == 200
    assert "secret answer text" in caplog.text


def test_default_bind_is_loopback() -> None:
    from service.settings import Settings

    assert Settings().host == "127.0.0.1"
