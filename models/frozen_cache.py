"""Frozen-bottom feature caching for top-N fine-tuning.

With `--method top-n` the bottom L - N layers never change, so their output for each training
sequence is computed once (inference mode) and kept in memory; every epoch and every dev evaluation
then runs only the top N layers on the cached states. Exact for decoder bodies that feed
`inputs_embeds` straight into their layers (Llama, Mistral, Qwen2/3): tested against the full model.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from models.batching import length_batches
from models.reward_model import RewardModel, collate, last_token_index, position_ids_from_mask

SUPPORTED = ("llama", "mistral", "qwen2", "qwen3")


def supports_cache(body: Any) -> bool:
    return str(getattr(body.config, "model_type", "")) in SUPPORTED and isinstance(
        getattr(body, "layers", None), nn.ModuleList
    )


@contextmanager
def only_layers(body: Any, layers: Sequence[nn.Module]) -> Iterator[None]:
    """Temporarily run the body with a subset of its decoder layers (same module objects)."""
    full = body.layers
    body.layers = nn.ModuleList(layers)
    try:
        yield
    finally:
        body.layers = full


@torch.inference_mode()
def frozen_features(
    model: RewardModel, seqs: Sequence[Sequence[int]], n_top: int, pad_id: int, batch_tokens: int = 8192
) -> list[torch.Tensor]:
    """Output of layer L - n_top for each sequence: a list of (T_i, H) float32 tensors."""
    body = model.body
    layers = list(body.layers)
    k = len(layers) - n_top
    if k < 1:
        raise ValueError(f"caching needs at least one frozen layer; top-n {n_top} of {len(layers)} leaves none")
    captured: dict[str, torch.Tensor] = {}

    def hook(_m: nn.Module, _i: Any, out: Any) -> None:
        captured["h"] = out[0] if isinstance(out, tuple) else out

    from tqdm import tqdm

    handle = layers[k - 1].register_forward_hook(hook)
    out: list[torch.Tensor] = [torch.empty(0)] * len(seqs)
    batches = length_batches([len(s) for s in seqs], batch_tokens)
    bar = tqdm(total=sum(len(s) for s in seqs), desc="cache frozen layers", unit="tok", mininterval=5.0)
    try:
        with only_layers(body, layers[:k]):
            for idx in batches:
                ids, mask = collate([seqs[i] for i in idx], pad_id, "right", model.device)
                body(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask), use_cache=False)
                hs = captured["h"].float()  # (B, T, H)
                for j, i in enumerate(idx):
                    out[i] = hs[j, : len(seqs[i])].detach().cpu().clone()
                bar.update(sum(len(seqs[i]) for i in idx))
    finally:
        handle.remove()
        bar.close()
    return out


def rewards_from_features(model: RewardModel, feats: Sequence[torch.Tensor], n_top: int) -> torch.Tensor:
    """Run the top n_top layers, the final norm and the head on cached states: (N,) rewards."""
    body = model.body
    t = max(f.shape[0] for f in feats)
    h = feats[0].shape[1]
    x = torch.zeros(len(feats), t, h, dtype=feats[0].dtype)
    mask = torch.zeros(len(feats), t, dtype=torch.long)
    for i, f in enumerate(feats):
        x[i, : f.shape[0]] = f
        mask[i, : f.shape[0]] = 1
    x, mask = x.to(model.device), mask.to(model.device)
    layers = list(body.layers)
    with only_layers(body, layers[len(layers) - n_top :]):
        out = body(inputs_embeds=x, attention_mask=mask, position_ids=position_ids_from_mask(mask), use_cache=False)
    hs = out.last_hidden_state  # (B, T, H)
    last = last_token_index(mask)  # (B,)
    return model.head(hs[torch.arange(hs.shape[0], device=hs.device), last].float()).squeeze(-1)
