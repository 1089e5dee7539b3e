"""OpenRLHF reward model checkpoints (`openrlhf.cli.train_rm` output).

Read from openrlhf/models/model.py (`get_llm_for_sequence_regression`, `_get_reward_model`) and
openrlhf/cli/train_rm.py, openrlhf/trainer/rm_trainer.py, openrlhf/cli/serve_rm.py, openrlhf/utils/agent.py:

- Detected: config.json has `value_head_prefix` (train_rm saves it), or the weights hold
  `value_head.weight` (older checkpoints), or the architecture is OpenRLHF's `RewardModel` class.
- Head: `<value_head_prefix>.weight`, nn.Linear(hidden, 1, bias=False); `score` today, `value_head`
  in older checkpoints (the prefix defaults to `score`). The body sits under the family's
  `base_model_prefix` (AutoModel strips it).
- Normalization: `mean` / `std` in config.json (rm_trainer.py sets them after evaluation) become the
  model's normalization. OpenRLHF applies them in the forward when `normalize_reward`; rmserve serves
  rewards raw and applies them when asked (`normalize: true`), and on `/get_reward` when config.json
  says `normalize_reward: true`, as `serve_rm --reward.normalize_enable` would.
- Rule: the PPO's remote-reward text: the prompt rendered with the generation prompt
  (openrlhf/datasets/prompts_dataset.py `apply_chat_template(..., add_generation_prompt=True)`), the
  generated answer, then eos (agent.py decodes the observation tokens, eos included); tokenized without
  special tokens (serve_rm.py `tokenize_fn`); the reward is the value at the last attention-mask token
  (`eos_indices` in `RewardModel.forward`), with position ids from the mask.
"""

from __future__ import annotations

from typing import Any

from models.checkpoints.files import (
    CheckpointError,
    Found,
    Loaded,
    head_weight,
    hidden_size,
    load_body,
    load_tokenizer,
    read_tensor,
    refuse_remote_code,
    require_tokenizer,
    require_weights,
)
from models.checkpoints.hf import build, reward_config
from models.checkpoints.metadata import RewardConfig
from models.formatting import RewardRule

NAME = "openrlhf"
DEFAULT_PREFIX = "score"


def detect(found: Found) -> bool:
    cfg = found.config or {}
    return "value_head_prefix" in cfg or "value_head.weight" in found.keys or "RewardModel" in found.architectures


def head_key(found: Found) -> str:
    cfg = found.config or {}
    prefix = cfg.get("value_head_prefix") or ("value_head" if "value_head.weight" in found.keys else DEFAULT_PREFIX)
    return f"{prefix}.weight"


def rule(found: Found) -> RewardRule:
    return RewardRule(NAME, "eos", None)


def check(found: Found) -> None:
    if found.config is None:
        raise CheckpointError(f"{found.dir} has no config.json (found {found.describe()})")
    refuse_remote_code(found)
    require_weights(found)
    head_weight(found, head_key(found), hidden_size(found.config))
    require_tokenizer(found)


def reward_config_of(found: Found) -> RewardConfig:
    cfg_json = found.config or {}
    cfg = reward_config(found, NAME)
    cfg.rule = rule(found).to_dict()
    mean, std = cfg_json.get("mean"), cfg_json.get("std")
    if isinstance(mean, int | float) and isinstance(std, int | float) and std > 0:
        cfg.normalization = {"mean": float(mean), "std": float(std)}
    cfg.normalize_rollouts = bool(cfg_json.get("normalize_reward")) and cfg.normalization is not None
    return cfg


def load(found: Found, *, dtype: Any, device: Any, trust_remote_code: bool = False) -> Loaded:
    check(found)
    body = load_body(found, dtype)
    tok = load_tokenizer(found)
    return body, build(read_tensor(found, head_key(found))), reward_config_of(found), tok
