"""Batch -> rewards (plain, from the frozen-layer cache, or with shared prompt prefixes), the loss on
them, and the dev evaluation."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from models.evaluate import EncodedExample, metrics_from_scores, score_encoded
from models.losses import centering_loss, listwise_loss, pair_accuracy, pairwise_loss
from models.reward_model import RewardModel, collate
from models.train.batches import Batch, build_batch, make_batches
from models.train.config import TrainConfig

if TYPE_CHECKING:
    from models.frozen_cache import Features


def _in_order(pieces: Sequence[torch.Tensor], order: Sequence[int]) -> torch.Tensor:
    """Concatenated pieces whose rows are the sequences `order` names, put back in sequence order."""
    vals = torch.cat(list(pieces))  # (N,) in `order`
    return vals[torch.argsort(torch.tensor(order, device=vals.device))]


class Scorer:
    """Batch -> rewards, either through the whole model or from cached frozen-layer states."""

    def __init__(
        self, fwd: nn.Module, model: RewardModel, pad_id: int, device: torch.device, amp: torch.dtype | None
    ) -> None:
        self.fwd, self.model, self.pad_id, self.device, self.amp = fwd, model, pad_id, device, amp
        # id(groups list) -> (states by flat response index, first flat index of each group)
        self.cache: dict[int, tuple[Features, list[int]]] = {}
        self.n_top = 0
        self.one_pass = False  # one forward per backward (DDP's reducer, FSDP's hooks expect it)
        self.prefix_sharing = False  # run each prompt once for all its responses (KV cache, gradients flow)
        self.shared_sequences = 0  # how many sequences took the shared-prefix path

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        return torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None)

    def build_cache(
        self,
        groups_lists: Sequence[Sequence[EncodedExample]],
        n_top: int,
        batch_tokens: int,
        *,
        cache_dir: Path | None = None,
        key: dict[str, Any] | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> int:
        """Frozen bottom layers' states of every response of each groups list, from `cache_dir` when it
        holds them (see models.frozen_cache.cached_features); returns how many sequences were computed."""
        from models.frozen_cache import cached_features

        self.n_top = n_top
        computed = 0
        for groups in groups_lists:
            if id(groups) in self.cache:
                continue
            flat = [s for g in groups for s in g.seqs]
            with self.autocast():
                feats, n = cached_features(
                    self.model,
                    flat,
                    n_top,
                    self.pad_id,
                    cache_dir=cache_dir,
                    key=key or {},
                    dtype=dtype,
                    batch_tokens=batch_tokens,
                )
            starts = [0]
            for g in groups:
                starts.append(starts[-1] + len(g.seqs))
            self.cache[id(groups)] = (feats, starts)
            computed += n
        return computed

    def rewards(self, groups: Sequence[EncodedExample], batch: Batch) -> torch.Tensor:
        if id(groups) in self.cache:
            from models.frozen_cache import rewards_from_features

            feats, starts = self.cache[id(groups)]
            with self.autocast():
                states = [feats[starts[g] + j] for g, j in batch.keys]
                return rewards_from_features(self.model, states, self.n_top).float()
        if self.prefix_sharing:
            return self._shared_rewards(batch)
        with self.autocast():
            return self._plain(batch.seqs)

    def _plain(self, seqs: Sequence[Sequence[int]]) -> torch.Tensor:
        """(N,) rewards through the whole model. On one process the sequences run in length-sorted
        chunks whose padding stays within 1.3x of their real tokens; under DDP or FSDP in one pass
        (`one_pass`: their hooks expect one forward per backward)."""
        from models.prefix import length_chunks

        chunks = [list(range(len(seqs)))] if self.one_pass else length_chunks([len(s) for s in seqs])
        pieces, order = [], []
        for chunk in chunks:
            ids, mask = collate([seqs[i] for i in chunk], self.pad_id, "right", self.device)
            pieces.append(self.fwd(ids, mask).float())
            order.extend(chunk)
        return _in_order(pieces, order)

    def _shared_rewards(self, batch: Batch) -> torch.Tensor:
        """Sequences of the batch that share a token prefix (a prompt's K responses) run it once, their
        own tokens on its KV cache; the others go through the plain batched pass."""
        from models.prefix import group_shared_prefixes, grouped_prefix_rewards

        shared, plain = group_shared_prefixes(batch.seqs, min_prefix=16, min_saved=16)
        order = [i for _, idx in shared for i in idx]
        self.shared_sequences += len(order)
        with self.autocast():
            parts = [(batch.seqs[idx[0]][:plen], [batch.seqs[i][plen:] for i in idx]) for plen, idx in shared]
            pieces = [r.float() for r in grouped_prefix_rewards(self.model, parts)]
            if plain:
                pieces.append(self._plain([batch.seqs[p] for p in plain]))
                order.extend(plain)
        return _in_order(pieces, order)


def batch_loss(rewards: torch.Tensor, batch: Batch, cfg: TrainConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, pair accuracy) of one micro-batch's (N,) rewards under `cfg.loss` (+ the centering term)."""
    terms = batch_terms(rewards, batch, cfg)
    loss = terms.main / terms.prompts
    if terms.center is not None:
        loss = loss + terms.center / terms.responses
    return loss, torch.tensor(terms.correct / max(1, terms.pairs))


@dataclass
class LossTerms:
    """One micro-batch's loss as sums, so that a step can average them over all its micro-batches on
    every rank: `main` sums the per-prompt loss (pairwise: the mean over the prompt's pairs, as in
    InstructGPT; listwise: the prompt's Plackett-Luce NLL) over `prompts`; `center` sums coef * r^2
    over `responses` (None without --center-coef); `correct` counts the pairs ranked right (ties 0.5)
    among `pairs`."""

    main: torch.Tensor  # scalar, with gradient
    center: torch.Tensor | None  # scalar, with gradient
    correct: float
    prompts: int
    responses: int
    pairs: int


def batch_terms(rewards: torch.Tensor, batch: Batch, cfg: TrainConfig) -> LossTerms:
    """The loss terms of one micro-batch's (N,) rewards under `cfg.loss` (+ the centering term)."""
    dev = rewards.device
    better, worse = batch.tensor("better", dev), batch.tensor("worse", dev)
    prompts = max(batch.resp_group) + 1
    if not batch.better:  # no pairs (single responses): nothing to learn, but the graph stays whole
        main = rewards.sum() * 0.0
        acc = torch.zeros(())
    elif cfg.loss == "pairwise":
        margin = batch.tensor("margin", dev, torch.float32)
        group = batch.tensor("pair_group", dev)
        mean, acc = pairwise_loss(rewards, better, worse, group, margin, label_smoothing=cfg.label_smoothing)
        # pairwise_loss averages over max(pair_group) + 1 prompts; a trailing prompt without pairs
        # (a single response) would not be counted there, so undo its mean over its own count.
        main = mean * (int(max(batch.pair_group)) + 1)
    else:
        main = listwise_loss(rewards, batch.tensor("ranks", dev), batch.tensor("resp_group", dev)) * prompts
        acc = pair_accuracy(rewards, better, worse)
    center = centering_loss(rewards, cfg.center_coef) * len(rewards) if cfg.center_coef else None
    pairs = len(batch.better)
    return LossTerms(main, center, float(acc.item()) * pairs, prompts, len(rewards), pairs)


def evaluate_dev(
    model: RewardModel, dev: Sequence[EncodedExample], scorer: Scorer, batch_tokens: int
) -> dict[str, Any]:
    """Dev metrics (models.evaluate.metrics_from_scores): from the frozen cache when it holds the dev
    set, else through the model exactly as `rmserve eval` scores it."""
    was_training = model.training
    model.eval()
    if id(dev) in scorer.cache:
        per: dict[int, list[float]] = {}
        with torch.no_grad():
            for idx in make_batches(dev, batch_tokens * 2):
                b = build_batch(dev, idx)
                for (g, _j), r in zip(b.keys, scorer.rewards(dev, b).tolist(), strict=True):
                    per.setdefault(g, []).append(r)
        scores = [per[g] for g in range(len(dev))]
    else:
        scores = score_encoded(
            model,
            dev,
            scorer.pad_id,
            batch_tokens=batch_tokens * 2,
            autocast_dtype=scorer.amp,
            forward="padded" if is_sharded(model) else "canonical",
        )
    model.train(was_training)
    out = metrics_from_scores([g.example for g in dev], scores)
    out["mode"] = eval_mode(model, cached=id(dev) in scorer.cache)
    return out


def is_sharded(model: RewardModel) -> bool:
    """True when FSDP has sharded the model (its parameters are DTensors). The canonical forward calls
    the body's modules outside FSDP's root hooks, which would meet sharded weights, so a sharded model's
    dev rewards go through the wrapped model's own (padded) forward."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def eval_mode(model: RewardModel, cached: bool) -> str:
    """The scoring mode dev rewards were computed in (what the model card records)."""
    from models.canonical import supports

    dtype = {torch.float32: "float32", torch.bfloat16: "bfloat16"}.get(model.dtype, str(model.dtype))
    if cached:
        return f"frozen-layer cache ({dtype}, padded)"
    canonical = supports(model.body) and not is_sharded(model)
    return f"torch-{'canonical' if canonical else 'padded'}-{dtype}"
