from __future__ import annotations

from collections.abc import Sequence

import torch

from models.reward_model import RewardModel, collate


class TorchRuntime:
    """The reward model in PyTorch (fp32 or bf16 weights), right padding, inference mode."""

    name = "torch"

    def __init__(self, model: RewardModel, pad_id: int) -> None:
        self.model = model.eval()
        self.pad_id = pad_id
        self.dtype = {torch.float32: "float32", torch.bfloat16: "bfloat16"}.get(model.dtype, str(model.dtype))

    @torch.inference_mode()
    def score(self, seqs: Sequence[Sequence[int]]) -> list[float]:
        ids, mask = collate(seqs, self.pad_id, "right", self.model.device)
        return [float(x) for x in self.model(ids, mask).float().tolist()]

    def warmup(self) -> None:
        self.score([[self.pad_id] * 8, [self.pad_id] * 4])
