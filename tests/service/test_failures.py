"""Every 5xx is counted (requests and failures by cause), start-up fails on a chat template that
cannot render, and the smaller edge cases of the issue (tiny temperatures, empty bodies)."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.runtimes.base import Runtime

BODY = {"prompt": "x", "responses": ["a", "b"]}


class Raising:
    def __init__(self, inner: Runtime) -> None:
        self.inner, self.name, self.dtype = inner, inner.name, inner.dtype

    def score(self, seqs: Sequence[Sequence[int]]) -> list[float]:
        raise RuntimeError("injected")

    def warmup(self) -> None:
        self.inner.warmup()


def test_a_runtime_that_raises_is_a_counted_500(make_client: Callable[..., TestClient]) -> None:
    c = make_client(runtime_wrapper=Raising)
    r = c.post("/v1/score", json=BODY)
    assert r.status_code == 500 and r.json()["error"]["type"] == "inference_error"
    m = c.get("/metrics").text
    assert 'rmserve_requests_total{route="/v1/score",status="500"} 1.0' in m
    assert 'rmserve_failures_total{cause="inference"} 1.0' in m


def test_an_exception_escaping_a_route_is_a_counted_500(make_client: Callable[..., TestClient]) -> None:
    c = make_client()

    async def boom() -> None:
        raise KeyError("escaped")

    c.app.add_api_route("/boom", boom)  # type: ignore[attr-defined]
    r = c.get("/boom")
    assert r.status_code == 500 and r.json()["error"]["code"] == "internal_error"
    assert "escaped" not in r.text  # the type only, never the details
    m = c.get("/metrics").text
    assert 'rmserve_requests_total{route="/boom",status="500"} 1.0' in m
    assert 'rmserve_failures_total{cause="internal"} 1.0' in m


def test_not_ready_503_is_counted(make_client: Callable[..., TestClient]) -> None:
    c = make_client()
    c.app.state.rm.ready = False  # type: ignore[attr-defined]
    assert c.post("/v1/score", json=BODY).status_code == 503
    assert 'rmserve_failures_total{cause="not_ready"} 1.0' in c.get("/metrics").text


def test_a_chat_template_that_cannot_render_fails_start_up(tmp_path: Path, rm_dir: Path) -> None:
    from transformers import AutoTokenizer

    from service.app import create_app
    from service.settings import Settings

    broken = tmp_path / "broken"
    shutil.copytree(rm_dir, broken)
    tok = AutoTokenizer.from_pretrained(broken)
    tok.chat_template = "{{ raise_exception('this template is broken') }}"
    tok.save_pretrained(broken)
    app = create_app(Settings(model=str(broken)))
    with pytest.raises(RuntimeError, match=r"chat template cannot render.*this template is broken"), TestClient(app):
        pass


def test_tiny_temperature_gives_probabilities(client: TestClient) -> None:
    r = client.post("/v1/rank", json={"prompt": "x", "responses": ["a", "bb", "ccc"], "temperature": 1e-320})
    assert r.status_code == 200, r.text
    probs = [x["probability"] for x in r.json()["ranking"]]
    assert None not in probs and sum(probs) == pytest.approx(1.0) and probs[0] > 0


def test_empty_body_names_the_body(client: TestClient) -> None:
    r = client.post("/v1/score", content=b"", headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["error"]["param"] == "body"


def test_items_prompt_errors_name_the_item(make_client: Callable[..., TestClient]) -> None:
    c = make_client(max_chars=50)
    r = c.post("/v1/score", json={"items": [{"prompt": "ok", "response": "a"}, {"prompt": "p" * 60, "response": "b"}]})
    assert r.status_code == 413 and r.json()["error"]["param"] == "items[1].prompt"
    r = c.post("/v1/score", json={"items": [{"prompt": [], "response": "a"}]})
    assert r.status_code == 422 and r.json()["error"]["param"] == "items[0].prompt"
