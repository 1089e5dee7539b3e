"""Batching and schedule: prompts packed into micro-batches under a token budget, the epoch order,
and the learning-rate curve.

InstructGPT batching: every prompt with its K ranked responses is one batch element; each response
is forwarded once and all K-choose-2 pairs of the prompt enter the loss.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from models.evaluate import EncodedExample


@dataclass
class Batch:
    seqs: list[list[int]] = field(default_factory=list)
    better: list[int] = field(default_factory=list)
    worse: list[int] = field(default_factory=list)
    pair_group: list[int] = field(default_factory=list)
    margin: list[float] = field(default_factory=list)
    ranks: list[int] = field(default_factory=list)
    resp_group: list[int] = field(default_factory=list)
    keys: list[tuple[int, int]] = field(default_factory=list)  # (group index, response index) of each sequence

    @classmethod
    def of_keys(cls, groups: Sequence[EncodedExample], keys: Sequence[tuple[int, int]]) -> Batch:
        """Sequences only (no pairs), for scoring: response j of group g for each (g, j)."""
        return cls(seqs=[groups[g].seqs[j] for g, j in keys], keys=list(keys))

    @property
    def padded_tokens(self) -> int:
        return max(len(s) for s in self.seqs) * len(self.seqs)

    @property
    def real_tokens(self) -> int:
        return sum(len(s) for s in self.seqs)

    def tensor(self, name: str, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
        """One index or value list (better, worse, pair_group, margin, ranks, resp_group) as a tensor."""
        return torch.tensor(getattr(self, name), device=device, dtype=dtype)


def make_batches(groups: Sequence[EncodedExample], batch_tokens: int) -> list[list[int]]:
    """Group indices packed by length: padded cost (longest x sequences) stays under `batch_tokens`
    (a group bigger than the budget goes alone)."""
    order = sorted(range(len(groups)), key=lambda i: max(len(s) for s in groups[i].seqs))
    batches: list[list[int]] = []
    cur: list[int] = []
    cur_len = cur_n = 0
    for i in order:
        g = groups[i]
        longest = max(cur_len, max(len(s) for s in g.seqs))
        if cur and longest * (cur_n + len(g.seqs)) > batch_tokens:
            batches.append(cur)
            cur, cur_n, longest = [], 0, max(len(s) for s in g.seqs)
        cur.append(i)
        cur_n += len(g.seqs)
        cur_len = longest
    if cur:
        batches.append(cur)
    return batches


def build_batch(groups: Sequence[EncodedExample], idx: Sequence[int]) -> Batch:
    b = Batch()
    for gi, i in enumerate(idx):
        g = groups[i]
        base = len(b.seqs)
        b.seqs.extend(g.seqs)
        b.keys.extend((i, j) for j in range(len(g.seqs)))
        b.ranks.extend(g.example.ranks)
        b.resp_group.extend([gi] * len(g.seqs))
        for w, lo in g.example.pairs():
            b.better.append(base + w)
            b.worse.append(base + lo)
            b.pair_group.append(gi)
            b.margin.append(g.example.margin)
    return b


def micro_batch_stream(n_batches: int, epochs: float, seed: int) -> Iterator[tuple[int, int]]:
    """(epoch, batch index) in training order: each epoch a seeded shuffle; a fractional last epoch."""
    total = math.ceil(n_batches * epochs)
    k = 0
    epoch = 0
    while k < total:
        order = list(range(n_batches))
        random.Random(seed * 1000003 + epoch).shuffle(order)
        for b in order:
            if k >= total:
                return
            yield epoch, b
            k += 1
        epoch += 1


def lr_lambda(total_steps: int, warmup_frac: float) -> Callable[[int], float]:
    """Multiplier of the peak learning rate: linear warmup, then cosine decay to 10%."""
    warm = max(1, int(total_steps * warmup_frac))

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        prog = (step - warm) / max(1, total_steps - warm)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, prog)))

    return f
