"""What a checkpoint directory holds, read once without loading weights, and the checks every format shares.

`inspect(dir)` gathers config.json, the safetensors keys and shapes (single file or sharded index) and
the tokenizer files; the format modules detect themselves from it and refuse what they cannot serve,
each error naming what was found and the fix. Nothing here runs a checkpoint's own code.
"""

from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from models.checkpoints.metadata import ModelDirError

HF_CONFIG = "config.json"
SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
LM_HEAD_KEYS = ("lm_head.weight", "embed_out.weight")  # Llama-likes and GPT-2 / GPT-NeoX
TRAIN_HINT = "train one on it: rmserve train --backbone {d} --data FILE --out OUT"


Loaded = tuple[Any, Any, Any, Any]
"""What a format module's `load` returns: (transformers body, head nn.Linear(hidden, 1), RewardConfig,
tokenizer); models/reward_model.py `RewardModel.load` puts them together."""


class CheckpointError(ModelDirError):
    """A directory that is not a reward model rmserve can serve; the message names what was found and the fix."""


@dataclass
class Found:
    """What `inspect` read from a directory: enough to detect the format and check it, no weights."""

    dir: Path
    config: dict[str, Any] | None  # config.json, when present
    keys: dict[str, tuple[int, ...]] = field(default_factory=dict)  # safetensors tensor name -> shape
    weight_files: list[Path] = field(default_factory=list)
    rmserve_json: bool = False
    tokenizer: bool = False

    @property
    def architectures(self) -> list[str]:
        return list((self.config or {}).get("architectures") or [])

    def describe(self) -> str:
        """A short account of what the directory holds, for error messages."""
        parts = []
        if self.config is not None:
            arch = ", ".join(self.architectures) or "no architectures"
            parts.append(f"config.json ({arch}, model_type {self.config.get('model_type')!r})")
        if self.keys:
            heads = [k for k in self.keys if "layers." not in k and ".h." not in k and not k.startswith("h.")]
            parts.append(f"{len(self.keys)} tensors (outside the layers: {', '.join(sorted(heads)[:8])})")
        return "; ".join(parts) or "no config.json and no weights"


def inspect(model_dir: str | Path) -> Found:
    """Read config.json, the safetensors headers and the tokenizer's presence; corrupt files raise."""
    from safetensors import safe_open

    d = Path(model_dir)
    if not d.is_dir():
        raise CheckpointError(f"model directory {d} does not exist")
    config = None
    if (d / HF_CONFIG).is_file():
        try:
            config = json.loads((d / HF_CONFIG).read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{d / HF_CONFIG} is not valid JSON: {e}") from e
        if not isinstance(config, dict):
            raise CheckpointError(f"{d / HF_CONFIG} must hold a JSON object")
    files: list[Path] = []
    if (d / SAFETENSORS_INDEX).is_file():
        try:
            index = json.loads((d / SAFETENSORS_INDEX).read_text())
            files = [d / f for f in sorted(set(index["weight_map"].values()))]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{d / SAFETENSORS_INDEX} is not a safetensors index: {e}") from e
    elif (d / SAFETENSORS).is_file():
        files = [d / SAFETENSORS]
    keys: dict[str, tuple[int, ...]] = {}
    for f in files:
        if not f.is_file():
            raise CheckpointError(f"{f} is missing (listed in {SAFETENSORS_INDEX})")
        try:
            with safe_open(str(f), framework="pt") as st:
                for k in st.keys():  # noqa: SIM118 (safe_open is not a mapping)
                    keys[k] = tuple(st.get_slice(k).get_shape())
        except Exception as e:
            raise CheckpointError(f"{f} is corrupt: {e} (re-save it, or download it again)") from e
    tokenizer = any((d / n).is_file() for n in TOKENIZER_FILES)
    return Found(d, config, keys, files, (d / "rmserve.json").is_file(), tokenizer)


def require_weights(found: Found) -> None:
    """Safetensors weights must be present (pickle checkpoints are never loaded: they can run code)."""
    if found.weight_files:
        return
    d = found.dir
    pickles = [p.name for p in (*d.glob("*.bin"), *d.glob("*.pt"), *d.glob("*.pth"))]
    hint = f" (it has {', '.join(sorted(pickles)[:3])}: pickle files, which rmserve never loads)" if pickles else ""
    raise CheckpointError(
        f"{d} has no {SAFETENSORS} or {SAFETENSORS_INDEX}{hint}; save it with "
        "`model.save_pretrained(dir, safe_serialization=True)`"
    )


def require_tokenizer(found: Found) -> None:
    if not found.tokenizer:
        raise CheckpointError(
            f"{found.dir} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}); save the tokenizer the model "
            "was trained with beside it: `tokenizer.save_pretrained(dir)`"
        )


def refuse_remote_code(found: Found) -> None:
    """Checkpoints that need their own Python code (config.json `auto_map`) are refused, whatever
    `RMSERVE_TRUST_REMOTE_CODE` says (there is no --trust-remote-code flag): rmserve cannot know where such
    a model's forward reads its reward (ArmoRM, InternLM2-reward compute it in their own code), and
    serving a guess would be a wrong reward."""
    cfg = found.config or {}
    if cfg.get("auto_map"):
        classes = ", ".join(sorted({str(v) for v in cfg["auto_map"].values()}))
        raise CheckpointError(
            f"{found.dir / HF_CONFIG} asks for the checkpoint's own Python code (auto_map: {classes}); rmserve never "
            "runs a reward checkpoint's own code (no setting changes that), because it cannot know where that code "
            "reads the reward. Serve it with its own framework, or convert it to a transformers "
            "*ForSequenceClassification (num_labels 1) directory"
        )


def refuse_lm(found: Found, head_key: str) -> None:
    """A causal LM (SFT model) has an LM head and no reward head: say so and how to train one."""
    lm = [k for k in LM_HEAD_KEYS if k in found.keys]
    causal = [a for a in found.architectures if a.endswith(("ForCausalLM", "LMHeadModel"))]
    if lm or causal:
        what = ", ".join([*causal, *lm])
        raise CheckpointError(
            f"{found.dir} is a language model ({what}), not a reward model: it has no reward head ({head_key}) "
            f"and rmserve never serves a guessed head; {TRAIN_HINT.format(d=found.dir)}"
        )


def head_weight(found: Found, key: str, hidden: int) -> None:
    """The reward head `key` must be present with shape (1, hidden)."""
    if key not in found.keys:
        refuse_lm(found, key)
        raise CheckpointError(
            f"{found.dir} has no reward head {key!r} in its weights (found {found.describe()}); "
            "rmserve never serves a guessed head"
        )
    shape = found.keys[key]
    if len(shape) != 2 or shape[1] != hidden:
        raise CheckpointError(f"{found.dir}: {key} has shape {shape}, a reward head is (1, {hidden})")
    if shape[0] != 1:
        raise CheckpointError(
            f"{found.dir}: {key} has shape {shape}: a classifier with {shape[0]} labels (num_labels {shape[0]}), "
            "not a reward model; rmserve serves one scalar per answer (num_labels 1)"
        )


def num_labels(config: dict[str, Any]) -> int:
    if "id2label" in config and isinstance(config["id2label"], dict):
        return len(config["id2label"])
    return int(config.get("num_labels", 1) or 1)


def read_tensor(found: Found, key: str) -> torch.Tensor:
    from safetensors import safe_open

    for f in found.weight_files:
        with safe_open(str(f), framework="pt") as st:
            if key in st.keys():  # noqa: SIM118
                return st.get_tensor(key)
    raise CheckpointError(f"{found.dir}: no tensor {key}")


def hidden_size(config: dict[str, Any]) -> int:
    text = config.get("text_config") or {}
    for src in (config, text):
        for name in ("hidden_size", "n_embd", "d_model"):
            if isinstance(src.get(name), int):
                return int(src[name])
    raise CheckpointError("config.json names no hidden_size (or n_embd)")


def load_body(found: Found, dtype: Any, trust_remote_code: bool = False) -> Any:
    """The transformer body with AutoModel (prefixes `model.`, `transformer.`, `gpt_neox.` are stripped by
    transformers); a body weight that is missing is an error, never a random initialisation."""
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the load report lists the head as "unexpected": it is read below
    try:
        body, info = AutoModel.from_pretrained(
            str(found.dir),
            dtype=dtype,
            use_safetensors=True,
            trust_remote_code=trust_remote_code,
            output_loading_info=True,
        )
    except Exception as e:
        raise CheckpointError(f"the weights in {found.dir} cannot be loaded as the body: {e}") from e
    finally:
        hf_logging.set_verbosity(level)
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        raise CheckpointError(
            f"{found.dir}: the weights lack {len(missing)} body tensors ({', '.join(missing[:4])}); the checkpoint is "
            "incomplete or of another architecture than its config.json says"
        )
    return body


def load_tokenizer(found: Found) -> Any:
    from transformers import AutoTokenizer

    require_tokenizer(found)
    try:
        tok = AutoTokenizer.from_pretrained(str(found.dir))
    except Exception as e:
        raise CheckpointError(f"the tokenizer in {found.dir} cannot be loaded: {e}") from e
    if tok.pad_token is None:  # only used to pad batches (masked out); the read token never depends on it
        tok.pad_token = tok.eos_token
    return tok


def make_readable(path: Path) -> None:
    """Directories 0755 and files 0644 under `path` (mkdtemp makes 0700 and some writers 0600), so a
    model written on the host can be read by another user (the container's uid)."""
    for root, dirs, files in os.walk(path):
        os.chmod(root, 0o755)
        for name in files:
            p = Path(root) / name
            p.chmod(p.stat().st_mode | stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)
        for name in dirs:
            os.chmod(Path(root) / name, 0o755)
