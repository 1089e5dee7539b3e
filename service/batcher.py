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

from models.batching import length_batches, shared_prefix_batches

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """More sequences than `max_queued` would wait: refuse at once."""


class BatchObserver(Protocol):
    def batch(self, size: int, real_tokens: int, padded_tokens: int, seconds: float) -> None: ...
    def queue(self, depth: int) -> None: ...
    def waited(self, seconds: float) -> None: ...


@dataclass
class _Item:
    seq: Sequence[int]
    future: asyncio.Future[float]
    group: object  # sequences of one submit() share a group object
    enqueued: float = field(default_factory=time.perf_counter)


class Batcher:
    """Args:
    run_batch: blocking function scoring a list of token id lists (same order out).
    max_batch_tokens: padded cost budget per pass (longest sequence x count).
    max_batch_size: most sequences per pass.
    max_wait_s: how long to wait for more work when fewer than a full batch are queued.
    max_queued: most sequences waiting; submit() beyond it raises QueueFull.
    max_pad_ratio: cut a batch early rather than let its padded cost pass this ratio of its real tokens
        (None: only the budget counts).
    share_prefixes: the runtime computes a token prefix shared by sequences of one pass once (K
        answers to one prompt, within or across requests): keep such groups in one batch, costed at
        their prefix once plus each member's own tokens. `min_prefix` is the shortest prefix that counts.
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
    ) -> None:
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

    async def submit(self, seqs: Sequence[Sequence[int]]) -> list[float]:
        """Score sequences; raises QueueFull at once when admitting them would pass `max_queued`.

        If the caller is cancelled (client gone, deadline), its queued sequences are dropped before
        they are computed.
        """
        if not seqs:
            return []
        if self._closing:
            raise QueueFull("the service is shutting down")
        if len(self._pending) + len(seqs) > self.max_queued:
            raise QueueFull(f"{len(self._pending)} sequences are queued; the limit is {self.max_queued}")
        loop = asyncio.get_running_loop()
        group = object()
        items = [_Item(s, loop.create_future(), group) for s in seqs]
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
        if self.share_prefixes:
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
            for batch in self._split(window):
                live = [i for i in batch if not i.future.done()]
                if not live:
                    continue
                now = time.perf_counter()
                if self._observer:
                    for i in live:
                        self._observer.waited(now - i.enqueued)
                seqs = [i.seq for i in live]
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
                if self._observer:
                    longest = max(len(s) for s in seqs)
                    self._observer.batch(
                        len(seqs), sum(len(s) for s in seqs), longest * len(seqs), time.perf_counter() - t0
                    )
                for i, s in zip(live, scores, strict=True):
                    if not i.future.done():
                        i.future.set_result(s)
