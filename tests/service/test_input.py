"""Input the service refuses before it does work, and what a typed API accepts: the message limit
(RMSERVE_MAX_MESSAGES), strict numbers and booleans, message contents, and `param` on every 422."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from service.settings import Settings
from tests.service.conftest import live_server

TURN = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nyo<|im_end|>\n"


def msgs(n: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": "w"} for _ in range(n)]


def test_message_limit_refuses_every_route_with_413_naming_the_prompt(make_client: Callable[..., TestClient]) -> None:
    c = make_client(max_messages=4)
    ok = c.post("/v1/score", json={"prompt": msgs(4), "responses": ["a"]})
    assert ok.status_code == 200, ok.text
    cases = [
        ("/v1/score", {"prompt": msgs(5), "responses": ["a"]}, "prompt"),
        (
            "/v1/score",
            {"items": [{"prompt": "x", "response": "a"}, {"prompt": msgs(5), "response": "b"}]},
            "items[1].prompt",
        ),
        ("/v1/rank", {"prompt": msgs(5), "responses": ["a", "b"]}, "prompt"),
        # templated text parsed into messages: counted by its turns
        ("/get_reward", {"query": ["ok", TURN * 5]}, "query[1]"),
        ("/v1/score", {"prompt": TURN * 5 + "<|im_start|>user\nq<|im_end|>\n", "responses": ["a"]}, "prompt"),
        ("/v1/rerank", {"query": TURN * 5, "documents": ["a"]}, "query"),
        ("/score", {"text_1": TURN * 5, "text_2": ["a"]}, "text_1"),
        ("/predict", {"inputs": TURN * 5}, "inputs"),
    ]
    for route, body, param in cases:
        r = c.post(route, json=body)
        err = r.json()["error"]
        assert r.status_code == 413 and err["code"] == "too_many_messages", (route, r.text)
        assert err["param"] == param and "RMSERVE_MAX_MESSAGES" in err["message"], (route, err)


def post_raw(url: str, path: str, body: bytes) -> tuple[int, dict]:
    """POST over a plain socket (sendall releases the GIL: the in-process server is not slowed by the
    client's own HTTP machinery); returns (status, JSON body)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as s:
        head = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        s.sendall(head.encode() + b"Connection: close\r\n\r\n" + body)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    status = int(data.split(b" ", 2)[1])
    return status, json.loads(data.split(b"\r\n\r\n", 1)[1])


def test_100k_messages_are_refused_fast_and_health_stays_quick(rm_dir: Path) -> None:
    """The issue's case: 100,000 one-word messages (about 3 MB, under the body limit) cost 7-9 s of CPU
    and stalled /health for 1.05 s. Now: a 413 before the body is parsed, /health under 100 ms."""
    body = json.dumps(
        {"prompt": [{"role": "user", "content": f"w{i % 10}"} for i in range(100_000)], "responses": ["a"]}
    )
    assert 3_000_000 < len(body) < 8 * 1024 * 1024
    with live_server(Settings(model=str(rm_dir), dtype="float32")) as url:
        times: list[float] = []
        done = threading.Event()

        def probe() -> None:
            with httpx.Client(base_url=url, timeout=5) as h:
                h.get("/health")  # the connection is made before the timing starts
                while not done.is_set():
                    t0 = time.perf_counter()
                    assert h.get("/health").status_code == 200
                    times.append(time.perf_counter() - t0)
                    time.sleep(0.005)

        th = threading.Thread(target=probe)
        th.start()
        try:
            posts, start = 0, time.perf_counter()
            while posts < 3 or time.perf_counter() - start < 1.5:  # probes run throughout
                posts += 1
                t0 = time.perf_counter()
                status, answer = post_raw(url, "/v1/score", body.encode())
                took = time.perf_counter() - t0
                assert status == 413 and answer["error"]["param"] == "prompt", answer
                assert (
                    answer["error"]["code"] == "too_many_messages" and "100,000 messages" in answer["error"]["message"]
                )
                assert took < 1.0, took
        finally:
            done.set()
            th.join()
        assert len(times) >= 10 and max(times) < 0.1, sorted(times)[-5:]


@pytest.mark.parametrize(
    ("route", "body", "param"),
    [
        ("/v1/score", {"prompt": "x", "responses": ["a"], "normalize": "yes"}, "normalize"),
        ("/v1/score", {"prompt": "x", "responses": ["a"], "normalize": 1}, "normalize"),
        ("/v1/rank", {"prompt": "x", "responses": ["a", "b"], "top_n": "2"}, "top_n"),
        ("/v1/rank", {"prompt": "x", "responses": ["a", "b"], "top_n": True}, "top_n"),
        ("/v1/rank", {"prompt": "x", "responses": ["a", "b"], "temperature": "1"}, "temperature"),
        ("/v1/rank", {"prompt": "x", "responses": ["a", "b"], "return_pairwise": "true"}, "return_pairwise"),
        ("/v1/rerank", {"query": "q", "documents": ["a"], "top_n": "1"}, "top_n"),
        ("/v1/rerank", {"query": "q", "documents": ["a"], "return_documents": 0}, "return_documents"),
        ("/score", {"text_1": "q", "text_2": ["a"], "use_activation": "yes"}, "use_activation"),
        ("/rerank", {"query": "q", "texts": ["a"], "raw_scores": "false"}, "raw_scores"),
        ("/predict", {"inputs": "a", "truncate": 1}, "truncate"),
    ],
)
def test_numbers_and_booleans_are_strict(client: TestClient, route: str, body: dict, param: str) -> None:
    r = client.post(route, json=body)
    assert r.status_code == 422 and r.json()["error"]["param"] == param, r.text


def test_ints_stay_valid_for_floats_and_strict_values_pass(client: TestClient) -> None:
    a = client.post("/v1/rank", json={"prompt": "x", "responses": ["a", "b"], "temperature": 1, "top_n": 1})
    b = client.post("/v1/rank", json={"prompt": "x", "responses": ["a", "b"], "temperature": 1.0, "top_n": 1})
    assert a.status_code == b.status_code == 200 and a.json()["ranking"] == b.json()["ranking"]


def test_message_content_is_required_and_tool_calls_stay_valid(client: TestClient) -> None:
    r = client.post(
        "/v1/score", json={"items": [{"prompt": [{"role": "user", "content": "q"}, {"role": "user"}], "response": "a"}]}
    )
    assert r.status_code == 422 and r.json()["error"]["param"] == "items[0].prompt[1].content", r.text
    r = client.post("/v1/score", json={"prompt": [{"role": "user", "content": None}], "responses": ["a"]})
    assert r.status_code == 422 and r.json()["error"]["param"] == "prompt[0].content", r.text
    call = {"type": "function", "function": {"name": "weather", "arguments": '{"city": "Paris"}'}}
    convo = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "user", "content": "And?"},
    ]
    rendered = '<tool_call>\n{"name": "weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    same = [convo[0], {"role": "assistant", "content": rendered}, convo[2]]
    a = client.post("/v1/score", json={"prompt": convo, "responses": ["Sunny."]})
    b = client.post("/v1/score", json={"prompt": same, "responses": ["Sunny."]})
    assert a.status_code == 200, a.text
    assert a.json()["scores"] == b.json()["scores"]  # scored as the TRL adapter renders tool calls
    left_out = [convo[0], {"role": "assistant", "tool_calls": [call]}, convo[2]]
    assert (
        client.post("/v1/score", json={"prompt": left_out, "responses": ["Sunny."]}).json()["scores"]
        == a.json()["scores"]
    )
    user_calls = [{"role": "user", "content": "x", "tool_calls": [call]}]
    r = client.post("/v1/score", json={"prompt": user_calls, "responses": ["a"]})
    assert r.status_code == 422 and r.json()["error"]["param"] == "prompt[0].tool_calls"


@pytest.mark.parametrize(
    "message", [{"role": "assistant"}, {"role": "assistant", "tool_calls": []}], ids=["bare", "no-calls"]
)
def test_assistant_message_without_content_or_calls_is_422(client: TestClient, message: dict[str, object]) -> None:
    """`content` may be left out only with at least one tool call (before: scored as empty text, 200)."""
    prompt = [{"role": "user", "content": "q"}, message, {"role": "user", "content": "and?"}]
    r = client.post("/v1/score", json={"prompt": prompt, "responses": ["a"]})
    err = r.json()["error"]
    assert r.status_code == 422 and err["param"] == "prompt[1].content", r.text


BAD_BODIES = [
    ("/v1/score", {"prompt": "x"}, "responses"),
    ("/v1/score", {"responses": ["a"]}, "prompt"),
    ("/v1/score", {"prompt": "x", "responses": ["a"], "items": []}, "items"),
    ("/v1/score", {"items": [{"prompt": "x"}]}, "items[0].response"),
    ("/v1/score", {"prompt": [{"role": "robot", "content": "x"}], "responses": ["a"]}, "prompt[0].role"),
    ("/v1/score", [1, 2], "body"),
    ("/v1/score", {"text_1": "a"}, "text_2"),
    ("/score", {"text_1": ["a", "b"], "text_2": ["x", "y", "z"]}, "text_1"),
    ("/score", {"text_1": [], "text_2": ["x"]}, "text_1"),
    ("/score", {"queries": "q"}, "documents"),
    ("/score", {"text_1": "q", "text_2": "a", "max_tokens_per_query": 5}, "max_tokens_per_query"),
    ("/v1/rank", {"prompt": "x"}, "responses"),
    ("/v1/rank", {"prompt": "x", "responses": ["a"], "top_n": -1}, "top_n"),
    ("/v1/rerank", {"query": "q", "documents": [{"txt": "a"}]}, "documents[0].text"),
    ("/v1/rerank", {"query": "q", "documents": [{"a": 1}], "rank_fields": ["a", "b"]}, "documents[0].b"),
    ("/v1/rerank", {"query": "q", "documents": ["a"], "max_chunks_per_doc": 10}, "max_chunks_per_doc"),
    ("/v2/rerank", {"query": "q", "documents": ["a"], "max_tokens_per_doc": -1}, "max_tokens_per_doc"),
    ("/v2/rerank", {"query": "q", "documents": ["a"], "truncate_prompt_tokens": 100_000}, "truncate_prompt_tokens"),
    ("/v2/rerank", {"query": "q", "documents": ["a"], "truncate_prompt_tokens": 0}, "truncate_prompt_tokens"),
    ("/rerank", {"query": "q"}, "documents"),
    ("/rerank", {"query": "q", "texts": "a"}, "texts"),
    ("/predict", {"inputs": [["a", "b", "c"]]}, "inputs[0]"),
    ("/predict", {}, "inputs"),
    ("/get_reward", {"query": "x"}, "query"),
    ("/get_reward", {"query": ["a", "b"], "prompts": ["a"]}, "prompts"),
    ("/get_reward", {}, "query"),
]


@pytest.mark.parametrize(("route", "body", "param"), BAD_BODIES)
def test_every_422_names_its_field(client: TestClient, route: str, body: object, param: str) -> None:
    r = client.post(route, json=body)
    err = r.json()["error"]
    assert r.status_code == 422, (route, body, r.text)
    assert err["param"] == param, (route, body, err)
    assert err["message"]


LONG = "The quick brown fox jumps over the lazy dog. " * 3
QUERY = "How do I bake bread?"


def test_vllm_truncate_prompt_tokens_keeps_the_last_tokens(client: TestClient) -> None:
    """As vLLM's TokenizeParams._token_truncation (vllm/renderers/params.py): the last N tokens of the
    sequence (the first N with truncation_side 'right'), scored and reported as truncated."""
    state = client.app.state.rm  # type: ignore[attr-defined]
    enc = state.engine.formatter.encode(QUERY, LONG, param="text_2")
    n = 12
    assert len(enc.ids) > n and not enc.truncated
    want_left, want_right = state.runtime.score([enc.ids[-n:], enc.ids[:n]])
    full = client.post("/score", json={"text_1": QUERY, "text_2": LONG}).json()
    assert full["data"][0]["truncated"] is False and full["usage"]["prompt_tokens"] == len(enc.ids)
    for route, body in (
        ("/score", {"text_1": QUERY, "text_2": [LONG]}),
        ("/v1/rerank", {"query": QUERY, "documents": [LONG]}),
    ):
        left = client.post(route, json={**body, "truncate_prompt_tokens": n}).json()
        right = client.post(route, json={**body, "truncate_prompt_tokens": n, "truncation_side": "right"}).json()
        rows_l = left.get("data") or left.get("results")
        rows_r = right.get("data") or right.get("results")
        key = "score" if "data" in left else "relevance_score"
        assert rows_l[0]["truncated"] is True and rows_r[0]["truncated"] is True, route
        assert rows_l[0][key] == pytest.approx(want_left, abs=1e-6), route
        assert rows_r[0][key] == pytest.approx(want_right, abs=1e-6), route
        assert left["usage"]["prompt_tokens"] == n
    same = client.post("/score", json={"text_1": QUERY, "text_2": LONG, "truncate_prompt_tokens": -1}).json()
    assert same["data"] == full["data"]


def test_max_tokens_per_doc_cuts_each_document_to_its_first_tokens(client: TestClient) -> None:
    state = client.app.state.rm  # type: ignore[attr-defined]
    tok = state.engine.formatter.tokenizer
    doc = LONG.strip()
    offsets = tok(doc, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    n = 5
    head = doc[: offsets[n - 1][1]]
    cut = client.post("/v2/rerank", json={"query": QUERY, "documents": [doc, "Short."], "max_tokens_per_doc": n}).json()
    ref = client.post("/v2/rerank", json={"query": QUERY, "documents": [head, "Short."]}).json()
    by_index = {r["index"]: r for r in cut["results"]}
    ref_index = {r["index"]: r for r in ref["results"]}
    assert by_index[0]["relevance_score"] == pytest.approx(ref_index[0]["relevance_score"], abs=1e-6)
    assert by_index[0]["truncated"] is True and by_index[1]["truncated"] is False
    assert by_index[0]["document"] == {"text": doc}  # the document as sent
    uncut = client.post("/v2/rerank", json={"query": QUERY, "documents": [doc], "max_tokens_per_doc": 4096}).json()
    assert uncut["results"][0]["truncated"] is False


def test_rank_fields_score_key_value_lines_in_order(client: TestClient) -> None:
    docs = [{"title": "Bread", "text": "Mix flour and water.", "year": 2020}, {"title": "Fox", "text": "No idea."}]
    r = client.post("/v1/rerank", json={"query": QUERY, "documents": docs, "rank_fields": ["text", "title"]})
    assert r.status_code == 200, r.text
    as_text = ["text: Mix flour and water.\ntitle: Bread", "text: No idea.\ntitle: Fox"]
    ref = client.post("/v1/rerank", json={"query": QUERY, "documents": as_text}).json()
    got = {x["index"]: x for x in r.json()["results"]}
    assert {x["index"]: x["relevance_score"] for x in ref["results"]} == pytest.approx(
        {i: x["relevance_score"] for i, x in got.items()}, abs=1e-6
    )
    assert got[0]["document"] == docs[0]  # structured documents come back as sent
    year = client.post("/v1/rerank", json={"query": QUERY, "documents": docs[:1], "rank_fields": ["year"]}).json()
    alone = client.post("/v1/rerank", json={"query": QUERY, "documents": ["year: 2020"]}).json()
    assert year["results"][0]["relevance_score"] == pytest.approx(alone["results"][0]["relevance_score"], abs=1e-6)
    plain = client.post("/v1/rerank", json={"query": QUERY, "documents": [{"text": "No idea.", "id": 7}]}).json()
    assert plain["results"][0]["document"] == {"text": "No idea.", "id": 7}


def test_trl_adapter_gets_the_413_naming_the_item(rm_dir: Path) -> None:
    from service.client import InvalidRequestError, RewardFunction

    with live_server(Settings(model=str(rm_dir), dtype="float32", max_messages=8)) as url:
        fn = RewardFunction(url)
        assert len(fn(prompts=[msgs(8)], completions=["ok"])) == 1
        with pytest.raises(InvalidRequestError) as e:
            fn(prompts=["Hi", msgs(9)], completions=["a", "b"])
    assert e.value.status == 413 and e.value.param == "items[1].prompt" and e.value.code == "too_many_messages"


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        ({"prompt": "q", "responses": []}, "responses", "empty_list"),
        ({"prompt": [], "responses": ["a"]}, "prompt", "empty_list"),
        ({"text_1": "q", "text_2": ["a"], "truncate_prompt_tokens": 0}, "truncate_prompt_tokens", "out_of_range"),
    ],
)
def test_422s_carry_a_specific_code(client: TestClient, body: dict[str, object], param: str, code: str) -> None:
    """The code says what was wrong, not the type again (before: code "invalid_request_error")."""
    r = client.post("/v1/score", json=body)
    err = r.json()["error"]
    assert r.status_code == 422 and err["param"] == param and err["code"] == code, err
