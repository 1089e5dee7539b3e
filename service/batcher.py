"""Dynamic batcher: merges sequences from many requests into forward passes under a token budget.

Knows nothing of torch or HTTP: it is handed a blocking `run_batch(seqs) -> scores` and runs it on a
worker thread. Only the batcher decides batch shape.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

from models.batching import length_batches, packed_batches, packed_cost, shared_prefix_batches

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """Refuse at once: more sequences than `max_queued` would wait, or the work queued ahead would not
    finish within the request's deadline. `retry_after_s`: when the projection says it would fit."""

    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class Reservation:
    """Admitted work not yet submitted (still being formatted): counted ahead of later arrivals until
    `submit()` replaces it with the real token counts, or `release()` drops it."""

    def __init__(self, batcher: Batcher, seqs: int, tokens: int) -> None:
        self._batcher, self.seqs, self.tokens = batcher, seqs, tokens
        self._held = True

    def release(self) -> None:
        if self._held:
            self._held = False
            self._batcher._reserved_seqs -= self.seqs
            self._batcher._reserved_tokens -= self.tokens


class Ticket:
    """One request's work in the batcher (all its submits, slices included): its deadline
    (`time.perf_counter()` seconds, None: none) and whether any of its sequences has entered a forward
    pass. Work that has started is finished; work that has not is refused once it would end past the
    deadline (`Batcher._refuse_late`)."""

    def __init__(self, deadline: float | None = None) -> None:
        self.deadline = deadline
        self.started = False
        self.refused: QueueFull | None = None


class BatchObserver(Protocol):
    def batch(self, size: int, real_tokens: int, padded_tokens: int, seconds: float) -> None: ...
    def queue(self, depth: int) -> None: ...
    def waited(self, seconds: float) -> None: ...


@dataclass
class _Item:
    seq: Sequence[int]
    future: asyncio.Future[float]
    group: Ticket  # the request the sequence belongs to
    enqueued: float = field(default_factory=time.perf_counter)


class Batcher:
    """Args:
    run_batch: blocking function scoring a list of token id lists (same order out).
    max_batch_tokens: cost budget per pass: padded (longest sequence x count), or with `packed` real tokens.
    max_batch_size: most sequences per pass.
    max_wait_s: how long to wait for more work when fewer than a full batch are queued.
    max_queued: most sequences waiting; submit() beyond it raises QueueFull (a hard cap).
    rate_smoothing: weight of the newest forward pass in the measured throughput (tokens/s, an
        exponential moving average) that `admit()` projects waits with.
    max_pad_ratio: cut a batch early rather than let its padded cost pass this ratio of its real tokens
        (None: only the budget counts).
    share_prefixes: the runtime computes a token prefix shared by sequences of one pass once (K
        answers to one prompt, within or across requests): keep such groups in one batch, costed at
        their prefix once plus each member's own tokens. `min_prefix` is the shortest prefix that counts.
    packed: the runtime packs a pass without padding (the canonical forward): a pass costs its real
        tokens, each distinct prompt once (`models.batching.packed_batches`); `max_pad_ratio` is unused.
    """

    def __init__(
        self,
        run_batch: Callable[[list[Sequence[int]]], list[float]],
        *,
        max_batch_tokens: int = 16384,
        max_batch_size: int = 64,
        max_wait_s: float = 0.002,
        max_queued: int = 2048,
        observer: BatchObserver | None = None,
        share_prefixes: bool = False,
        min_prefix: int = 16,
        max_pad_ratio: float | None = 1.3,
        rate_smoothing: float = 0.2,
        packed: bool = False,
    ) -> None:
        self.packed = packed
        self._run_batch = run_batch
        self.max_batch_tokens = max_batch_tokens
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.max_queued = max_queued
        self._observer = observer
        self.share_prefixes = share_prefixes
        self.min_prefix = min_prefix
        self.max_pad_ratio = max_pad_ratio
        self._pending: deque[_Item] = deque()
        self._wake = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rmserve-infer")
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self.consecutive_failures = 0
        self.busy = False
        # Admission by projected wait: tokens submitted and not yet answered (queued or in a pass),
        # tokens reserved by admitted requests still formatting, and the measured tokens/s.
        self.rate_smoothing = rate_smoothing
        self.tokens_per_s: float | None = None
        self._seeded = False  # tokens_per_s is the start-up calibration, not yet a real pass
        self._outstanding_tokens = 0
        self._reserved_tokens = 0
        self._reserved_seqs = 0
        self._last_pass_end = 0.0

    @property
    def tokens_ahead(self) -> int:
        """Tokens a request admitted now would wait behind (queued, in a pass, or reserved)."""
        return self._outstanding_tokens + self._reserved_tokens

    def projected_s(self, tokens: int) -> float | None:
        """Seconds until `tokens` more would be scored, at the measured rate (None before any pass)."""
        if not self.tokens_per_s:
            return None
        return (self.tokens_ahead + tokens) / self.tokens_per_s

    def projected_refusal(self, tokens: int, budget_s: float) -> QueueFull | None:
        """The refusal, if any, for `tokens` more that must be scored within `budget_s`, by the projection
        alone (no queue count, nothing reserved). Nothing ahead admits; before any measured rate, one
        pass's token budget is admitted. Monotone in `tokens`: a lower bound never refuses what the
        full estimate would admit."""
        if not self.tokens_ahead:
            return None
        projected = self.projected_s(tokens)
        if projected is None:
            if self.tokens_ahead + tokens > self.max_batch_tokens:
                return QueueFull("the first forward pass has not measured the throughput yet", retry_after_s=1.0)
            return None
        if projected > budget_s:
            return QueueFull(
                f"{self.tokens_ahead:,} tokens are ahead at {self.tokens_per_s:,.0f} tokens/s: this request would "
                f"finish in about {projected:.1f} s, past its {budget_s:.1f} s budget",
                retry_after_s=projected - budget_s,
            )
        return None

    def admit(self, seqs: int, tokens: int, budget_s: float) -> Reservation:
        """Admit `seqs` sequences of about `tokens` tokens that must be scored within `budget_s`, or raise
        QueueFull at once (before any formatting work) with the delay after which they would fit.

        Nothing ahead (the worker idle) admits always: waiting would not make the request fit, and a
        rate measured once too low must not lock every request out. Before the first pass has measured
        a rate, work is admitted up to one pass's token budget."""
        if self._closing:
            raise QueueFull("the service is shutting down")
        waiting = len(self._pending) + self._reserved_seqs
        if waiting + seqs > self.max_queued:
            raise QueueFull(f"{waiting} sequences are queued; the limit is {self.max_queued}")
        late = self.projected_refusal(tokens, budget_s)
        if late is not None:
            raise late
        self._reserved_seqs += seqs
        self._reserved_tokens += tokens
        return Reservation(self, seqs, tokens)

    @property
    def queued(self) -> int:
        return len(self._pending)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop(), name="rmserve-batcher")

    async def close(self) -> None:
        """Finish what is queued, then stop the worker."""
        self._closing = True
        self._wake.set()
        if self._task is not None:
            await self._task
            self._task = None
        self._executor.shutdown(wait=True)

    async def submit(
        self, seqs: Sequence[Sequence[int]], reservation: Reservation | None = None, ticket: Ticket | None = None
    ) -> list[float]:
        """Score sequences; raises QueueFull at once when admitting them would pass `max_queued`, or later
        when the drain rate falls so far that the request (`ticket`, with its deadline) would miss its
        deadline before any of its work started. `reservation` (from `admit()`) is released: the real token
        counts replace it.

        If the caller is cancelled (client gone, deadline), its queued sequences are dropped before
        they are computed.
        """
        if reservation is not None:
            reservation.release()
        if not seqs:
            return []
        if self._closing:
            raise QueueFull("the service is shutting down")
        if len(self._pending) + len(seqs) > self.max_queued:
            raise QueueFull(f"{len(self._pending)} sequences are queued; the limit is {self.max_queued}")
        if ticket is not None and ticket.refused is not None:
            raise ticket.refused
        loop = asyncio.get_running_loop()
        group = ticket if ticket is not None else Ticket()
        items = [_Item(s, loop.create_future(), group) for s in seqs]
        for i in items:
            self._outstanding_tokens += len(i.seq)
            i.future.add_done_callback(self._make_done(len(i.seq)))
        self._pending.extend(items)
        if self._observer:
            self._observer.queue(len(self._pending))
        self._wake.set()
        try:
            return list(await asyncio.gather(*(i.future for i in items)))
        finally:
            for i in items:
                if not i.future.done():
                    i.future.cancel()  # dropped from the queue by the worker before computing

    def _make_done(self, tokens: int) -> Callable[[asyncio.Future[float]], None]:
        def done(_: asyncio.Future[float]) -> None:  # answered, failed or dropped: no longer ahead
            self._outstanding_tokens -= tokens

        return done

    def seed_rate(self, tokens_per_s: float) -> None:
        """A prior for the drain rate (a calibration pass at start-up), so admission can project from the
        first request on; the first real pass replaces it."""
        if tokens_per_s > 0:
            self.tokens_per_s, self._seeded = tokens_per_s, True

    def _measured(self, tokens: int, seconds: float) -> None:
        if seconds <= 0 or tokens <= 0:
            return
        rate = tokens / seconds
        a = self.rate_smoothing
        first = self.tokens_per_s is None or self._seeded
        self.tokens_per_s = rate if first else (1 - a) * self.tokens_per_s + a * rate  # type: ignore[operator]
        self._seeded = False

    def _refuse_late(self, queued: list[_Item]) -> None:
        """Re-check the projection after a pass (the drain rate may have fallen since admission): in the
        order the `queued` work will run, a request none of whose sequences has started is refused (its
        futures fail with QueueFull, a 429 upstream) when the tokens ahead of its own plus its own, at the
        measured (smoothed) rate, would end past its deadline. Refused work no longer counts ahead of later
        work."""
        rate = self.tokens_per_s
        if not rate:
            return
        now, ahead = time.perf_counter(), 0
        for it in queued:
            t = it.group
            if it.future.done() or t.refused is not None:
                continue
            ahead += len(it.seq)
            late = now + ahead / rate - t.deadline if t.deadline is not None and not t.started else 0.0
            if late > 0:
                t.refused = QueueFull(
                    f"the drain rate fell to {rate:,.0f} tokens/s after this request was admitted: its work would "
                    f"end {late:.1f} s past its deadline",
                    retry_after_s=ahead / rate,
                )
        for it in queued:
            if it.group.refused is not None and not it.future.done():
                it.future.set_exception(it.group.refused)

    # -- worker ---------------------------------------------------------------------------------
    def _take_window(self) -> list[_Item]:
        """A FIFO prefix of live work, up to a few batches' worth (so nothing starves)."""
        window: list[_Item] = []
        tokens = 0
        while self._pending:
            it = self._pending[0]
            if it.future.done():  # cancelled: the client went away
                self._pending.popleft()
                continue
            if window and (len(window) >= 4 * self.max_batch_size or tokens + len(it.seq) > 4 * self.max_batch_tokens):
                break
            window.append(self._pending.popleft())
            tokens += len(it.seq)
        return window

    def _split(self, window: list[_Item]) -> list[list[_Item]]:
        """Sort by length, cut into batches under the token budget and size cap (keeping shared-prefix
        groups together when the runtime shares prefixes)."""
        if self.packed:
            groups = packed_batches([i.seq for i in window], self.max_batch_tokens, self.max_batch_size)
        elif self.share_prefixes:
            groups = shared_prefix_batches(
                [i.seq for i in window],
                self.max_batch_tokens,
                self.max_batch_size,
                self.min_prefix,
                max_pad_ratio=self.max_pad_ratio,
            )
        else:
            groups = length_batches(
                [len(i.seq) for i in window], self.max_batch_tokens, self.max_batch_size, self.max_pad_ratio
            )
        return [[window[i] for i in g] for g in groups]

    def _full_batch_waiting(self) -> bool:
        return (
            len(self._pending) >= self.max_batch_size
            or sum(len(i.seq) for i in list(self._pending)[: self.max_batch_size]) >= self.max_batch_tokens
        )

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._pending:
                if self._closing:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            if self.max_wait_s > 0 and not self._full_batch_waiting() and not self._closing:
                await asyncio.sleep(self.max_wait_s)
            window = self._take_window()
            if self._observer:
                self._observer.queue(len(self._pending))
            batches = self._split(window)
            for n, batch in enumerate(batches):
                live = [i for i in batch if not i.future.done()]
                if not live:
                    continue
                now = time.perf_counter()
                if self._observer:
                    for i in live:
                        self._observer.waited(now - i.enqueued)
                seqs = [i.seq for i in live]
                for i in live:
                    i.group.started = True  # finished and answered from here on, even past its deadline
                t0 = time.perf_counter()
                self.busy = True
                try:
                    scores = await loop.run_in_executor(self._executor, self._run_batch, seqs)
                    if len(scores) != len(seqs):
                        raise RuntimeError(f"runtime returned {len(scores)} scores for {len(seqs)} sequences")
                except Exception as e:  # only this batch fails
                    self.consecutive_failures += 1
                    log.error("forward pass failed for a batch of %d: %s", len(seqs), e)
                    for i in live:
                        if not i.future.done():
                            i.future.set_exception(e)
                    continue
                finally:
                    self.busy = False
                self.consecutive_failures = 0
                # the drain rate, not the pass alone: from the previous pass's end (or this work's
                # arrival, after idling) to this pass's end, so scheduling and batching overheads count
                end = time.perf_counter()
                since = max(self._last_pass_end, min(i.enqueued for i in live))
                self._measured(sum(len(s) for s in seqs), end - since)
                self._last_pass_end = end
                if self._observer:
                    cost = packed_cost(seqs) if self.packed else max(len(s) for s in seqs) * len(seqs)
                    self._observer.batch(len(seqs), sum(len(s) for s in seqs), cost, time.perf_counter() - t0)
                for i, s in zip(live, scores, strict=True):
                    if not i.future.done():
                        i.future.set_result(s)
                self._refuse_late([i for b in batches[n + 1 :] for i in b] + list(self._pending))
