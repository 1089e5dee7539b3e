"""transformers `*ForSequenceClassification` with one label: TRL's RewardTrainer output and downloaded
reward models (Skywork-Reward, ...), any decoder family AutoModel knows.

- Detected: a config.json without rmserve.json or OpenRLHF's `value_head_prefix` (the fallback; its
  checks then say what is wrong with anything else).
- Head: `score.weight` (1, hidden), beside the body's weights under its prefix (`model.`,
  `transformer.`, `gpt_neox.`, stripped by AutoModel). A `score.bias` is ignored, as transformers'
  `GenericForSequenceClassification` builds `score` without a bias (transformers/modeling_layers.py).
- Rule: the chat template over the whole conversation, no generation prompt (TRL,
  trl/trainer/reward_trainer.py `tokenize_fn`; reward-bench builds the same text), read at the last
  token that is not `config.pad_token_id` (`GenericForSequenceClassification.forward`): the formatter
  drops trailing pad ids, so with pad == eos every trailing eos is skipped, as transformers does.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from models.checkpoints.files import (
    CheckpointError,
    Found,
    Loaded,
    head_weight,
    hidden_size,
    load_body,
    load_tokenizer,
    num_labels,
    read_tensor,
    refuse_remote_code,
    require_tokenizer,
    require_weights,
)
from models.checkpoints.metadata import RewardConfig
from models.formatting import RewardRule

log = logging.getLogger(__name__)

NAME = "hf"
HEAD = "score.weight"


def detect(found: Found) -> bool:
    return found.config is not None


def pad_token_id(config: dict[str, Any]) -> int | None:
    """The pad id transformers' forward skips: the text config's `pad_token_id` (None: the last token)."""
    text = config.get("text_config") or {}
    pad = text.get("pad_token_id", config.get("pad_token_id")) if text else config.get("pad_token_id")
    if isinstance(pad, list):
        pad = pad[0] if pad else None
    return None if pad is None else int(pad)


def rule(found: Found) -> RewardRule:
    return RewardRule(NAME, "template", pad_token_id(found.config or {}))


def check(found: Found) -> None:
    """Refuse what is not a one-label sequence classifier, naming what was found and the fix."""
    if found.config is None:
        raise CheckpointError(
            f"{found.dir} has no config.json (found {found.describe()}); give a transformers model folder "
            "or an rmserve model directory"
        )
    refuse_remote_code(found)
    require_weights(found)
    labels = num_labels(found.config)
    if labels != 1 and HEAD in found.keys:
        raise CheckpointError(
            f"{found.dir / 'config.json'} has num_labels {labels} ({', '.join(found.architectures)}): a classifier, "
            "not a reward model; rmserve serves one scalar per answer (num_labels 1)"
        )
    head_weight(found, HEAD, hidden_size(found.config))
    require_tokenizer(found)


def reward_config(found: Found, name: str) -> RewardConfig:
    """rmserve's metadata for a foreign checkpoint, from config.json: a max length from the body's
    positions (at most 4,096), left truncation, no normalization (the format module adds its own)."""
    config = found.config or {}
    text = config.get("text_config") or config
    positions = int(text.get("max_position_embeddings") or text.get("n_positions") or 0)
    return RewardConfig(
        backbone=str(found.dir),
        model_type=str(config.get("model_type", "unknown")),
        hidden_size=hidden_size(config),
        max_length=min(positions, 4096) if positions >= 8 else 4096,
        format=name,
        backbone_info={"source": str(found.dir), "architecture": ", ".join(found.architectures)},
    )


def reward_config_of(found: Found) -> RewardConfig:
    cfg = reward_config(found, NAME)
    cfg.rule = rule(found).to_dict()
    return cfg


def build(weight: torch.Tensor) -> Any:
    """The bias-free head nn.Linear(hidden, 1) holding `weight` (1, hidden), in float32."""
    from models.head import ScoreHead

    head = ScoreHead(int(weight.shape[1]))
    with torch.no_grad():
        head.weight.copy_(weight.float())
    return head


def load(found: Found, *, dtype: Any, device: Any, trust_remote_code: bool = False) -> Loaded:
    """(body, head, rmserve config, tokenizer)."""
    check(found)
    assert found.config is not None
    body = load_body(found, dtype)
    tok = load_tokenizer(found)
    cfg = reward_config_of(found)
    if "score.bias" in found.keys:
        log.warning("%s: score.bias is ignored, as transformers' forward ignores it", found.dir)
    return body, build(read_tensor(found, HEAD)), cfg, tok
