"""Reward checkpoints rmserve reads, one small module per format, behind one loader (STYLE.md habit 15).

- `rmserve` (rmserve.py): rmserve.json; head `score.weight` (older directories: head.safetensors);
  the rule recorded there (rmserve's own: the answer closed by its end-of-turn token, read there).
- `openrlhf` (openrlhf.py): config.json `value_head_prefix` or `value_head.*` weights; head
  `<value_head_prefix>.weight`; generation prompt + answer + eos, read at the last token.
- `hf` (hf.py): any other config.json (the fallback); head `score.weight`; the whole chat template,
  read at the last token that is not `pad_token_id`.

`load` picks the format once (detected from the files in the order above, or forced with
`--model-format`) and returns the RewardModel and its tokenizer; the rule travels in
`model.config.rule` into the Formatter (`model.formatter(tokenizer)`), so no route or runtime asks which
format a model came in. `check` does the same refusals without loading weights (before a port is bound).
"""

from __future__ import annotations

import logging
from pathlib import Path
from types import ModuleType
from typing import Any

from models.checkpoints import hf, openrlhf, rmserve
from models.checkpoints.files import CheckpointError, Found, inspect

FORMATS: dict[str, ModuleType] = {"rmserve": rmserve, "openrlhf": openrlhf, "hf": hf}  # detection order
FORMAT_NAMES = tuple(FORMATS)
_RULES = {
    "rmserve": "the answer closed by its end-of-turn token",
    "openrlhf": "generation prompt + answer + eos",
    "hf": "the whole chat template, the last non-pad token",
}
log = logging.getLogger(__name__)


def detect(found: Found) -> str:
    """The format of an inspected directory; a CheckpointError saying what was found when none fits."""
    for name, module in FORMATS.items():
        if module.detect(found):
            return name
    raise CheckpointError(
        f"{found.dir} is not a reward model directory rmserve can read (found {found.describe()}); give an "
        "rmserve model directory (rmserve.json), a transformers *ForSequenceClassification folder with one label, "
        "or an OpenRLHF reward checkpoint"
    )


def _pick(model_dir: str | Path, format: str | None) -> tuple[Found, str]:
    found = inspect(model_dir)
    if format in (None, "auto"):
        return found, detect(found)
    if format not in FORMATS:
        raise CheckpointError(f"--model-format {format!r} is unknown; use auto, {', '.join(FORMAT_NAMES)}")
    try:
        detected: str | None = detect(found)
    except CheckpointError:
        detected = None
    if detected is not None and detected != format:
        log.warning(
            "%s is detected as the %s format but --model-format %s was given: it is read and scored by the %s "
            "rule (%s); drop --model-format (or use auto) to read it as %s",
            found.dir,
            detected,
            format,
            format,
            _RULES[format],
            detected,
        )
    return found, format


def check(model_dir: str | Path, format: str | None = None) -> str:
    """Every refusal `load` would make, without loading weights; returns the format's name."""
    found, name = _pick(model_dir, format)
    FORMATS[name].check(found)
    return name


def reward_config(model_dir: str | Path, format: str | None = None) -> Any:
    """rmserve's RewardConfig (rule, normalization, max length) of a checkpoint, without loading weights:
    what a runtime that does not load the torch model (ONNX) needs."""
    found, name = _pick(model_dir, format)
    return FORMATS[name].reward_config_of(found)


def load(
    model_dir: str | Path,
    *,
    format: str | None = None,
    dtype: Any = "float32",
    device: Any = "cpu",
    trust_remote_code: bool = False,
) -> tuple[Any, Any, Any, Any]:
    """(body, head, RewardConfig, tokenizer) of a checkpoint directory in any format above
    (`RewardModel.load` assembles the model)."""
    from models.backbone import resolve_dtype

    found, name = _pick(model_dir, format)
    return FORMATS[name].load(found, dtype=resolve_dtype(dtype), device=device, trust_remote_code=trust_remote_code)


__all__ = ["FORMATS", "FORMAT_NAMES", "CheckpointError", "check", "detect", "inspect", "load", "reward_config"]
