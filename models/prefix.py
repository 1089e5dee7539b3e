"""Shared-prefix scoring: run a common token prefix once with a KV cache, expand the cache over the
K sequences that share it, and run only their suffixes.

Exact (same math, float rounding aside) for any body that accepts a KV cache; the grouping works on
token ids, so a prompt whose tokens merge across the boundary with its answer simply shares fewer
tokens.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Sequence
from typing import Any

import torch

from models.batching import common_prefix_len, group_shared_prefixes, length_batches
from models.reward_model import RewardModel

__all__ = [
    "common_prefix_len",
    "group_shared_prefixes",
    "grouped_prefix_rewards",
    "length_chunks",
    "shared_prefix_rewards",
    "supports_prefix_sharing",
]


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
    return length_batches(lengths, sys.maxsize, sys.maxsize, max_pad_ratio)


def _copyable(cache: Any) -> bool:
    layers = getattr(cache, "layers", None)
    if layers is None or not all(hasattr(x, "keys") and hasattr(x, "values") for x in layers):
        return False
    try:
        from transformers import DynamicCache
    except ImportError:  # pragma: no cover
        return False
    return type(cache) is DynamicCache


def _gathered(cache: Any, rows: torch.Tensor) -> Any:
    """A new cache whose row r is the given (copyable) cache's row rows[r]; indexing keeps the graph
    for training."""
    from transformers import DynamicCache

    return DynamicCache(ddp_cache_data=[(x.keys[rows], x.values[rows]) for x in cache.layers])


def _padded(rows: Sequence[Sequence[int]], dev: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids, their mask and their lengths."""
    width = max(len(x) for x in rows)
    ids = torch.zeros((len(rows), width), dtype=torch.long, device=dev)
    mask = torch.zeros((len(rows), width), dtype=torch.long, device=dev)
    for i, x in enumerate(rows):
        ids[i, : len(x)] = torch.as_tensor(list(x), dtype=torch.long)
        mask[i, : len(x)] = 1
    return ids, mask, mask.sum(1)


def grouped_prefix_rewards(
    model: RewardModel,
    groups: Sequence[tuple[Sequence[int], Sequence[Sequence[int]]]],
    max_pad_ratio: float = 1.3,
) -> list[torch.Tensor]:
    """Rewards of prefix + suffix for each (prefix, suffixes) group, each prefix run once. One (K,)
    float32 tensor per group.

    The prefixes of several groups run together in one batch (length-sorted chunks, right padding);
    the suffixes of all those groups then run in length-sorted chunks, each row on a copy of its own
    prefix's cache row, with position ids that continue its prefix and a mask that hides the prefix
    padding. So many prompts cost a few large passes rather than two small ones each. Gradients flow
    through the prefix passes from every suffix (for training).
    """
    if not groups:
        return []
    body = model.body
    dev = model.device
    key = _cache_kwarg(body)
    out: list[list[torch.Tensor | None]] = [[None] * len(sfx) for _, sfx in groups]
    for pchunk in length_chunks([len(p) for p, _ in groups], max_pad_ratio):
        pids, pmask, plens = _padded([groups[g][0] for g in pchunk], dev)
        width = pids.shape[1]
        res = body(
            input_ids=pids,
            attention_mask=pmask,
            position_ids=torch.arange(width, device=dev)[None].expand(len(pchunk), width),
            use_cache=True,
        )
        cache = getattr(res, "cache", None) or res.past_key_values
        # every (group, answer) of this chunk: its prefix row and its suffix
        members = [(r, g, k) for r, g in enumerate(pchunk) for k in range(len(groups[g][1]))]
        suffixes = [groups[g][1][k] for _, g, k in members]
        schunks = length_chunks([len(x) for x in suffixes], max_pad_ratio)
        copyable = _copyable(cache)
        if not copyable and len(pchunk) > 1:  # a cache this code cannot copy: one group at a time
            for g in pchunk:
                out[g] = list(grouped_prefix_rewards(model, [groups[g]], max_pad_ratio)[0])
            continue
        for schunk in schunks if copyable else [list(range(len(members)))]:
            rows = torch.tensor([members[i][0] for i in schunk], device=dev)
            if copyable:
                chunk_cache = _gathered(cache, rows)
            else:  # one group, all its answers in one pass on the cache repeated in place
                cache.batch_repeat_interleave(len(schunk))
                chunk_cache = cache
            sids, smask, slens = _padded([suffixes[i] for i in schunk], dev)
            s = sids.shape[1]
            mask = torch.cat([pmask[rows], smask], dim=1)
            pos = plens[rows][:, None] + torch.arange(s, device=dev)[None]
            res2 = body(input_ids=sids, attention_mask=mask, position_ids=pos, use_cache=True, **{key: chunk_cache})
            h = res2.last_hidden_state  # (n, S, H)
            vals = model.head(h[torch.arange(len(schunk), device=dev), slens - 1].float()).squeeze(-1)
            for i, v in zip(schunk, vals, strict=True):
                _, g, k = members[i]
                out[g][k] = v
    return [torch.stack([v for v in vs if v is not None]) for vs in out]


def shared_prefix_rewards(
    model: RewardModel, prefix: Sequence[int], suffixes: Sequence[Sequence[int]], max_pad_ratio: float = 1.3
) -> torch.Tensor:
    """Rewards of prefix + suffix_k for each k, running the prefix once. (K,) float32."""
    return grouped_prefix_rewards(model, [(prefix, suffixes)], max_pad_ratio)[0]
