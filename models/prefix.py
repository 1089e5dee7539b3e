"""Shared-prefix scoring: run a common token prefix once with a KV cache, expand the cache over the
K sequences that share it, and run only their suffixes.

Exact (same math, float rounding aside) for any body that accepts a KV cache; the grouping works on
token ids, so a prompt whose tokens merge across the boundary with its answer simply shares fewer
tokens.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch

from models.reward_model import RewardModel


def common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def group_shared_prefixes(
    seqs: Sequence[Sequence[int]], min_prefix: int = 16, min_saved: int = 32
) -> tuple[list[tuple[int, list[int]]], list[int]]:
    """Split sequence indices into shared-prefix groups and the rest.

    Returns (groups, singles): each group is (prefix length, member indices) with at least two
    members, a prefix of at least `min_prefix` tokens that leaves every member one token or more of
    its own, and at least `min_saved` tokens of work saved; `singles` are the other indices.
    """
    order = sorted(range(len(seqs)), key=lambda i: tuple(seqs[i]))
    groups: list[tuple[int, list[int]]] = []
    singles: list[int] = []
    cur: list[int] = []
    cur_len = 0

    def flush() -> None:
        if len(cur) >= 2 and cur_len >= min_prefix and cur_len * (len(cur) - 1) >= min_saved:
            groups.append((cur_len, list(cur)))
        else:
            singles.extend(cur)

    for i in order:
        if cur:
            lcp = min(cur_len, common_prefix_len(seqs[cur[-1]], seqs[i]), len(seqs[i]) - 1)
            if lcp >= min_prefix:
                cur.append(i)
                cur_len = lcp
                continue
            flush()
        cur = [i]
        cur_len = len(seqs[i]) - 1
    if cur:
        flush()
    return groups, singles


def _cache_kwarg(body: Any) -> str:
    params = inspect.signature(body.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def supports_prefix_sharing(body: Any) -> bool:
    params = inspect.signature(body.forward).parameters
    return ("cache" in params or "past_key_values" in params) and "use_cache" in params


def length_chunks(lengths: Sequence[int], max_pad_ratio: float = 1.3) -> list[list[int]]:
    """Indices sorted by length, cut into chunks whose padded cost (longest x count) stays within
    `max_pad_ratio` of their real tokens: K answers of very different lengths would otherwise all pad
    to the longest one."""
    chunks: list[list[int]] = []
    cur: list[int] = []
    real = 0
    for i in sorted(range(len(lengths)), key=lambda j: lengths[j]):
        if cur and lengths[i] * (len(cur) + 1) > max_pad_ratio * (real + lengths[i]):
            chunks.append(cur)
            cur, real = [], 0
        cur.append(i)
        real += lengths[i]
    if cur:
        chunks.append(cur)
    return chunks


def _expanded(cache: Any, n: int) -> Any:
    """A new cache holding the (batch 1) prefix cache repeated n times; the prefix's graph is kept."""
    layers = getattr(cache, "layers", None)
    if layers is not None and all(hasattr(x, "keys") and hasattr(x, "values") for x in layers):
        try:
            from transformers import DynamicCache

            if type(cache) is DynamicCache:
                return DynamicCache(
                    ddp_cache_data=[(x.keys.expand(n, -1, -1, -1), x.values.expand(n, -1, -1, -1)) for x in layers]
                )
        except (ImportError, TypeError, AttributeError):  # pragma: no cover - other transformers versions
            pass
    return None


def shared_prefix_rewards(
    model: RewardModel, prefix: Sequence[int], suffixes: Sequence[Sequence[int]], max_pad_ratio: float = 1.3
) -> torch.Tensor:
    """Rewards of prefix + suffix_k for each k, running the prefix once. (K,) float32.

    The suffixes run in length-sorted chunks, each on its own copy of the prefix's cache, so that short
    answers do not pad to the longest one. Gradients flow through the prefix's pass from every suffix
    (for training).
    """
    body = model.body
    dev = model.device
    key = _cache_kwarg(body)
    p = len(prefix)
    prefix_ids = torch.tensor([list(prefix)], dtype=torch.long, device=dev)  # (1, P)
    out = body(
        input_ids=prefix_ids,
        attention_mask=torch.ones_like(prefix_ids),
        position_ids=torch.arange(p, device=dev)[None],
        use_cache=True,
    )
    cache = getattr(out, "cache", None) or out.past_key_values
    chunks = length_chunks([len(x) for x in suffixes], max_pad_ratio)
    if len(chunks) > 1 and _expanded(cache, 1) is None:
        chunks = [sorted(i for c in chunks for i in c)]  # a cache this code cannot copy: one pass
    pieces: list[torch.Tensor] = []
    order: list[int] = []
    for chunk in chunks:
        k = len(chunk)
        if len(chunks) == 1:
            cache.batch_repeat_interleave(k)
            chunk_cache = cache
        else:
            chunk_cache = _expanded(cache, k)
        part = [suffixes[i] for i in chunk]
        s = max(len(x) for x in part)
        ids = torch.zeros((k, s), dtype=torch.long, device=dev)
        mask = torch.zeros((k, p + s), dtype=torch.long, device=dev)
        mask[:, :p] = 1
        for i, x in enumerate(part):
            ids[i, : len(x)] = torch.as_tensor(list(x), dtype=torch.long)
            mask[i, p : p + len(x)] = 1
        pos = (p + torch.arange(s, device=dev))[None].expand(k, s)
        out2 = body(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, **{key: chunk_cache})
        h = out2.last_hidden_state  # (k, S, H)
        last = torch.tensor([len(x) - 1 for x in part], device=dev)
        pieces.append(model.head(h[torch.arange(k, device=dev), last].float()).squeeze(-1))
        order.extend(chunk)
    vals = torch.cat(pieces)  # (K,) in chunk order
    return vals[torch.argsort(torch.tensor(order, device=vals.device))]
