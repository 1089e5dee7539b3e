from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

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


def test_401_says_bearer(make_client: Callable[..., TestClient]) -> None:
    c = make_client(api_key="k")
    r = c.post("/v1/score", json=BODY)
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"


def test_open_routes_setting_also_guards_the_docs_and_playground(make_client: Callable[..., TestClient]) -> None:
    routes = ("/docs", "/openapi.json", "/redoc", "/playground", "/health", "/ready", "/metrics")
    closed = make_client(api_key="k", auth_open_routes=True)
    for route in routes:
        assert closed.get(route).status_code == 401, route
        assert closed.get(route, headers={"Authorization": "Bearer k"}).status_code == 200, route
    opened = make_client(api_key="k")
    for route in routes:
        assert opened.get(route).status_code == 200, route


@pytest.mark.parametrize("value", ["", "   ", "\t\n"])
def test_empty_api_key_refuses_to_start(value: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from pydantic import ValidationError

    from service.settings import Settings

    monkeypatch.setenv("RMSERVE_API_KEY", value)
    with pytest.raises(ValidationError, match="RMSERVE_API_KEY is set but empty"):
        Settings()


def test_api_key_from_a_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, rm_dir: Path) -> None:
    from pydantic import ValidationError

    from service.settings import Settings

    key_file = tmp_path / "api-key"
    key_file.write_text("  from-a-file\n")
    monkeypatch.setenv("RMSERVE_API_KEY_FILE", str(key_file))
    s = Settings(model=str(rm_dir))
    assert s.api_key is not None and s.api_key.get_secret_value() == "from-a-file"
    from service.app import create_app

    with TestClient(create_app(s)) as c:
        assert c.post("/v1/score", json=BODY).status_code == 401
        assert c.post("/v1/score", json=BODY, headers={"Authorization": "Bearer from-a-file"}).status_code == 200
    key_file.write_text(" \n")
    with pytest.raises(ValidationError, match="is empty"):
        Settings()
    monkeypatch.setenv("RMSERVE_API_KEY_FILE", str(tmp_path / "missing"))
    with pytest.raises(ValidationError, match="cannot read"):
        Settings()
    key_file.write_text("k")
    monkeypatch.setenv("RMSERVE_API_KEY_FILE", str(key_file))
    monkeypatch.setenv("RMSERVE_API_KEY", "k2")
    with pytest.raises(ValidationError, match="not both"):
        Settings()


def test_api_key_on_the_command_line_warns(caplog: pytest.LogCaptureFixture) -> None:
    from service.cli import build_parser
    from service.server import settings_from_args

    args = build_parser().parse_args(["serve", "--api-key", "visible"])
    with caplog.at_level(logging.WARNING):
        settings_from_args(args)
    assert "ps" in caplog.text and "--api-key-file" in caplog.text


def test_manifest_requires_the_secret() -> None:
    import yaml

    root = Path(__file__).resolve().parents[2]
    doc = yaml.safe_load((root / "deploy" / "kubernetes" / "deployment.yaml").read_text())
    pod = doc["spec"]["template"]["spec"]
    text = str(doc)
    assert "'optional': True" not in text
    env = {e["name"]: e for e in pod["containers"][0]["env"]}
    assert "RMSERVE_API_KEY" not in env and env["RMSERVE_API_KEY_FILE"]["value"].endswith("/api-key")
    secret = next(v["secret"] for v in pod["volumes"] if "secret" in v)
    assert secret["secretName"] == "rmserve" and secret["optional"] is False


def test_no_server_paths_in_models_or_metrics(client: TestClient, rm_dir: Path) -> None:
    card = client.get("/v1/models").text
    metrics = client.get("/metrics").text
    for text in (card, metrics):
        assert str(rm_dir) not in text and str(rm_dir.parent) not in text
        assert "/tmp" not in text and "/root" not in text and "/home" not in text
    info = next(line for line in metrics.splitlines() if line.startswith("rmserve_model_info"))
    assert 'backbone="' in info and "/" not in info.split('backbone="')[1].split('"')[0]


def test_without_paths() -> None:
    from service.runtimes import without_paths

    card = {"backbone": "/root/.cache/b/SmolLM2", "training": {"data": ["../d/x.jsonl.gz", "C:\\d\\y.json"], "n": 3}}
    assert without_paths(card) == {"backbone": "SmolLM2", "training": {"data": ["x.jsonl.gz", "y.json"], "n": 3}}
