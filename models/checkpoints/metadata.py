"""rmserve's own metadata for a reward model (rmserve.json) and the error every checkpoint problem raises."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from models.backbone import BackboneError
from models.formatting import Truncation

CONFIG_NAME = "rmserve.json"
BODY_WEIGHTS = "model.safetensors"
HEAD_WEIGHTS = "head.safetensors"
FORMAT_VERSION = 1


class ModelDirError(BackboneError):
    """A model directory that is missing files or holds corrupt ones; the message names the file."""


@dataclass
class RewardConfig:
    """Everything besides weights that a reward model directory records (rmserve.json)."""

    backbone: str = "unknown"  # where the backbone came from (path or id)
    model_type: str = "unknown"  # transformers model_type of the body (llama, gpt2, ...)
    hidden_size: int = 0
    max_length: int = 1024  # most tokens per scored sequence
    truncation: Truncation = "left"  # response longer than max_length: "left" keeps its end, "error" refuses
    normalization: dict[str, float] | None = None  # {"mean", "std"} of training rewards, for z-scores
    backbone_info: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)  # recipe and metrics from the trainer
    format: str = "rmserve"  # the checkpoint format it was loaded from (models/checkpoints/)
    rule: dict[str, Any] = field(default_factory=dict)  # RewardRule.to_dict(): the text scored, the token read
    normalize_rollouts: bool = False  # /get_reward normalizes (an OpenRLHF checkpoint saved with normalize_reward)
    format_version: int = FORMAT_VERSION

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RewardConfig:
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**known)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def read_json_object(p: Path, error: type[Exception], missing: str) -> dict[str, Any]:
    """A JSON object from file `p`; `error` names the file when it is missing (`missing` says what it
    should have been), not valid JSON, or not an object."""
    if not p.is_file():
        raise error(f"{p} is missing: {missing}")
    try:
        raw = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{p} is not valid JSON: {e}") from e
    if not isinstance(raw, dict):
        raise error(f"{p} must hold a JSON object")
    return raw


def read_config(model_dir: str | Path) -> RewardConfig:
    p = Path(model_dir) / CONFIG_NAME
    raw = read_json_object(p, ModelDirError, "this is not an rmserve model directory")
    if raw.get("format_version", FORMAT_VERSION) > FORMAT_VERSION:
        raise ModelDirError(f"{p} has format_version {raw['format_version']}; this rmserve reads {FORMAT_VERSION}")
    return RewardConfig.from_dict(raw)
