from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from models.reward_model import RewardModel

PROMPT = "How do I bake bread?"
ANSWERS = ["Mix flour, water, yeast and salt, then knead and bake.", "No idea.", "Thanks for asking!"]


def reference_scores(rm_dir: Path, prompt: object, responses: list[str]) -> list[float]:
    """What the trainer's evaluation computes: same formatter, model scored alone per sequence."""
    model, tok = RewardModel.load(rm_dir)
    f = model.formatter(tok)
    return [model.score_ids([f.encode(prompt, r).ids], tok.pad_token_id)[0] for r in responses]  # type: ignore[arg-type]


def test_score_matches_trainer_scores(client: TestClient, rm_dir: Path) -> None:
    r = client.post("/v1/score", json={"prompt": PROMPT, "responses": ANSWERS})
    assert r.status_code == 200
    body = r.json()
    assert body["model"] == "model" and body["truncated"] == [False] * 3 and body["usage"]["tokens"] > 0
    assert body["scores"] == pytest.approx(reference_scores(rm_dir, PROMPT, ANSWERS), abs=1e-5)


def test_score_items_and_normalize(client: TestClient, rm_dir: Path) -> None:
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    items = [{"prompt": PROMPT, "response": ANSWERS[0]}, {"prompt": msgs, "response": "Hello"}]
    raw = client.post("/v1/score", json={"items": items}).json()["scores"]
    ref = reference_scores(rm_dir, PROMPT, [ANSWERS[0]]) + reference_scores(rm_dir, msgs, ["Hello"])
    assert raw == pytest.approx(ref, abs=1e-5)
    norm = client.post("/v1/score", json={"items": items, "normalize": True}).json()["scores"]
    assert norm == pytest.approx([(x - 0.5) / 2.0 for x in raw], abs=1e-6)  # rm_dir stores mean 0.5, std 2


def test_rank_probabilities_and_pairwise(client: TestClient) -> None:
    scores = client.post("/v1/score", json={"prompt": PROMPT, "responses": ANSWERS}).json()["scores"]
    r = client.post(
        "/v1/rank",
        json={
            "prompt": PROMPT,
            "responses": ANSWERS,
            "temperature": 2.0,
            "return_pairwise": True,
            "top_n": 2,
        },
    )
    assert r.status_code == 200
    body = r.json()
    order = sorted(range(3), key=lambda i: -scores[i])
    assert [x["index"] for x in body["ranking"]] == order[:2]
    import math

    z = [math.exp(s / 2.0) for s in scores]
    assert body["ranking"][0]["probability"] == pytest.approx(z[order[0]] / sum(z), rel=1e-6)
    p = body["pairwise"]
    assert p[0][1] == pytest.approx(1 / (1 + math.exp(-(scores[0] - scores[1]))), rel=1e-6)
    assert p[1][0] == pytest.approx(1 - p[0][1], abs=1e-9) and p[2][2] == 0.5
    assert "pairwise" not in client.post("/v1/rank", json={"prompt": PROMPT, "responses": ANSWERS}).json()


def test_rerank_cohere_shape(client: TestClient) -> None:
    scores = client.post("/v1/score", json={"prompt": PROMPT, "responses": ANSWERS}).json()["scores"]
    r = client.post(
        "/v1/rerank",
        json={
            "model": "x",
            "query": PROMPT,
            "documents": [ANSWERS[0], {"text": ANSWERS[1]}, ANSWERS[2]],
            "top_n": 2,
        },
    )
    assert r.status_code == 200
    body = r.json()
    assert body["id"].startswith("rerank-") and body["model"] == "model" and body["usage"]["total_tokens"] > 0
    best = max(range(3), key=lambda i: scores[i])
    assert body["results"][0]["index"] == best and body["results"][0]["document"]["text"] == ANSWERS[best]
    assert body["results"][0]["relevance_score"] == pytest.approx(scores[best], abs=1e-6)
    assert len(body["results"]) == 2
    nodoc = client.post("/v1/rerank", json={"query": PROMPT, "documents": ANSWERS, "return_documents": False})
    assert "document" not in nodoc.json()["results"][0]


def test_openrlhf_get_reward(client: TestClient, rm_dir: Path) -> None:
    model, tok = RewardModel.load(rm_dir)
    f = model.formatter(tok)
    full = f.encode(PROMPT, ANSWERS[0])
    text = tok.decode(full.ids)  # already templated text, as OpenRLHF sends it
    r = client.post("/get_reward", json={"query": [text], "prompts": [PROMPT], "labels": [""]})
    assert r.status_code == 200
    body = r.json()
    ref = model.score_ids([full.ids], tok.pad_token_id)[0]
    assert body["rewards"] == pytest.approx([ref], abs=1e-5) and body["scores"] == body["rewards"]
    assert body["truncated"] == [False] and body["extra_logs"] == {"truncated": [0.0]}
    empty = client.post("/get_reward", json={"query": [], "prompts": [], "labels": []})
    assert empty.status_code == 200
    assert empty.json() == {"rewards": [], "scores": [], "truncated": [], "extra_logs": {}}


def test_models_health_ready_metrics(client: TestClient) -> None:
    m = client.get("/v1/models").json()["data"][0]
    assert m["id"] == "model" and m["runtime"] == "torch" and m["dtype"] in ("float32", "bfloat16")
    assert m["max_length"] == 128 and m["normalization"]["std"] == 2.0 and m["parameters"] > 0
    assert client.get("/health").json() == {"status": "ok"}
    assert client.get("/ready").status_code == 200
    client.post("/v1/score", json={"prompt": PROMPT, "responses": ANSWERS})
    text = client.get("/metrics").text
    for name in (
        "rmserve_requests_total",
        "rmserve_request_seconds_bucket",
        "rmserve_queue_seconds_bucket",
        "rmserve_inference_seconds_bucket",
        "rmserve_batch_size_bucket",
        "rmserve_batch_tokens_bucket",
        "rmserve_padding_fraction_bucket",
        "rmserve_queue_depth",
        "rmserve_tokens_scored_total",
        "rmserve_reward_bucket",
        "rmserve_model_info",
    ):
        assert name in text, name
    assert 'rmserve_requests_total{route="/v1/score",status="200"} 1.0' in text
    assert client.get("/openapi.json").json()["paths"]["/v1/score"]


ERROR_CASES = [
    ({"prompt": PROMPT}, 422, "responses"),
    ({"prompt": PROMPT, "responses": ["a", 3]}, 422, "responses[1]"),
    ({"prompt": PROMPT, "responses": []}, 422, "responses"),
    ({"prompt": " ", "responses": ["a"]}, 422, "prompt"),
    ({"prompt": "", "responses": ["a"]}, 422, "prompt"),
    ({"prompt": [], "responses": ["a"]}, 422, "prompt"),
    ({"prompt": [{"role": "robot", "content": "x"}], "responses": ["a"]}, 422, "prompt[0].role"),
    ({"prompt": [{"role": "user", "content": 5}], "responses": ["a"]}, 422, "prompt[0].content"),
    (
        {"prompt": [{"role": "user", "content": [{"type": "image_url"}]}], "responses": ["a"]},
        422,
        "prompt[0].content[0].type",
    ),
    ({"prompt": PROMPT, "responses": ["a"], "items": []}, 422, "items"),
    ({"prompt": PROMPT, "responses": ["a"], "normalize": "maybe"}, 422, "normalize"),
    ({"prompt": PROMPT, "responses": ["a"], "extra": 1}, 422, "extra"),
    ({"items": [{"prompt": PROMPT}]}, 422, "items[0].response"),
    ({"prompt": PROMPT, "responses": ["x" * 300]}, 413, "responses[0]"),
    ({"prompt": PROMPT, "responses": ["a"] * 9}, 413, "responses"),
]


@pytest.mark.parametrize(("payload", "status", "param"), ERROR_CASES)
def test_score_errors_name_the_field(
    make_client: Callable[..., TestClient], payload: dict, status: int, param: str | None
) -> None:
    c = make_client(max_chars=200, max_responses=8)
    r = c.post("/v1/score", json=payload)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["param"] == param


@pytest.mark.parametrize(
    ("route", "body", "status", "param"),
    [
        ("/v1/rank", b'{"prompt": "x", "responses": ["a"], "temperature": NaN}', 422, "temperature"),
        ("/v1/rank", b'{"prompt": "x", "responses": ["a"], "temperature": Infinity}', 422, "temperature"),
        ("/v1/rank", b'{"prompt": "x", "responses": ["a"], "temperature": 0}', 422, "temperature"),
        ("/v1/rank", b'{"prompt": "x", "responses": ["a"], "top_n": -1}', 422, "top_n"),
        ("/v1/score", b'{"prompt": "x", "responses": ["a"]', 400, None),
        ("/v1/score", b'{"prompt": "\xff\xfe", "responses": ["a"]}', 400, None),
        ("/v1/score", b"[1, 2]", 422, None),
        ("/v1/rerank", b'{"query": "x", "documents": [{"txt": "a"}]}', 422, "documents[0].text"),
        ("/get_reward", b'{"query": "not a list"}', 422, "query"),
        ("/get_reward", b'{"query": [""]}', 422, "query[0]"),
        ("/v1/score", b'{"prompt": ' + b"[" * 5000 + b"]" * 5000 + b', "responses": ["a"]}', 400, None),
    ],
)
def test_raw_bad_bodies(client: TestClient, route: str, body: bytes, status: int, param: str | None) -> None:
    r = client.post(route, content=body, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and (param is None or err["param"] == param), err


def test_oversized_body_is_413(make_client: Callable[..., TestClient]) -> None:
    c = make_client(max_body_bytes=2048)
    r = c.post("/v1/score", json={"prompt": "x", "responses": ["y" * 4000]})
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"


def test_normalize_without_stats_is_a_clear_error(tmp_path: Path, llama_dir: Path) -> None:
    from service.app import create_app
    from service.settings import Settings

    model, tok = RewardModel.from_backbone(llama_dir, max_length=64)
    d = model.save(tmp_path / "nonorm", tok)
    with TestClient(create_app(Settings(model=str(d)))) as c:
        r = c.post("/v1/score", json={"prompt": "x", "responses": ["a"], "normalize": True})
        assert r.status_code == 422 and r.json()["error"]["param"] == "normalize"


def test_truncated_flag(make_client: Callable[..., TestClient]) -> None:
    c = make_client()
    long = "The quick brown fox jumps over the lazy dog. " * 30
    body = c.post("/v1/score", json={"prompt": long, "responses": ["short", "ok"]}).json()
    assert body["truncated"] == [True, True] and body["usage"]["tokens"] <= 2 * 128
    json.dumps(body)
