"""Length-sorted batching under a padded-token budget: pure Python, shared by the trainer's
evaluation and the service's batcher (which must not import torch)."""

from __future__ import annotations

from collections.abc import Sequence


def length_batches(lengths: Sequence[int], batch_tokens: int, max_seqs: int = 256) -> list[list[int]]:
    """Indices grouped into batches whose padded cost (longest x count) stays under `batch_tokens`."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches: list[list[int]] = []
    cur: list[int] = []
    for i in order:
        if cur and (lengths[i] * (len(cur) + 1) > batch_tokens or len(cur) >= max_seqs):
            batches.append(cur)
            cur = []
        cur.append(i)
    if cur:
        batches.append(cur)
    return batches
