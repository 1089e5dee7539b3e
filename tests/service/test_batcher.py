from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

import pytest

from service.batcher import Batcher, QueueFull


def test_batches_merge_requests_and_respect_budget() -> None:
    seen: list[list[int]] = []

    def run(seqs: list[Sequence[int]]) -> list[float]:
        seen.append([len(s) for s in seqs])
        return [float(sum(s)) for s in seqs]

    async def main() -> list[list[float]]:
        b = Batcher(run, max_batch_tokens=40, max_batch_size=4, max_wait_s=0.01)
        b.start()
        reqs = [b.submit([[i] * (1 + i % 7), [i, i]]) for i in range(10)]
        out = await asyncio.gather(*reqs)
        await b.close()
        return out

    out = asyncio.run(main())
    assert out == [[float(i * (1 + i % 7)), float(2 * i)] for i in range(10)]
    assert max(len(x) for x in seen) > 1  # requests were merged
    for lens in seen:
        assert len(lens) <= 4 and (len(lens) == 1 or max(lens) * len(lens) <= 40)
        assert lens == sorted(lens)  # length-sorted within a batch


def test_queue_limit_refuses_at_once() -> None:
    async def main() -> None:
        gate = asyncio.Event()

        def run(seqs: list[Sequence[int]]) -> list[float]:
            return [0.0] * len(seqs)

        b = Batcher(run, max_queued=3, max_wait_s=0)
        # Not started: nothing drains the queue.
        t = asyncio.ensure_future(b.submit([[1], [2], [3]]))
        await asyncio.sleep(0)
        with pytest.raises(QueueFull):
            await b.submit([[4]])
        b.start()
        assert await t == [0.0, 0.0, 0.0]
        gate.set()
        await b.close()

    asyncio.run(main())


def test_cancelled_work_is_not_computed_and_errors_stay_in_their_batch() -> None:
    computed: list[Sequence[int]] = []

    def run(seqs: list[Sequence[int]]) -> list[float]:
        if any(s[0] == 666 for s in seqs):
            raise ValueError("boom")
        computed.extend(seqs)
        return [1.0] * len(seqs)

    async def main() -> None:
        b = Batcher(run, max_wait_s=0, max_batch_size=1)
        t = asyncio.ensure_future(b.submit([[7], [8]]))
        await asyncio.sleep(0)
        t.cancel()  # client gone before the worker started
        b.start()
        with pytest.raises(ValueError, match="boom"):
            await b.submit([[666]])
        assert b.consecutive_failures == 1
        assert await b.submit([[9]]) == [1.0]
        assert b.consecutive_failures == 0
        await b.close()

    asyncio.run(main())
    assert computed == [[9]]


def test_shared_prefix_groups_stay_in_one_batch() -> None:
    """With a sharing runtime, the answers of one prompt (sent as separate requests, interleaved with
    others, of very different lengths) reach the runtime in one pass, costed at their prefix once."""
    seen: list[list[Sequence[int]]] = []

    def run(seqs: list[Sequence[int]]) -> list[float]:
        seen.append(list(seqs))
        return [float(sum(s)) for s in seqs]

    prompts = [[p] * 30 for p in (1, 2, 3)]
    seqs = [pr + [9] * n for n in (2, 40, 5, 60) for pr in prompts]  # interleaved prompts, mixed lengths

    async def main(share: bool) -> list[list[float]]:
        b = Batcher(run, max_batch_tokens=200, max_batch_size=64, max_wait_s=0.01, share_prefixes=share)
        b.start()
        out = await asyncio.gather(*(b.submit([s]) for s in seqs))
        await b.close()
        return out

    out = asyncio.run(main(True))
    assert out == [[float(sum(s))] for s in seqs]  # every request got its own answer
    for pr in prompts:
        holders = [k for k, batch in enumerate(seen) if any(list(s[:30]) == pr for s in batch)]
        assert len(holders) == 1  # all four answers of this prompt ran in one pass
    # 200 tokens: one prompt's group costs 30 + 107 = 137; two would not fit, plain length batches would
    assert len(seen) == 3
    seen.clear()
    asyncio.run(main(False))
    assert any(len({tuple(s[:30]) for s in batch}) > 1 for batch in seen)  # length batching mixes prompts


def test_admission_by_projected_wait() -> None:
    async def main() -> None:
        def run(seqs: list[Sequence[int]]) -> list[float]:
            time.sleep(0.05)
            return [0.0] * len(seqs)

        b = Batcher(run, max_batch_tokens=512, max_queued=100, max_wait_s=0)
        # before any pass: the first request always, then up to one pass's token budget
        first = b.admit(1, 400, budget_s=1.0)
        with pytest.raises(QueueFull) as exc:
            b.admit(1, 200, budget_s=1.0)
        assert exc.value.retry_after_s == 1.0
        b.start()
        assert await b.submit([[1] * 400], first) == [0.0]  # the reservation gives way to the real tokens
        assert b.tokens_ahead == 0
        assert b.tokens_per_s is not None and 400 / 0.2 < b.tokens_per_s < 400 / 0.05  # one measured pass
        b.tokens_per_s = 100.0  # 100 tokens/s: a 5 s budget holds 500 tokens
        held = b.admit(2, 300, budget_s=5.0)
        assert b.projected_s(200) == 5.0
        with pytest.raises(QueueFull) as exc:
            b.admit(1, 300, budget_s=5.0)  # (300 + 300) / 100 = 6 s > 5 s
        assert exc.value.retry_after_s == pytest.approx(1.0)
        held.release()
        held.release()  # twice is once
        assert b.tokens_ahead == 0
        b.admit(1, 300, budget_s=5.0).release()
        b.tokens_per_s = 1.0  # measured too low once: nothing ahead still admits (no lock-out)
        idle = b.admit(1, 10_000, budget_s=1.0)
        with pytest.raises(QueueFull):
            b.admit(1, 1, budget_s=1.0)
        idle.release()
        with pytest.raises(QueueFull, match="the limit is 100"):  # the hard cap still holds
            b.admit(101, 1, budget_s=1e9)
        await b.close()

    asyncio.run(main())


def test_cancelled_and_failed_work_leaves_the_projection() -> None:
    async def main() -> None:
        def run(seqs: list[Sequence[int]]) -> list[float]:
            raise ValueError("boom")

        b = Batcher(run, max_wait_s=0)
        t = asyncio.ensure_future(b.submit([[1] * 50, [2] * 30]))
        await asyncio.sleep(0)
        assert b.tokens_ahead == 80
        t.cancel()
        await asyncio.sleep(0)
        assert b.tokens_ahead == 0
        b.start()
        with pytest.raises(ValueError):
            await b.submit([[1] * 20])
        assert b.tokens_ahead == 0
        await b.close()

    asyncio.run(main())


def test_refusal_before_the_body_from_its_length() -> None:
    """The edge's admission check: nothing ahead admits; otherwise the work ahead plus the body's bytes
    (read as characters, over the learned characters per token) must fit the admission budget."""
    from types import SimpleNamespace

    from service.engine import Limits, ScoringEngine
    from service.metrics import Metrics

    batcher = Batcher(lambda seqs: [0.0] * len(seqs))
    batcher.seed_rate(100.0)
    engine = ScoringEngine(
        SimpleNamespace(max_length=128),  # type: ignore[arg-type]
        batcher,
        model_id="m",
        normalization=None,
        limits=Limits(request_timeout_s=10.0, admit_wait_fraction=0.7),
        metrics=Metrics(),
    )
    engine.chars_per_token = 4.0
    assert engine.refuse_before_body(1_000_000) is None  # idle: always admitted
    batcher.admit(1, 300, budget_s=60.0)  # 3 s of work ahead at 100 tokens/s; the budget is 7 s
    assert engine.refuse_before_body(1200) is None  # + 300 tokens: 6 s
    refused = engine.refuse_before_body(2400)  # + 600 tokens: 9 s
    assert refused is not None and refused.status == 429 and refused.retry_after == 2


def test_a_seeded_rate_is_replaced_by_the_first_real_pass() -> None:
    async def main() -> tuple[float | None, float | None]:
        b = Batcher(lambda seqs: [0.0] * len(seqs), max_wait_s=0)
        b.seed_rate(1000.0)
        seeded = b.tokens_per_s
        b.start()
        await b.submit([[1] * 50])
        await b.close()
        return seeded, b.tokens_per_s

    seeded, measured = asyncio.run(main())
    assert seeded == 1000.0 and measured is not None and measured != 1000.0
