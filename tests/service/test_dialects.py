"""Every client dialect over plain HTTP, with the field names of each protocol: vLLM score/rerank
(vllm/entrypoints/pooling/score/protocol.py), TEI (router/src/http/types.rs), Jina and Cohere rerank,
OpenRLHF's whole-batch /get_reward, the docs served offline."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
from fastapi.testclient import TestClient

PROMPT = "How do I bake bread?"
ANSWERS = ["Mix flour, water, yeast and salt, then knead and bake.", "No idea.", "Thanks for asking!"]


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


@pytest.fixture()
def ours(client: TestClient) -> list[float]:
    r = client.post("/v1/score", json={"prompt": PROMPT, "responses": ANSWERS})
    assert r.status_code == 200
    return list(r.json()["scores"])


@pytest.mark.parametrize("path", ["/score", "/v1/score"])
@pytest.mark.parametrize(("first", "second"), [("text_1", "text_2"), ("data_1", "data_2"), ("queries", "documents")])
def test_vllm_score_shape(client: TestClient, ours: list[float], path: str, first: str, second: str) -> None:
    r = client.post(path, json={"model": "BAAI/bge-reranker-v2-m3", first: PROMPT, second: ANSWERS})
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"id", "object", "created", "model", "data", "usage"}
    assert body["object"] == "list" and body["model"] == "model" and isinstance(body["created"], int)
    assert [d["index"] for d in body["data"]] == [0, 1, 2] and {d["object"] for d in body["data"]} == {"score"}
    assert [d["score"] for d in body["data"]] == pytest.approx(ours, abs=1e-5)
    u = body["usage"]
    assert u["prompt_tokens"] == u["total_tokens"] > 0 and u["completion_tokens"] == 0


def test_vllm_score_pairs_lists_and_activation(client: TestClient, ours: list[float]) -> None:
    # Lists of equal length pair up 1:1; a one-element first list goes with every second text.
    one_to_one = client.post("/v1/score", json={"text_1": [PROMPT] * 3, "text_2": ANSWERS}).json()["data"]
    broadcast = client.post("/score", json={"text_1": [PROMPT], "text_2": ANSWERS}).json()["data"]
    assert [d["score"] for d in one_to_one] == pytest.approx(ours, abs=1e-5)
    assert [d["score"] for d in broadcast] == pytest.approx(ours, abs=1e-5)
    act = client.post("/score", json={"text_1": PROMPT, "text_2": ANSWERS, "use_activation": True}).json()["data"]
    assert [d["score"] for d in act] == pytest.approx([sigmoid(s) for s in ours], abs=1e-6)
    bad = client.post("/v1/score", json={"text_1": ["a", "b"], "text_2": ["x", "y", "z"]})
    assert bad.status_code == 422 and "'text_1' has 2 texts and 'text_2' has 3" in bad.json()["error"]["message"]
    lone = client.post("/score", json={"text_1": "a"})
    assert lone.status_code == 422 and "exactly one pair" in lone.json()["error"]["message"]
    empty = client.post("/score", json={"text_1": "", "text_2": ["x"]}).json()["error"]
    assert empty["param"] == "text_1" and empty["code"] == "empty_text"


def test_own_score_shape_on_v1_score_accepts_model(client: TestClient, ours: list[float]) -> None:
    r = client.post("/v1/score", json={"model": "anything", "prompt": PROMPT, "responses": ANSWERS})
    assert r.status_code == 200 and r.json()["model"] == "model" and r.json()["scores"] == pytest.approx(ours)
    typo = client.post("/v1/score", json={"prompt": PROMPT, "responses": ANSWERS, "normalise": True})
    assert typo.status_code == 422 and typo.json()["error"]["param"] == "normalise"  # typos still caught
    rank = client.post("/v1/rank", json={"model": "anything", "prompt": PROMPT, "responses": ANSWERS})
    assert rank.status_code == 200 and rank.json()["model"] == "model"


@pytest.mark.parametrize("path", ["/rerank", "/v1/rerank", "/v2/rerank"])
def test_vllm_and_jina_rerank(client: TestClient, ours: list[float], path: str) -> None:
    """vLLM's RerankRequest (query, documents, top_n: 0 = all) and Jina's (documents, top_n, return_documents)."""
    r = client.post(path, json={"model": "jina-reranker-v2", "query": PROMPT, "documents": ANSWERS, "top_n": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    order = sorted(range(3), key=lambda i: -ours[i])
    assert body["model"] == "model" and body["id"].startswith("rerank-")
    assert [x["index"] for x in body["results"]] == order
    assert [x["relevance_score"] for x in body["results"]] == pytest.approx([ours[i] for i in order], abs=1e-5)
    assert [x["document"]["text"] for x in body["results"]] == [ANSWERS[i] for i in order]
    assert body["usage"]["prompt_tokens"] == body["usage"]["total_tokens"] > 0
    meta = body["meta"]
    assert meta["api_version"]["version"] == ("2" if path == "/v2/rerank" else "1")
    assert meta["billed_units"] == {"search_units": 1, "input_tokens": body["usage"]["total_tokens"]}
    top1 = client.post(path, json={"query": PROMPT, "documents": ANSWERS, "top_n": 1, "use_activation": True})
    assert [x["index"] for x in top1.json()["results"]] == order[:1]
    assert top1.json()["results"][0]["relevance_score"] == pytest.approx(sigmoid(ours[order[0]]), abs=1e-6)


def test_tei_rerank(client: TestClient, ours: list[float]) -> None:
    body = {"query": PROMPT, "texts": ANSWERS, "raw_scores": False, "return_text": True, "truncate": True}
    r = client.post("/rerank", json=body)
    assert r.status_code == 200, r.text
    order = sorted(range(3), key=lambda i: -ours[i])
    got = r.json()
    assert isinstance(got, list) and [x["index"] for x in got] == order
    assert [x["score"] for x in got] == pytest.approx([sigmoid(ours[i]) for i in order], abs=1e-6)
    assert [x["text"] for x in got] == [ANSWERS[i] for i in order]
    raw = client.post("/rerank", json={"query": PROMPT, "texts": ANSWERS, "raw_scores": True}).json()
    assert [x["score"] for x in raw] == pytest.approx([ours[i] for i in order], abs=1e-5)
    assert all(set(x) == {"index", "score", "truncated"} for x in raw)  # no text unless return_text
    bad = client.post("/rerank", json={"query": PROMPT, "texts": "not a list"})
    assert bad.status_code == 422 and bad.json()["error"]["param"] == "texts"


def test_tei_predict_and_info(client: TestClient, ours: list[float]) -> None:
    pair = client.post("/predict", json={"inputs": [PROMPT, ANSWERS[0]], "raw_scores": True}).json()
    assert pair == [{"score": pytest.approx(ours[0], abs=1e-5), "label": "reward", "truncated": False}]
    batch = client.post("/predict", json={"inputs": [[PROMPT, a] for a in ANSWERS]}).json()
    assert [b[0]["score"] for b in batch] == pytest.approx([sigmoid(s) for s in ours], abs=1e-6)
    single = client.post("/predict", json={"inputs": "already templated text"})
    assert single.status_code == 200 and len(single.json()) == 1
    bad = client.post("/predict", json={"inputs": [["a", "b", "c"]]})
    assert bad.status_code == 422 and "inputs[0] has 3 strings" in bad.json()["error"]["message"]
    info = client.get("/info").json()
    assert info["model_id"] == "model" and info["max_input_length"] == 128
    assert info["model_type"] == {"reranker": {"id2label": {"0": "reward"}, "label2id": {"reward": 0}}}


def test_get_reward_takes_a_whole_rollout_batch(make_client: Callable[..., TestClient]) -> None:
    """1,024 queries in one call (OpenRLHF <= 0.9 sends the rollout batch whole). The queue limit is
    200 sequences, so this passes only because the batch reaches the batcher in slices."""
    c = make_client(max_queued=200, max_reward_queries=2000)
    queries = [
        f"<|im_start|>user\nQuestion {i}?<|im_end|>\n<|im_start|>assistant\nAnswer {i % 7}.<|im_end|>"
        for i in range(1024)
    ]
    r = c.post("/get_reward", json={"query": queries, "prompts": [""] * 1024, "labels": [""] * 1024})
    assert r.status_code == 200, r.text
    rewards = r.json()["rewards"]
    assert len(rewards) == 1024 and all(math.isfinite(x) for x in rewards)
    # Each reward belongs to its own query (the slices are put back in order): check one per slice.
    for i in (0, 5, 49, 50, 511, 1023):
        single = c.post("/get_reward", json={"query": [queries[i]]}).json()["rewards"]
        assert single[0] == pytest.approx(rewards[i], abs=1e-5), i
    assert len(set(rewards)) > 100  # distinct queries, distinct rewards
    too_many = make_client(max_reward_queries=10).post("/get_reward", json={"query": queries[:11]})
    err = too_many.json()["error"]
    assert too_many.status_code == 413 and err["param"] == "query" and "RMSERVE_MAX_REWARD_QUERIES" in err["message"]


def test_get_reward_deadline_scales_with_the_batch() -> None:
    from service.engine import rollout_deadline as reward_deadline
    from service.engine import rollout_slice as reward_slice

    assert reward_deadline(1, 60.0, 64) == 60.0 and reward_deadline(64, 60.0, 64) == 60.0
    assert reward_deadline(65, 60.0, 64) == 120.0 and reward_deadline(1024, 60.0, 64) == 960.0
    assert reward_slice(64, 2048) == 256 and reward_slice(64, 200) == 50 and reward_slice(64, 2) == 1


def test_tool_role_needs_a_template_with_one(client: TestClient) -> None:
    """The tiny model's ChatML template has no tool role: a clear 422 naming the message."""
    msgs = [{"role": "user", "content": "Weather?"}, {"role": "tool", "content": "sunny", "tool_call_id": "1"}]
    r = client.post("/v1/score", json={"prompt": msgs, "responses": ["It is sunny."]})
    err = r.json()["error"]
    assert r.status_code == 422 and err["param"] == "prompt[1].role" and "no tool role" in err["message"]


def test_list_of_parts_and_missing_content(client: TestClient) -> None:
    parts = [{"type": "text", "text": "How do I "}, {"type": "text", "text": "bake bread?"}]
    a = client.post("/v1/score", json={"prompt": [{"role": "user", "content": parts}], "responses": ANSWERS[:1]})
    b = client.post("/v1/score", json={"prompt": [{"role": "user", "content": PROMPT}], "responses": ANSWERS[:1]})
    assert a.status_code == 200 and a.json()["scores"] == pytest.approx(b.json()["scores"], abs=1e-6)
    sys_none = [{"role": "system", "content": None}, {"role": "user", "content": PROMPT}]
    sys_empty = [{"role": "system", "content": ""}, {"role": "user", "content": PROMPT}]
    x = client.post("/v1/score", json={"prompt": sys_none, "responses": ANSWERS[:1]}).json()["scores"]
    y = client.post("/v1/score", json={"prompt": sys_empty, "responses": ANSWERS[:1]}).json()["scores"]
    assert x == pytest.approx(y, abs=1e-6)


def test_docs_and_redoc_work_offline(client: TestClient) -> None:
    pytest.importorskip("fastapi_offline", reason="fastapi-offline (a dependency) is not installed here")
    docs = client.get("/docs").text
    redoc = client.get("/redoc").text
    assert "cdn.jsdelivr.net" not in docs and "/static/docs/swagger-ui-bundle.js" in docs
    assert "cdn.jsdelivr.net" not in redoc and "fonts.googleapis" not in redoc
    assert "/static/docs/redoc.standalone.js" in redoc
    for name, kind in [
        ("swagger-ui-bundle.js", "javascript"),
        ("swagger-ui.css", "css"),
        ("redoc.standalone.js", "javascript"),
    ]:
        r = client.get(f"/static/docs/{name}")
        assert r.status_code == 200 and kind in r.headers["content-type"] and len(r.content) > 10_000
    assert client.get("/static/docs/../../settings.py").status_code == 404
    assert client.get("/static/docs/secret.txt").status_code == 404
    assert "/v2/rerank" in client.get("/openapi.json").json()["paths"]
