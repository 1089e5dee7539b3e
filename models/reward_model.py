"""The reward model: a trimmed SFT backbone + a scalar head read at the last real token."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from models.backbone import BackboneInfo, load_backbone
from models.checkpoints.metadata import (
    BODY_WEIGHTS,
    CONFIG_NAME,
    FORMAT_VERSION,
    HEAD_WEIGHTS,
    ModelDirError,
    RewardConfig,
    read_config,
    read_json_object,
)
from models.formatting import RMSERVE_RULE, Formatter, RewardRule, Truncation
from models.head import ScoreHead

log = logging.getLogger(__name__)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that ignore left padding: 0 at each row's first real token.  (B, T) -> (B, T)"""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of each row's last real token, from the mask alone (works for left and right padding).

    (B, T) -> (B,). Written as a max over (mask * position) rather than an ArgMax so that ONNX
    Runtime accepts the exported graph.
    """
    t = attention_mask.shape[-1]
    positions = torch.arange(1, t + 1, device=attention_mask.device, dtype=torch.long)  # (T,)
    return (attention_mask.long() * positions).amax(dim=-1) - 1


def collate(
    seqs: Sequence[Sequence[int]], pad_id: int, side: str = "right", device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad token id lists into (input_ids, attention_mask), each (B, T)."""
    if not seqs:
        raise ValueError("collate needs at least one sequence")
    t = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), t), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), t), dtype=torch.long)
    for i, s in enumerate(seqs):
        n = len(s)
        if n == 0:
            raise ValueError(f"sequence {i} is empty")
        if side == "right":
            ids[i, :n] = torch.as_tensor(list(s), dtype=torch.long)
            mask[i, :n] = 1
        else:
            ids[i, t - n :] = torch.as_tensor(list(s), dtype=torch.long)
            mask[i, t - n :] = 1
    return ids.to(device), mask.to(device)


class RewardModel(nn.Module):
    """Trimmed backbone (transformer body) + Linear(hidden, 1) head on the last real token's state.

    The head (`score` in saved checkpoints) is bias-free, as every standard reward head; models saved
    before issue 22 load with their bias. The head stays in float32 whatever the body's dtype, so rewards
    are read out at full precision. Where the last token is, and what text precedes it, is the
    checkpoint's `RewardRule` (config.rule), applied by the Formatter.
    """

    body: Any  # a transformers PreTrainedModel body (or a peft wrapper of one while training LoRA)

    def __init__(self, body: Any, config: RewardConfig, head: nn.Linear | None = None) -> None:
        super().__init__()
        self.body = body
        self.config = config
        hidden = int(body.config.hidden_size)
        self.head = head if head is not None else ScoreHead(hidden)
        if head is None:
            nn.init.normal_(self.head.weight, std=1.0 / (hidden + 1) ** 0.5)
        self.head.float()

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def from_backbone(
        cls,
        path: str | Path,
        *,
        dtype: str | torch.dtype = "float32",
        max_length: int = 1024,
        truncation: Truncation = "left",
        trust_remote_code: bool = False,
        seed: int | None = 0,
    ) -> tuple[RewardModel, Any]:
        """A new reward model (fresh head) on a backbone; returns (model, tokenizer)."""
        body, tokenizer, info = load_backbone(path, dtype=dtype, trust_remote_code=trust_remote_code)
        return cls.from_body(body, tokenizer, info, max_length=max_length, truncation=truncation, seed=seed)

    @classmethod
    def from_body(
        cls,
        body: Any,
        tokenizer: Any,
        info: BackboneInfo | None = None,
        *,
        max_length: int = 1024,
        truncation: Truncation = "left",
        seed: int | None = 0,
    ) -> tuple[RewardModel, Any]:
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        cfg = RewardConfig(
            backbone=info.source if info else str(getattr(body.config, "_name_or_path", "unknown")),
            model_type=str(body.config.model_type),
            hidden_size=int(body.config.hidden_size),
            max_length=max_length,
            truncation=truncation,
            backbone_info=info.to_dict() if info else {},
            rule=RMSERVE_RULE.to_dict(),  # recorded: a fresh model's ids are the whole text's (RewardRule.whole_text)
        )
        if seed is not None:
            torch.manual_seed(seed)
        return cls(body, cfg), tokenizer

    # -- forward --------------------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        return next(self.body.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.body.parameters()).device

    def hidden_at_last(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, T) ids and mask -> (B, H) hidden state of each row's last real token."""
        out = self.body(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids_from_mask(attention_mask),
            use_cache=False,
        )
        h = out.last_hidden_state  # (B, T, H)
        last = last_token_index(attention_mask)  # (B,)
        return h[torch.arange(h.shape[0], device=h.device), last]  # (B, H)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, T) ids and mask -> (B,) rewards (float32)."""
        # a fresh tensor, not a view of the head's (B, 1) output: FSDP2 warns about (and cannot hook
        # gradients of) a view returned by the module it wraps; copying B floats costs nothing
        return self.head(self.hidden_at_last(input_ids, attention_mask).float()).squeeze(-1).clone()

    def normalize(self, rewards: torch.Tensor) -> torch.Tensor:
        n = self.config.normalization
        if not n:
            return rewards
        return (rewards - n["mean"]) / n["std"]

    def formatter(self, tokenizer: Any) -> Formatter:
        rule = RewardRule.from_dict(self.config.rule)
        return Formatter(tokenizer, self.config.max_length, self.config.truncation, rule)

    @torch.inference_mode()
    def score_ids(
        self, seqs: Sequence[Sequence[int]], pad_id: int, *, batch_size: int = 16, side: str = "right"
    ) -> list[float]:
        """Rewards for token id lists, in input order, batched by length to waste little on padding."""
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
        out = [0.0] * len(seqs)
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            ids, mask = collate([seqs[i] for i in idx], pad_id, side, self.device)
            rewards = self(ids, mask).tolist()
            for i, r in zip(idx, rewards, strict=True):
                out[i] = float(r)
        return out

    # -- save / load ----------------------------------------------------------------------------
    def save(self, out_dir: str | Path, tokenizer: Any) -> Path:
        """Write a model directory atomically, readable by other users (models/checkpoints/rmserve.py
        `save`: a transformers *ForSequenceClassification directory + rmserve.json)."""
        from models.checkpoints.files import make_readable
        from models.checkpoints.rmserve import save as save_checkpoint

        out = Path(out_dir)
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
        try:
            save_checkpoint(self, tokenizer, staging)
            for extra in ("MODEL_CARD.md", "metrics.json"):
                if (out / extra).exists() and not (staging / extra).exists():
                    shutil.copy2(out / extra, staging / extra)
            make_readable(staging)
            if out.exists():
                backup = out.with_name(out.name + ".old")
                if backup.exists():
                    shutil.rmtree(backup)
                os.replace(out, backup)
                os.replace(staging, out)
                shutil.rmtree(backup)
            else:
                os.replace(staging, out)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
        return out

    @classmethod
    def load(
        cls,
        model_dir: str | Path,
        *,
        dtype: str | torch.dtype = "float32",
        device: str | torch.device = "cpu",
        trust_remote_code: bool = False,
        format: str | None = None,
    ) -> tuple[RewardModel, Any]:
        """Load a reward checkpoint in any format rmserve reads (models/checkpoints/: rmserve, hf,
        openrlhf), detected from the files unless `format` forces one; every problem is a ModelDirError
        naming the file, what was found and the fix."""
        from models.checkpoints import load

        body, head, cfg, tok = load(
            model_dir, format=format, dtype=dtype, device=device, trust_remote_code=trust_remote_code
        )
        model = cls(body, cfg, head=head)
        model.to(device)
        model.head.float()
        return model.eval(), tok


def check_model_dir(model_dir: str | Path, format: str | None = None) -> RewardConfig | None:
    """Check a checkpoint directory without loading weights (models/checkpoints `check`): every refusal
    `RewardModel.load` would make. Returns rmserve.json's config for rmserve directories, else None."""
    from models.checkpoints import check

    name = check(model_dir, format)
    return read_config(model_dir) if name == "rmserve" else None


__all__ = [
    "BODY_WEIGHTS",
    "CONFIG_NAME",
    "FORMAT_VERSION",
    "HEAD_WEIGHTS",
    "ModelDirError",
    "RewardConfig",
    "RewardModel",
    "check_model_dir",
    "collate",
    "last_token_index",
    "position_ids_from_mask",
    "read_config",
    "read_json_object",
]
