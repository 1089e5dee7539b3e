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


def shared_prefix_rewards(model: RewardModel, prefix: Sequence[int], suffixes: Sequence[Sequence[int]]) -> torch.Tensor:
    """Rewards of prefix + suffix_k for each k, running the prefix once. (K,) float32.

    Gradients flow through the prefix's pass from every suffix (for training).
    """
    body = model.body
    dev = model.device
    key = _cache_kwarg(body)
    p = len(prefix)
    k = len(suffixes)
    prefix_ids = torch.tensor([list(prefix)], dtype=torch.long, device=dev)  # (1, P)
    out = body(
        input_ids=prefix_ids,
        attention_mask=torch.ones_like(prefix_ids),
        position_ids=torch.arange(p, device=dev)[None],
        use_cache=True,
    )
    cache = getattr(out, "cache", None) or out.past_key_values
    cache.batch_repeat_interleave(k)
    s = max(len(x) for x in suffixes)
    ids = torch.zeros((k, s), dtype=torch.long, device=dev)
    mask = torch.zeros((k, p + s), dtype=torch.long, device=dev)
    mask[:, :p] = 1
    for i, x in enumerate(suffixes):
        ids[i, : len(x)] = torch.as_tensor(list(x), dtype=torch.long)
        mask[i, p : p + len(x)] = 1
    pos = (p + torch.arange(s, device=dev))[None].expand(k, s)
    out2 = body(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, **{key: cache})
    h = out2.last_hidden_state  # (K, S, H)
    last = torch.tensor([len(x) - 1 for x in suffixes], device=dev)
    return model.head(h[torch.arange(k, device=dev), last].float()).squeeze(-1)
