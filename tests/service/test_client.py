from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import httpx
import pytest

from service.client import (
    AsyncRewardClient,
    AuthenticationError,
    ConnectionFailedError,
    InvalidRequestError,
    RewardClient,
    RewardFunction,
)
from service.runtimes.base import Runtime
from service.settings import Settings
from tests.service.conftest import free_port, live_server
from tests.service.test_concurrency import SlowRuntime


@pytest.fixture(scope="module")
def server(rm_dir: Path):  # type: ignore[no-untyped-def]
    with live_server(Settings(model=str(rm_dir), api_key="k")) as url:
        yield url


def test_sync_client_methods_return_plain_values(server: str) -> None:
    with RewardClient(server, api_key="k") as rc:
        s = rc.score("How do I bake bread?", ["Mix flour and water.", "No idea."])
        assert isinstance(s, list) and all(type(x) is float for x in s) and len(s) == 2
        assert rc.score_items([("How do I bake bread?", "Mix flour and water.")]) == pytest.approx(s[:1], abs=1e-6)
        assert rc.score_items(
            [{"prompt": [{"role": "user", "content": "How do I bake bread?"}], "response": "No idea."}]
        ) == pytest.approx(s[1:], abs=1e-6)
        ranking = rc.rank("How do I bake bread?", ["Mix flour and water.", "No idea."])
        assert ranking[0]["index"] == (0 if s[0] > s[1] else 1)
        assert (
            rc.rerank("How do I bake bread?", ["Mix flour and water.", "No idea."], top_n=1)[0]["index"]
            == ranking[0]["index"]
        )
        assert rc.get_reward([]) == []
        assert rc.models()[0]["runtime"] == "torch" and rc.ready()


def test_typed_errors_carry_the_server_message(server: str) -> None:
    with RewardClient(server, api_key="k") as rc, pytest.raises(InvalidRequestError) as e:
        rc.score("x", [])
    assert e.value.status == 422 and e.value.param == "responses" and "empty" in e.value.message
    with RewardClient(server, api_key="wrong") as bad, pytest.raises(AuthenticationError) as e2:
        bad.score("x", ["y"])
    assert e2.value.status == 401
    with (
        RewardClient(f"http://127.0.0.1:{free_port()}", max_retries=1, backoff=0.01) as gone,
        pytest.raises(ConnectionFailedError),
    ):
        gone.score("x", ["y"])


def test_async_client(server: str) -> None:
    async def main() -> list[list[float]]:
        async with AsyncRewardClient(server, api_key="k") as rc:
            return list(await asyncio.gather(*(rc.score(f"q{i}", [f"a{i}", "b"]) for i in range(8))))

    out = asyncio.run(main())
    with RewardClient(server, api_key="k") as rc:
        assert out[3] == pytest.approx(rc.score("q3", ["a3", "b"]), abs=1e-5)


def test_client_retries_429_honouring_retry_after(rm_dir: Path) -> None:
    holder: dict[str, SlowRuntime] = {}

    def wrap(rt: Runtime) -> Runtime:
        holder["rt"] = SlowRuntime(rt)
        return holder["rt"]

    with live_server(Settings(model=str(rm_dir), max_queued=2, max_wait_ms=0), runtime_wrapper=wrap) as url:
        holder["rt"].delay = 2.0  # long enough for the queue to be seen full even on a loaded machine
        busy = threading.Thread(
            target=lambda: httpx.post(url + "/v1/score", json={"prompt": "x", "responses": ["a"]}, timeout=30)
        )
        queued = threading.Thread(
            target=lambda: httpx.post(url + "/v1/score", json={"prompt": "x", "responses": ["b", "c"]}, timeout=30)
        )
        busy.start()
        assert holder["rt"].entered.wait(30)  # the busy request is in its forward pass
        queued.start()
        deadline = time.monotonic() + 30
        while "rmserve_queue_depth 2.0" not in httpx.get(url + "/metrics").text:  # queue full
            assert time.monotonic() < deadline
            time.sleep(0.02)
        holder["rt"].delay = 0.0  # the passes after the busy one are quick
        with RewardClient(url, backoff=0.05) as rc:
            t = time.perf_counter()
            scores = rc.score("x", ["d"])  # 429 first (queue full), then admitted on retry
            waited = time.perf_counter() - t
            assert rc.retries >= 1 and len(scores) == 1
            assert waited >= 0.9  # Retry-After: 1 was honoured, not the 0.05 s backoff
        busy.join()
        queued.join()


def test_trl_reward_function_calling_convention(server: str) -> None:
    """GRPOTrainer calls reward_func(prompts=..., completions=..., completion_ids=..., **columns)."""
    rf = RewardFunction(RewardClient(server, api_key="k"), batch_size=3)
    assert rf.__name__ == "rmserve"
    prompts = [[{"role": "user", "content": f"Question {i}?"}] for i in range(5)]
    completions = [[{"role": "assistant", "content": f"Answer {i}."}] for i in range(5)]
    got = rf(
        prompts=prompts,
        completions=completions,
        completion_ids=[[1, 2]] * 5,
        trainer_state=None,
        ground_truth=["x"] * 5,
    )
    with RewardClient(server, api_key="k") as rc:
        ref = [rc.score(p, [c[0]["content"]])[0] for p, c in zip(prompts, completions, strict=True)]
    assert got == pytest.approx(ref, abs=1e-5)
    plain = rf(prompts=["Question 0?"], completions=["Answer 0."])
    assert plain == pytest.approx(
        rf(prompts=[[{"role": "user", "content": "Question 0?"}]], completions=["Answer 0."]), abs=1e-6
    )
    assert len(rf(prompts=["q"], completions=[""])) == 1  # an empty completion still gets a score


def public_methods(cls: type) -> set[str]:
    return {n for n in dir(cls) if not n.startswith("_") and callable(getattr(cls, n))}


def test_async_client_has_the_whole_sync_surface(server: str) -> None:
    # close/aclose differ by name on purpose (the httpx convention); everything else is shared.
    assert public_methods(RewardClient) - {"close"} == public_methods(AsyncRewardClient) - {"aclose"}

    async def go() -> tuple[list[dict[str, object]], bool]:
        async with AsyncRewardClient(server, api_key="k") as ac:
            return await ac.models(), await ac.ready()

    models, ready = asyncio.run(go())
    assert models[0]["id"] == "model" and ready is True
    assert asyncio.run(AsyncRewardClient(f"http://127.0.0.1:{free_port()}", max_retries=0).ready()) is False


def test_content_text_refuses_non_text_parts() -> None:
    from service.client import content_text

    assert content_text([{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]) == "ab"
    assert content_text(None) == ""
    with pytest.raises(ValueError, match="type 'image' cannot be scored"):
        content_text([{"type": "image", "image": "x"}, {"type": "text", "text": "What?"}])
