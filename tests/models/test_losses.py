from __future__ import annotations

import math

import torch

from models.losses import centering_loss, listwise_loss, pairwise_loss


def test_pairwise_loss_values_and_per_prompt_weighting() -> None:
    r = torch.tensor([2.0, 0.0, 1.0, 3.0, -1.0])
    # prompt 0: responses 0>1; prompt 1: 2>3>4 (3 pairs)
    better, worse = torch.tensor([0, 2, 2, 3]), torch.tensor([1, 3, 4, 4])
    group = torch.tensor([0, 1, 1, 1])
    loss, acc = pairwise_loss(r, better, worse, group)
    ls = lambda d: -math.log(1 / (1 + math.exp(-d)))  # noqa: E731
    expect = (ls(2.0) + (ls(-2.0) + ls(2.0) + ls(4.0)) / 3) / 2
    assert math.isclose(loss.item(), expect, rel_tol=1e-6)
    assert acc.item() == 0.75
    lm, _ = pairwise_loss(r, better, worse, group, margin=torch.full((4,), 1.0))
    assert lm.item() > loss.item()


def test_listwise_loss_two_items_equals_pairwise() -> None:
    r = torch.tensor([0.3, -0.2], requires_grad=True)
    pl = listwise_loss(r, torch.tensor([0, 1]), torch.tensor([0, 0]))
    pw, _ = pairwise_loss(r, torch.tensor([0]), torch.tensor([1]), torch.tensor([0]))
    assert math.isclose(pl.item(), pw.item(), rel_tol=1e-6)
    pl.backward()
    assert r.grad is not None and r.grad[0] < 0 < r.grad[1]


def test_listwise_plackett_luce_three() -> None:
    r = torch.tensor([1.0, 2.0, 0.5])
    ranks = torch.tensor([1, 0, 2])  # order: 1, 0, 2
    expect = -(2.0 - math.log(math.exp(1) + math.exp(2) + math.exp(0.5))) - (
        1.0 - math.log(math.exp(1) + math.exp(0.5))
    )
    assert math.isclose(listwise_loss(r, ranks, torch.zeros(3, dtype=torch.long)).item(), expect, rel_tol=1e-6)


def test_centering() -> None:
    assert centering_loss(torch.tensor([1.0, -3.0]), 0.1).item() == 0.5
