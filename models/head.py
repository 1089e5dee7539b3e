"""The reward head: nn.Linear(hidden, 1) (`score` in saved checkpoints), applied row by row."""

from __future__ import annotations

import torch
from torch import nn


class ScoreHead(nn.Linear):
    """nn.Linear(hidden, 1) whose output for a row never depends on the other rows of the batch.

    A (B, H) x (H, 1) matrix product through BLAS can round a row differently by its position in the
    batch (measured: three identical rows gave rewards 1.2e-7 apart); an elementwise product summed over
    H is the same computation for every row. The weights and state_dict keys are nn.Linear's, so
    checkpoints and transformers' `score` are unchanged. (B, H) -> (B, 1).
    """

    def __init__(self, in_features: int, bias: bool = False) -> None:
        super().__init__(in_features, 1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = (x * self.weight[0].to(x.dtype)).sum(-1, keepdim=True)  # (..., H) -> (..., 1)
        return out + self.bias.to(x.dtype) if self.bias is not None else out
