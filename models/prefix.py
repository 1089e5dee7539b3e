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

    The prefixes of several groups run together (length-sorted chunks, right padding); their caches
    are joined, padded to the longest prefix; the suffixes of all groups then run in length-sorted
    chunks, each row on a copy of its own prefix's cache row, with position ids that continue its
    prefix and a mask that hides the prefix padding. So many prompts cost a few large passes rather
    than two small ones each. Gradients flow through the prefix passes from every suffix (for
    training).
    """
    if not groups:
        return []
    body = model.body
    dev = model.device
    key = _cache_kwarg(body)
    out: list[list[torch.Tensor | None]] = [[None] * len(sfx) for _, sfx in groups]
    # 1. The prefixes, in length-sorted chunks (padding costs a whole token through every layer).
    parts = []  # (groups of the chunk, cache, prefix mask, prefix lengths)
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
        if not _copyable(cache):  # a cache this code cannot copy: each group alone, the cache repeated in place
            if len(groups) > 1:
                return [grouped_prefix_rewards(model, [g], max_pad_ratio)[0] for g in groups]
            cache.batch_repeat_interleave(len(groups[0][1]))
            k = len(groups[0][1])
            return [_suffix_pass(model, key, cache, pmask.expand(k, -1), plens.expand(k), groups[0][1])]
        parts.append((pchunk, cache, pmask, plens))
    # 2. One cache over all prefixes, padded to the longest (padded keys are masked; they cost only
    # attention, not the MLPs), so that the answers of all groups run in as few chunks as possible.
    width = max(p[2].shape[1] for p in parts)
    n_layers = len(parts[0][1].layers)
    keys = [torch.cat([_pad_seq(p[1].layers[i].keys, width) for p in parts]) for i in range(n_layers)]
    values = [torch.cat([_pad_seq(p[1].layers[i].values, width) for p in parts]) for i in range(n_layers)]
    pmask = torch.cat([torch.nn.functional.pad(p[2], (0, width - p[2].shape[1])) for p in parts])
    plens = torch.cat([p[3] for p in parts])
    row_of = {g: r for r, g in enumerate(g for p in parts for g in p[0])}
    members = [(row_of[g], g, k) for g in range(len(groups)) for k in range(len(groups[g][1]))]
    suffixes = [groups[g][1][k] for _, g, k in members]
    from transformers import DynamicCache

    for schunk in length_chunks([len(x) for x in suffixes], max_pad_ratio):
        rows = torch.tensor([members[i][0] for i in schunk], device=dev)
        chunk_cache = DynamicCache(ddp_cache_data=[(k[rows], v[rows]) for k, v in zip(keys, values, strict=True)])
        vals = _suffix_pass(model, key, chunk_cache, pmask[rows], plens[rows], [suffixes[i] for i in schunk])
        for i, v in zip(schunk, vals, strict=True):
            _, g, k = members[i]
            out[g][k] = v
    return [torch.stack([v for v in vs if v is not None]) for vs in out]


def _pad_seq(x: torch.Tensor, width: int) -> torch.Tensor:
    """(B, heads, P, D) padded with zeros to P = width."""
    return torch.nn.functional.pad(x, (0, 0, 0, width - x.shape[2])) if x.shape[2] < width else x


def _suffix_pass(
    model: RewardModel,
    key: str,
    cache: Any,
    pmask: torch.Tensor,
    plens: torch.Tensor,
    suffixes: Sequence[Sequence[int]],
) -> torch.Tensor:
    """Rewards of each suffix row on its prefix cache row: positions continue the prefix, the mask
    hides the prefix's padding. (n,) float32."""
    dev = model.device
    sids, smask, slens = _padded(suffixes, dev)
    mask = torch.cat([pmask, smask], dim=1)
    pos = plens[:, None] + torch.arange(sids.shape[1], device=dev)[None]
    h = model.body(input_ids=sids, attention_mask=mask, position_ids=pos, use_cache=True, **{key: cache})
    last = h.last_hidden_state[torch.arange(len(suffixes), device=dev), slens - 1]
    return model.head(last.float()).squeeze(-1)


def shared_prefix_rewards(
    model: RewardModel, prefix: Sequence[int], suffixes: Sequence[Sequence[int]], max_pad_ratio: float = 1.3
) -> torch.Tensor:
    """Rewards of prefix + suffix_k for each k, running the prefix once. (K,) float32."""
    return grouped_prefix_rewards(model, [(prefix, suffixes)], max_pad_ratio)[0]
