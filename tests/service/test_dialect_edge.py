"""What the edge refuses before the body (415 for a compressed body or a non-UTF-8 charset, 413 from
Content-Length, all counted), the key carried in the path for clients that send no header (OpenRLHF),
kept out of logs and metric labels, and GET /."""

from __future__ import annotations

import gzip
import json
import logging
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from service.settings import Settings
from tests.service.conftest import free_port

BODY = {"prompt": "How do I bake bread?", "responses": ["Knead and bake.", "No idea."]}
KEY = "k3y-5ecret-0penrlhf"


def failures(c: TestClient, cause: str) -> float:
    m = re.search(rf'rmserve_failures_total{{cause="{cause}"}} ([0-9.]+)', c.get("/metrics").text)
    return float(m.group(1)) if m else 0.0


def test_compressed_body_and_other_charsets_are_415_and_counted(client: TestClient) -> None:
    raw = json.dumps(BODY).encode()
    r = client.post(
        "/v1/score",
        content=gzip.compress(raw),
        headers={"content-type": "application/json", "content-encoding": "gzip"},
    )
    err = r.json()["error"]
    assert r.status_code == 415 and err["code"] == "unsupported_content_encoding" and err["param"] == "Content-Encoding"
    r = client.post(
        "/v1/score", content=raw.decode().encode("utf-16"), headers={"content-type": "application/json; charset=utf-16"}
    )
    assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_charset", r.text
    r = client.post("/v1/score", content=raw, headers={"content-type": "application/json; charset=latin-1"})
    assert r.status_code == 415 and r.json()["error"]["param"] == "Content-Type"
    for ok in ("application/json; charset=utf-8", 'application/json; charset="UTF-8"', "application/json"):
        r = client.post("/v1/score", content=raw, headers={"content-type": ok, "content-encoding": "identity"})
        assert r.status_code == 200, (ok, r.text)
    assert failures(client, "unsupported_content_encoding") == 1.0
    assert failures(client, "unsupported_charset") == 2.0
    counted = re.findall(r'rmserve_requests_total{route="[^"]*",status="415"} ([0-9.]+)', client.get("/metrics").text)
    assert sum(float(x) for x in counted) == 3.0


def test_413_from_content_length_is_counted(make_client: Callable[..., TestClient]) -> None:
    c = make_client(max_body_bytes=2048)
    r = c.post("/v1/score", content=b"x" * 4096, headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
    assert failures(c, "body_too_large") == 1.0


def test_get_root_points_to_docs_and_playground(make_client: Callable[..., TestClient]) -> None:
    c = make_client(api_key=KEY)
    r = c.get("/")
    assert r.status_code == 200 and r.json()["docs"] == "/docs" and r.json()["playground"] == "/playground"
    assert c.get(r.json()["playground"]).status_code == 200


def test_key_in_the_path_for_openrlhf(make_client: Callable[..., TestClient]) -> None:
    c = make_client(api_key=KEY)
    q = {"query": ["<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>"]}
    assert c.post("/get_reward", json=q).status_code == 401  # OpenRLHF sends no Authorization header
    ok = c.post(f"/k/{KEY}/get_reward", json=q)
    assert ok.status_code == 200 and len(ok.json()["rewards"]) == 1
    with_header = c.post("/get_reward", json=q, headers={"Authorization": f"Bearer {KEY}"})
    assert with_header.json()["rewards"] == ok.json()["rewards"]
    assert c.post(f"/k/{KEY}x/get_reward", json=q).status_code == 401
    assert c.post("/k/wrong/get_reward", json=q).status_code == 401
    assert c.post(f"/k/{KEY}/v1/score", json=BODY).status_code == 200  # any route
    assert c.post(f"/k/{KEY}/nowhere", json=BODY).status_code == 404
    metrics = c.get("/metrics").text
    assert KEY not in metrics and "/k/" not in metrics and "wrong" not in metrics
    assert 'rmserve_requests_total{route="/get_reward",status="200"} 2.0' in metrics


def test_path_key_stays_out_of_logs_and_the_access_log(rm_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    import uvicorn

    from service.app import create_app
    from service.server import uvicorn_config

    caplog.set_level(logging.DEBUG)
    settings = Settings(model=str(rm_dir), api_key=KEY, host="127.0.0.1", port=free_port())
    app = create_app(settings)
    cfg = uvicorn_config(app, settings, access_log=True, log_config=None, log_level="debug")
    server = uvicorn.Server(cfg)
    th = threading.Thread(target=server.run, daemon=True)
    th.start()
    deadline = time.time() + 60
    while not server.started:
        assert time.time() < deadline and th.is_alive(), "server did not start"
        time.sleep(0.05)
    url = f"http://127.0.0.1:{settings.port}"
    try:
        q = {"query": ["<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>"]}
        with httpx.Client(base_url=url, timeout=30) as h:
            assert h.post(f"/k/{KEY}/get_reward", json=q).status_code == 200
            assert h.post("/k/not-the-key/get_reward", json=q).status_code == 401
            assert h.get(f"/k/{KEY}/nowhere").status_code == 404
            assert (
                h.post(
                    f"/k/{KEY}/get_reward?x=1", content=b"{", headers={"content-type": "application/json"}
                ).status_code
                == 400
            )
            metrics = h.get("/metrics").text
    finally:
        server.should_exit = True
        th.join(30)
    access = [r.getMessage() for r in caplog.records if r.name == "uvicorn.access"]
    assert any('"POST /get_reward HTTP/1.1" 200' in line for line in access), access  # the access log was on
    server_lines = "\n".join(r.getMessage() for r in caplog.records if not r.name.startswith(("httpx", "httpcore")))
    assert server_lines and KEY not in server_lines and "not-the-key" not in server_lines and "/k/" not in server_lines
    assert KEY not in metrics and "/k/" not in metrics


def test_probes_answer_whatever_their_content_headers(client: TestClient) -> None:
    odd = {"content-type": "text/plain; charset=latin-1", "content-encoding": "br"}
    for route in ("/health", "/ready", "/metrics"):
        assert client.get(route, headers=odd).status_code == 200, route


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/rerank", {"query": "q", "texts": ["a", "b"], "truncate_prompt_tokens": 3}, "truncate_prompt_tokens"),
        ("/rerank", {"query": "q", "texts": ["a", "b"], "max_tokens_per_doc": 1}, "max_tokens_per_doc"),
        ("/v1/rerank", {"query": "q", "documents": ["a"], "return_text": True}, "return_text"),
        ("/v2/rerank", {"query": "q", "documents": ["a"], "mm_processor_kwargs": {}}, "mm_processor_kwargs"),
        ("/rerank", {"query": "q", "documents": ["a"], "raw_scores": True}, "raw_scores"),
        ("/v1/score", {"text_1": "q", "text_2": ["a"], "return_text": True}, "return_text"),
        ("/predict", {"inputs": ["q", "a"], "truncate_prompt_tokens": 3}, "truncate_prompt_tokens"),
    ],
)
def test_dialect_fields_not_honoured_are_refused_naming_them(
    client: TestClient, path: str, body: dict[str, object], field: str
) -> None:
    """An option a route does not honour is a 422 that names it and says it is not supported (before: TEI's
    /rerank with texts took truncate_prompt_tokens and max_tokens_per_doc and scored the full input, and
    any unknown field on the rerank routes was answered 200)."""
    r = client.post(path, json=body)
    err = r.json()["error"]
    assert r.status_code == 422 and err["param"] == field and err["code"] == "not_supported", err
    assert "not supported" in err["message"] and field in err["message"]


def test_tei_return_text_and_no_op_fields_are_accepted(client: TestClient) -> None:
    r = client.post("/rerank", json={"query": "q", "texts": ["a", "bb"], "return_text": True, "raw_scores": True})
    assert r.status_code == 200 and sorted(x["text"] for x in r.json()) == ["a", "bb"]
    plain = client.post("/v1/rerank", json={"query": "q", "documents": ["a"]}).json()["results"][0]
    with_noop = client.post("/v1/rerank", json={"query": "q", "documents": ["a"], "priority": 1, "user": "u"})
    assert with_noop.status_code == 200
    assert with_noop.json()["results"][0]["relevance_score"] == plain["relevance_score"]
