from __future__ import annotations

from collections.abc import Sequence

import torch

from models.prefix import group_shared_prefixes, grouped_prefix_rewards, supports_prefix_sharing
from models.reward_model import RewardModel, collate


class TorchRuntime:
    """The reward model in PyTorch (fp32 or bf16 weights), right padding, inference mode.

    With `prefix_sharing`, sequences in a batch that share a long token prefix (K answers to one
    prompt, within a request or across requests) run that prefix once through a KV cache.
    """

    name = "torch"

    def __init__(self, model: RewardModel, pad_id: int, *, prefix_sharing: bool = True, min_prefix: int = 16) -> None:
        self.model = model.eval()
        self.pad_id = pad_id
        self.dtype = {torch.float32: "float32", torch.bfloat16: "bfloat16"}.get(model.dtype, str(model.dtype))
        self.prefix_sharing = prefix_sharing and supports_prefix_sharing(model.body)
        self.min_prefix = min_prefix
        self.shared_sequences = 0  # how many sequences took the shared-prefix path (for tests and metrics)

    @torch.inference_mode()
    def score(self, seqs: Sequence[Sequence[int]]) -> list[float]:
        if not self.prefix_sharing or len(seqs) < 2:
            return self._plain(seqs)
        groups, singles = group_shared_prefixes(seqs, self.min_prefix)
        out = [0.0] * len(seqs)
        rewards = grouped_prefix_rewards(
            self.model, [(seqs[idx[0]][:plen], [seqs[i][plen:] for i in idx]) for plen, idx in groups]
        )
        for (_, idx), vals in zip(groups, rewards, strict=True):
            for i, r in zip(idx, vals.float().tolist(), strict=True):
                out[i] = float(r)
            self.shared_sequences += len(idx)
        if singles:
            for i, r in zip(singles, self._plain([seqs[i] for i in singles]), strict=True):
                out[i] = r
        return out

    def _plain(self, seqs: Sequence[Sequence[int]]) -> list[float]:
        ids, mask = collate(seqs, self.pad_id, "right", self.model.device)
        return [float(x) for x in self.model(ids, mask).float().tolist()]

    def warmup(self) -> None:
        self.score([[self.pad_id] * 8, [self.pad_id] * 4])
