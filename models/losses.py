"""Losses: pure functions of reward tensors."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def pairwise_loss(
    rewards: torch.Tensor,
    better: torch.Tensor,
    worse: torch.Tensor,
    group: torch.Tensor,
    margin: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """InstructGPT's pairwise loss over all K-choose-2 pairs of each prompt.

    Args:
        rewards: (N,) one reward per response in the batch.
        better, worse: (P,) response indices into `rewards` of each pair's better and worse side.
        group: (P,) the prompt (batch element) each pair belongs to, 0..G-1.
        margin: (P,) optional margins: loss is -log sigmoid(r_w - r_l - margin).
        label_smoothing: eps in [0, 0.5): the Bradley-Terry target P(better wins) is 1 - eps, so each
            pair's loss is -(1 - eps) log sigmoid(d) - eps log sigmoid(-d), d = r_w - r_l - margin
            (its least value is at d = log((1 - eps) / eps), so rewards stop drifting apart).
    Returns:
        (loss, accuracy): the loss averages pairs within each prompt, then prompts (each prompt
        weighs the same, the 1 / C(K, 2) of InstructGPT); accuracy is the fraction of pairs with
        r_w > r_l (ties count 0.5).
    """
    diff = rewards[better] - rewards[worse]  # (P,)
    m = margin if margin is not None else torch.zeros_like(diff)
    d = diff - m  # (P,)
    per_pair = -F.logsigmoid(d)  # (P,)
    if label_smoothing:
        per_pair = (1 - label_smoothing) * per_pair - label_smoothing * F.logsigmoid(-d)
    g = int(group.max().item()) + 1
    sums = torch.zeros(g, dtype=per_pair.dtype, device=per_pair.device).index_add(0, group, per_pair)
    counts = torch.zeros(g, dtype=per_pair.dtype, device=per_pair.device).index_add(0, group, torch.ones_like(per_pair))
    loss = (sums / counts.clamp(min=1)).mean()
    return loss, pair_accuracy(rewards, better, worse)


def pair_accuracy(rewards: torch.Tensor, better: torch.Tensor, worse: torch.Tensor) -> torch.Tensor:
    """Fraction of pairs with r_better > r_worse, ties counting 0.5. (N,), (P,), (P,) -> scalar, detached."""
    diff = (rewards[better] - rewards[worse]).detach()  # (P,)
    return ((diff > 0).float() + 0.5 * (diff == 0).float()).mean()


def listwise_loss(rewards: torch.Tensor, ranks: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    """Plackett-Luce negative log-likelihood of each prompt's ranking, averaged over prompts.

    Args:
        rewards: (N,) rewards; ranks: (N,) rank of each response within its prompt (0 = best);
        group: (N,) prompt index 0..G-1 of each response.
    For each response i, the term is r_i - logsumexp(r_j over responses j of the same prompt with
    rank_j >= rank_i); the worst-ranked term is constant and is left out. Ties share a denominator.
    """
    same = group[:, None] == group[None, :]  # (N, N)
    at_or_below = ranks[None, :] >= ranks[:, None]  # (N, N): j ranked at or below i
    allowed = same & at_or_below
    scores = rewards[None, :].expand(len(rewards), -1).masked_fill(~allowed, float("-inf"))  # (N, N)
    log_norm = torch.logsumexp(scores, dim=1)  # (N,)
    nll = -(rewards - log_norm)  # (N,)
    # Drop terms whose denominator holds only the item itself (the last place): they are exactly 0.
    informative = allowed.sum(dim=1) > 1
    nll = nll * informative
    g = int(group.max().item()) + 1
    per_group = torch.zeros(g, dtype=nll.dtype, device=nll.device).index_add(0, group, nll)
    return per_group.mean()


def centering_loss(rewards: torch.Tensor, coef: float) -> torch.Tensor:
    """Reward-centering term coef * mean(r^2), which keeps rewards near zero. (N,) -> scalar."""
    return coef * rewards.pow(2).mean()
