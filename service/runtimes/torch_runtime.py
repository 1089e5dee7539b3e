from __future__ import annotations

from collections.abc import Sequence

import torch

from models.canonical import DEFAULT_TILE_ROWS, canonical_rewards, supports
from models.prefix import group_shared_prefixes, grouped_prefix_rewards, supports_prefix_sharing
from models.reward_model import RewardModel, collate

FORWARDS = ("canonical", "padded")


class TorchRuntime:
    """The reward model in PyTorch (fp32 or bf16 weights), inference mode, in one of two forwards:

    - `canonical` (the default; models/canonical.py): all sequences of a pass packed without padding,
      per-sequence attention, linear layers in fixed row tiles, each prompt (the formatter's
      prompt/answer boundary) computed once as its own segment. A reward is the same bits alone or in
      any batch, on one machine kind and dtype. Its batches cost real tokens (`packed = True`).
    - `padded`: right-padded batches; with `prefix_sharing`, sequences that share a long token prefix run
      it once through a KV cache. Faster on nothing we measured; a reward moves with its batch-mates
      by rounding (fp32) or more (bf16). Used for families the canonical forward does not cover.
    """

    name = "torch"

    def __init__(
        self,
        model: RewardModel,
        pad_id: int,
        *,
        forward: str = "canonical",
        prefix_sharing: bool = True,
        min_prefix: int = 16,
        tile_rows: int = DEFAULT_TILE_ROWS,
    ) -> None:
        if forward not in FORWARDS:
            raise ValueError(f"forward={forward!r}: allowed are {', '.join(FORWARDS)}")
        self.model = model.eval()
        self.pad_id = pad_id
        self.dtype = {torch.float32: "float32", torch.bfloat16: "bfloat16"}.get(model.dtype, str(model.dtype))
        if forward == "canonical" and not supports(model.body):
            forward = "padded"  # a family outside models.canonical.COVERED: not claimed invariant
        self.forward = forward
        self.packed = forward == "canonical"  # the batcher then budgets real tokens
        self.batch_invariant = self.packed  # by construction and tests/models/test_canonical.py
        self.tile_rows = tile_rows
        self.prefix_sharing = self.packed or (
            prefix_sharing and supports_prefix_sharing(model.body)
        )  # canonical: each prompt once per pass, by definition
        self.min_prefix = min_prefix
        self.shared_sequences = 0  # sequences that took a shared-prefix path (for tests and metrics)

    @torch.inference_mode()
    def score(self, seqs: Sequence[Sequence[int]]) -> list[float]:
        if self.forward == "canonical":
            rewards = canonical_rewards(
                self.model.body, self.model.head, seqs, tile_rows=self.tile_rows, pad_id=self.pad_id
            )
            self.shared_sequences += sum(1 for s in seqs if 0 < getattr(s, "prompt_len", 0) < len(s))
            return [float(x) for x in rewards.tolist()]
        if not self.prefix_sharing or len(seqs) < 2:
            return self._plain(seqs)
        groups, singles = group_shared_prefixes(seqs, self.min_prefix)
        out = [0.0] * len(seqs)
        rewards_ = grouped_prefix_rewards(
            self.model, [(seqs[idx[0]][:plen], [seqs[i][plen:] for i in idx]) for plen, idx in groups]
        )
        for (_, idx), vals in zip(groups, rewards_, strict=True):
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
