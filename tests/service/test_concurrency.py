from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import httpx
import pytest

from models.reward_model import RewardModel
from service.runtimes.base import Runtime
from service.settings import Settings
from tests.service.conftest import live_server


class SlowRuntime:
    """Wraps a runtime: optional delay per batch, optional failures, and a record of what ran."""

    def __init__(self, inner: Runtime, delay: float = 0.0) -> None:
        self.inner = inner
        self.name, self.dtype = inner.name, inner.dtype
        self.delay = delay
        self.fail_next = 0
        self.computed: list[Sequence[int]] = []
        self.batches: list[int] = []
        self.lock = threading.Lock()
        self.entered = threading.Event()  # set when a forward pass starts

    def score(self, seqs: Sequence[Sequence[int]]) -> list[float]:
        self.entered.set()
        if self.delay:
            time.sleep(self.delay)
        with self.lock:
            if self.fail_next > 0:
                self.fail_next -= 1
                raise RuntimeError("injected failure")
            self.computed.extend(seqs)
            self.batches.append(len(seqs))
        return self.inner.score(seqs)

    def warmup(self) -> None:
        self.inner.warmup()


def test_64_concurrent_requests_each_get_their_own_score(rm_dir: Path) -> None:
    model, tok = RewardModel.load(rm_dir)
    f = model.formatter(tok)
    prompts = [f"Question number {i}: how do I bake bread?" for i in range(64)]
    answers = [" ".join(["flour"] * (1 + i % 9)) + f" answer {i}" for i in range(64)]
    alone = [model.score_ids([f.encode(p, a).ids], tok.pad_token_id)[0] for p, a in zip(prompts, answers, strict=True)]
    holder: dict[str, SlowRuntime] = {}

    def wrap(rt: Runtime) -> Runtime:
        holder["rt"] = SlowRuntime(rt, delay=0.02)
        return holder["rt"]

    with live_server(Settings(model=str(rm_dir), dtype="float32", max_wait_ms=5), runtime_wrapper=wrap) as url:

        async def main() -> list[float]:
            async with httpx.AsyncClient(base_url=url, timeout=60) as c:
                rs = await asyncio.gather(
                    *(
                        c.post("/v1/score", json={"prompt": p, "responses": [a]})
                        for p, a in zip(prompts, answers, strict=True)
                    )
                )
            assert all(r.status_code == 200 for r in rs), [
                (r.status_code, r.text[:200]) for r in rs if r.status_code != 200
            ][:3]
            return [r.json()["scores"][0] for r in rs]

        got = asyncio.run(main())
        metrics = httpx.get(url + "/metrics").text
    assert got == pytest.approx(alone, abs=1e-5)
    assert max(holder["rt"].batches) > 1
    # The batch-size histogram saw batches bigger than one.
    lines = metrics.splitlines()
    count = float(next(ln for ln in lines if ln.startswith("rmserve_batch_size_count")).split()[-1])
    le1 = float(next(ln for ln in lines if ln.startswith('rmserve_batch_size_bucket{le="1.0"}')).split()[-1])
    assert count > le1


def test_failed_batch_fails_only_itself_and_ready_reflects_it(rm_dir: Path) -> None:
    holder: dict[str, SlowRuntime] = {}

    def wrap(rt: Runtime) -> Runtime:
        holder["rt"] = SlowRuntime(rt)
        return holder["rt"]

    with live_server(Settings(model=str(rm_dir), unhealthy_after_failures=2), runtime_wrapper=wrap) as url:
        rt = holder["rt"]
        rt.fail_next = 1
        r = httpx.post(url + "/v1/score", json={"prompt": "x", "responses": ["a"]})
        assert r.status_code == 500 and r.json()["error"]["type"] == "inference_error"
        assert "injected failure" in r.json()["error"]["message"]
        assert httpx.get(url + "/ready").status_code == 200
        assert httpx.post(url + "/v1/score", json={"prompt": "x", "responses": ["a"]}).status_code == 200
        rt.fail_next = 2
        for _ in range(2):
            assert httpx.post(url + "/v1/score", json={"prompt": "x", "responses": ["a"]}).status_code == 500
        ready = httpx.get(url + "/ready")
        assert ready.status_code == 503 and ready.json()["error"]["code"] == "runtime_failing"
        assert httpx.post(url + "/v1/score", json={"prompt": "x", "responses": ["a"]}).status_code == 200
        assert httpx.get(url + "/ready").status_code == 200


def test_deadline_is_never_504_started_work_is_answered_late(rm_dir: Path) -> None:
    """A forward pass that outlasts the deadline is finished and answered (200, late); a request whose work
    had not started by its deadline gets a counted 429 at the deadline, never a 504."""
    holder: dict[str, SlowRuntime] = {}

    def wrap(rt: Runtime) -> Runtime:
        holder["rt"] = SlowRuntime(rt)
        return holder["rt"]

    with live_server(Settings(model=str(rm_dir), request_timeout_s=0.5, max_wait_ms=0), runtime_wrapper=wrap) as url:
        rt = holder["rt"]
        rt.delay = 2.0

        async def main() -> tuple[tuple[int, float], tuple[int, float, str]]:
            async with httpx.AsyncClient(base_url=url, timeout=30) as c:
                t = time.perf_counter()
                started = asyncio.create_task(c.post("/v1/score", json={"prompt": "x", "responses": ["a", "b"]}))
                while not rt.entered.is_set():
                    await asyncio.sleep(0.01)
                t2 = time.perf_counter()
                queued = await c.post("/v1/score", json={"prompt": "x", "responses": ["c"]})
                q = (queued.status_code, time.perf_counter() - t2, queued.json()["error"]["message"])
                first = await started
                return (first.status_code, time.perf_counter() - t), q

        (first, took), (second, waited, message) = asyncio.run(asyncio.wait_for(main(), 60))
        metrics = httpx.get(url + "/metrics").text
    assert first == 200 and took >= 2.0  # late, but answered
    assert second == 429 and 0.4 < waited < 1.9 and "had not started" in message  # refused at its deadline
    assert 'rmserve_failures_total{cause="overloaded"} 1.0' in metrics
    assert "timeout" not in metrics.split("rmserve_failures_total", 1)[-1].split("\n# ", 1)[0]


def test_overload_answers_429_at_once(rm_dir: Path) -> None:
    holder: dict[str, SlowRuntime] = {}

    def wrap(rt: Runtime) -> Runtime:
        holder["rt"] = SlowRuntime(rt)
        return holder["rt"]

    settings = Settings(model=str(rm_dir), max_queued=3, max_wait_ms=0)
    with live_server(settings, runtime_wrapper=wrap) as url:
        rt = holder["rt"]
        rt.delay = 2.0

        async def main() -> tuple[httpx.Response, httpx.Response, httpx.Response]:
            async with httpx.AsyncClient(base_url=url, timeout=30) as c:
                busy = asyncio.create_task(c.post("/v1/score", json={"prompt": "x", "responses": ["a"]}))
                while not rt.entered.is_set():  # the worker is now busy with `busy`
                    await asyncio.sleep(0.01)
                queued = asyncio.create_task(c.post("/v1/score", json={"prompt": "x", "responses": ["b", "c"]}))
                while "rmserve_queue_depth 2.0" not in (await c.get("/metrics")).text:
                    await asyncio.sleep(0.01)
                rt.delay = 0.0
                t = time.perf_counter()
                refused = await c.post("/v1/score", json={"prompt": "x", "responses": ["d", "e"]})
                assert time.perf_counter() - t < 0.3
                return await busy, await queued, refused

        busy, queued, refused = asyncio.run(asyncio.wait_for(main(), 60))
    assert busy.status_code == 200 and queued.status_code == 200  # admitted work still served
    assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
    assert refused.json()["error"]["type"] == "overloaded"


def test_client_that_disconnects_has_its_work_dropped(rm_dir: Path) -> None:
    import socket

    holder: dict[str, SlowRuntime] = {}

    def wrap(rt: Runtime) -> Runtime:
        holder["rt"] = SlowRuntime(rt)
        return holder["rt"]

    with live_server(Settings(model=str(rm_dir), max_wait_ms=0), runtime_wrapper=wrap) as url:
        rt = holder["rt"]
        rt.delay = 0.6
        port = int(url.rsplit(":", 1)[1])
        done: dict[str, httpx.Response] = {}
        th = threading.Thread(
            target=lambda: done.setdefault(
                "r",
                httpx.post(url + "/v1/score", json={"prompt": "keep", "responses": ["kept answer"]}, timeout=30),
            )
        )
        th.start()
        time.sleep(0.2)  # the worker is busy with the first request
        body = b'{"prompt": "gone", "responses": ["dropped one", "dropped two", "dropped three"]}'
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(
            b"POST /v1/score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
        )
        time.sleep(0.1)
        s.close()  # gone before its work was computed
        th.join()
        time.sleep(1.0)
        assert done["r"].status_code == 200
        assert len(rt.computed) == 1  # only the kept request's sequence ran
        after = httpx.post(url + "/v1/score", json={"prompt": "x", "responses": ["a"]}, timeout=30)
        assert after.status_code == 200
        assert 'rmserve_failures_total{cause="client_gone"} 1.0' in httpx.get(url + "/metrics").text


class TokenTimedRuntime:
    """Wraps a runtime: each pass takes `per_token` seconds per real token (a fixed throughput)."""

    def __init__(self, inner: Runtime, per_token: float) -> None:
        self.inner, self.per_token = inner, per_token
        self.name, self.dtype = inner.name, inner.dtype

    def score(self, seqs: Sequence[Sequence[int]]) -> list[float]:
        time.sleep(self.per_token * sum(len(s) for s in seqs))
        return self.inner.score(seqs)

    def warmup(self) -> None:
        self.inner.warmup()


def test_overload_is_refused_by_projected_wait_never_504(rm_dir: Path) -> None:
    """A fixed 100 tokens/s and a 3 s deadline: a burst of 24 requests is more than fits; the excess
    gets 429 at once with a Retry-After from the projection, and nothing reaches its deadline."""
    settings = Settings(model=str(rm_dir), request_timeout_s=3.0, max_wait_ms=0)
    with live_server(settings, runtime_wrapper=lambda rt: TokenTimedRuntime(rt, 0.01)) as url:
        body = {"prompt": "How do I bake bread at home?", "responses": ["Knead the dough and bake it for an hour."]}
        assert httpx.post(url + "/v1/score", json=body).status_code == 200  # one pass measures the rate

        async def one(c: httpx.AsyncClient) -> tuple[int, float, str | None]:
            t = time.perf_counter()
            r = await c.post("/v1/score", json=body)
            return r.status_code, time.perf_counter() - t, r.headers.get("retry-after")

        async def main() -> list[tuple[int, float, str | None]]:
            async with httpx.AsyncClient(base_url=url, timeout=30) as c:
                return list(await asyncio.gather(*(one(c) for _ in range(24))))

        out = asyncio.run(main())
        metrics = httpx.get(url + "/metrics").text
    codes = [c for c, _, _ in out]
    assert 504 not in codes and set(codes) == {200, 429}, out
    refused = [(t, ra) for c, t, ra in out if c == 429]
    assert all(t < 1.0 and ra is not None and int(ra) >= 1 for t, ra in refused), refused
    assert f'rmserve_failures_total{{cause="overloaded"}} {float(len(refused))}' in metrics


class SlowingRuntime(TokenTimedRuntime):
    """TokenTimedRuntime whose passes get `factor` times slower once `after` passes have run (a CPU-bound
    neighbour arriving after the work was admitted)."""

    def __init__(self, inner: Runtime, per_token: float, after: int, factor: float) -> None:
        super().__init__(inner, per_token)
        self.after, self.factor, self.passes = after, factor, 0

    def score(self, seqs: Sequence[Sequence[int]]) -> list[float]:
        self.passes += 1
        if self.passes == self.after + 1:
            self.per_token *= self.factor
        return super().score(seqs)


def test_drain_rate_falling_after_admission_ends_in_429_never_504(rm_dir: Path) -> None:
    """Work admitted at 200 tokens/s, then every pass 4x slower: the batcher's re-check after each pass
    refuses the queued requests that would now miss the 3 s deadline (429, counted), the ones whose pass
    started are answered, late if need be; no client gets a 504 (before: the late ones got 504)."""
    settings = Settings(model=str(rm_dir), request_timeout_s=3.0, max_wait_ms=0, max_batch_size=1)
    with live_server(settings, runtime_wrapper=lambda rt: SlowingRuntime(rt, 0.005, after=2, factor=4.0)) as url:
        body = {"prompt": "How do I bake bread at home?", "responses": ["Knead the dough and bake it for an hour."]}
        assert httpx.post(url + "/v1/score", json=body).status_code == 200  # one pass measures the rate

        async def one(c: httpx.AsyncClient) -> tuple[int, str]:
            r = await c.post("/v1/score", json=body)
            return r.status_code, r.text

        async def main() -> list[tuple[int, str]]:
            async with httpx.AsyncClient(base_url=url, timeout=60) as c:
                return list(await asyncio.gather(*(one(c) for _ in range(16))))

        out = asyncio.run(main())
        metrics = httpx.get(url + "/metrics").text
    codes = [c for c, _ in out]
    assert 504 not in codes and 200 in codes and 429 in codes, codes
    late = [text for c, text in out if c == 429 and ("drain rate fell" in text or "had not started" in text)]
    assert late, out  # admitted, then refused when the slower passes made it miss its deadline
    refused = codes.count(429)
    assert f'rmserve_failures_total{{cause="overloaded"}} {float(refused)}' in metrics
    assert f'rmserve_requests_total{{route="/v1/score",status="429"}} {float(refused)}' in metrics
