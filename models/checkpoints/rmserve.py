"""rmserve's own model directories: rmserve.json (rmserve's metadata: normalization, max length,
truncation, rule, recipe) beside a transformers checkpoint.

- Detected: rmserve.json is present.
- Written today (`save`): a transformers `<Family>ForSequenceClassification` directory that
  `AutoModelForSequenceClassification.from_pretrained` loads unchanged: config.json with that
  architecture, `num_labels` 1, `problem_type` "regression" (vLLM's classify then returns the raw reward)
  and a `pad_token_id` chosen so that transformers' last-non-pad rule lands on the token rmserve reads;
  model.safetensors with the body under its prefix and `score.weight` (no bias).
- Read too: the directories of earlier versions (body weights without prefix in model.safetensors, the
  head with its bias in head.safetensors).
- Rule: the one recorded in rmserve.json (rmserve's own by default: the chat template, the answer closed
  by its end-of-turn token, read there).
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from models.checkpoints.files import (
    CheckpointError,
    Found,
    Loaded,
    head_weight,
    hidden_size,
    load_body,
    load_tokenizer,
    read_tensor,
    require_tokenizer,
    require_weights,
)
from models.checkpoints.hf import HEAD, build
from models.checkpoints.metadata import CONFIG_NAME, HEAD_WEIGHTS, RewardConfig, read_config
from models.formatting import RewardRule, closing_template
from models.head import ScoreHead

log = logging.getLogger(__name__)

NAME = "rmserve"


def detect(found: Found) -> bool:
    return found.rmserve_json


def legacy(found: Found) -> bool:
    """A directory written before issue 22: body without prefix + head.safetensors (weight and bias)."""
    return (found.dir / HEAD_WEIGHTS).is_file()


def check(found: Found) -> RewardConfig:
    cfg = read_config(found.dir)
    if found.config is None:
        raise CheckpointError(f"model directory {found.dir} is missing config.json")
    require_weights(found)
    if legacy(found):
        from safetensors import safe_open

        try:
            with safe_open(str(found.dir / HEAD_WEIGHTS), framework="pt") as f:
                list(f.keys())
        except Exception as e:
            raise CheckpointError(f"{found.dir / HEAD_WEIGHTS} is corrupt: {e}") from e
    else:
        head_weight(found, HEAD, int(cfg.hidden_size or hidden_size(found.config)))
    require_tokenizer(found)
    return cfg


def reward_config_of(found: Found) -> RewardConfig:
    return read_config(found.dir)


def load(found: Found, *, dtype: Any, device: Any, trust_remote_code: bool = False) -> Loaded:
    cfg = check(found)
    if legacy(found):
        return _load_legacy(found, cfg, dtype, device, trust_remote_code)
    body = load_body(found, dtype)
    tok = load_tokenizer(found)
    cfg.format = NAME
    return body, build(read_tensor(found, HEAD)), cfg, tok


def _load_legacy(found: Found, cfg: RewardConfig, dtype: Any, device: Any, trust_remote_code: bool) -> Loaded:
    from transformers import AutoConfig, AutoModel

    from models.backbone import resolve_dtype

    d = found.dir
    try:
        body_cfg = AutoConfig.from_pretrained(str(d), trust_remote_code=trust_remote_code)
    except Exception as e:
        raise CheckpointError(f"{d / 'config.json'} cannot be read: {e}") from e
    try:
        head_sd = load_file(str(d / HEAD_WEIGHTS))
    except Exception as e:
        raise CheckpointError(f"{d / HEAD_WEIGHTS} is corrupt: {e}") from e
    if set(head_sd) != {"weight", "bias"} or tuple(head_sd["weight"].shape) != (1, body_cfg.hidden_size):
        raise CheckpointError(
            f"{d / HEAD_WEIGHTS} must hold weight (1, {body_cfg.hidden_size}) and bias (1,), "
            f"found {{{', '.join(f'{k}: {tuple(v.shape)}' for k, v in head_sd.items())}}}"
        )
    try:
        body = AutoModel.from_pretrained(
            str(d),
            config=body_cfg,
            dtype=resolve_dtype(dtype),
            use_safetensors=True,
            trust_remote_code=trust_remote_code,
        )
    except Exception as e:
        raise CheckpointError(f"{d / 'model.safetensors'} cannot be loaded: {e}") from e
    tok = load_tokenizer(found)
    head = ScoreHead(int(body_cfg.hidden_size), bias=True)
    head.load_state_dict(head_sd)
    cfg.format = NAME
    return body, head, cfg, tok


# -- writing ----------------------------------------------------------------------------------------
def seq_cls_architecture(model_type: str) -> str:
    """The transformers `*ForSequenceClassification` class name of a model type (llama ->
    LlamaForSequenceClassification); a CheckpointError when transformers has none."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES

    name = MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES.get(model_type)
    if not name:
        raise CheckpointError(f"transformers has no sequence-classification class for model_type {model_type!r}")
    return str(name)


def choose_pad(tokenizer: Any, rule: RewardRule) -> int | None:
    """A pad id that never ends a sequence rmserve scores, so transformers' last-non-pad rule lands on
    the token rmserve reads: the tokenizer's pad when it is not eos (rmserve's sequences end at eos),
    else a special token that is neither eos, bos nor in the chat template (SmolLM2's <|endoftext|>).
    None when the tokenizer has none such (transformers then reads the last token of an unpadded row)."""
    eos, bos = tokenizer.eos_token_id, tokenizer.bos_token_id
    if rule.close != "end_of_turn":
        return rule.skip_id
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id != eos:
        return int(tokenizer.pad_token_id)
    template = str(getattr(tokenizer, "chat_template", "") or "")
    candidates = [tokenizer.unk_token, *sorted(tokenizer.all_special_tokens), *sorted(tokenizer.get_added_vocab())]
    for tok in candidates:
        if not tok or tok in template:
            continue
        tid = tokenizer.convert_tokens_to_ids(tok)
        if isinstance(tid, int) and tid not in (eos, bos):
            return tid
    return None


def save(model: Any, tokenizer: Any, staging: Path) -> None:
    """Write `model` into the (empty) directory `staging` in the interoperable form (module docstring).

    A head with a bias (a model from before issue 22) is saved without it: the bias is a constant, so
    raw rewards become `old - bias` and the stored normalization mean moves by the same amount, leaving
    normalized rewards and every ranking unchanged.
    """
    body: Any = model.body
    cfg = copy.deepcopy(model.config)
    rule = RewardRule.from_dict(cfg.rule)
    weight = model.head.weight.detach().float().cpu().reshape(1, -1).contiguous()
    bias = getattr(model.head, "bias", None)
    if bias is not None:
        b = float(bias.detach().float().reshape(-1)[0])
        if cfg.normalization:
            cfg.normalization = {**cfg.normalization, "mean": float(cfg.normalization["mean"]) - b}
        cfg.training = {**cfg.training, "head_bias_removed": b}
        log.info("head bias %.6g removed: raw rewards shift by it, the normalization mean too", b)
    tok = copy.deepcopy(tokenizer)
    if rule.close == "end_of_turn":
        # Frameworks score apply_chat_template(conversation + answer) at its last non-pad token: the saved
        # template ends such a conversation at the answer's end-of-turn token, which rmserve reads.
        closing = closing_template(tok)
        if closing is not None:
            tok.chat_template = closing
    pad = choose_pad(tok, rule)
    if pad is not None and rule.close == "end_of_turn":
        tok.pad_token = tok.convert_ids_to_tokens(pad)
    hf_cfg = copy.deepcopy(body.config)
    hf_cfg.architectures = [seq_cls_architecture(str(hf_cfg.model_type))]
    hf_cfg.num_labels = 1
    hf_cfg.problem_type = "regression"
    hf_cfg.pad_token_id = pad
    for attr in ("auto_map", "quantization_config"):
        if hasattr(hf_cfg, attr):
            delattr(hf_cfg, attr)
    hf_cfg.save_pretrained(staging)
    prefix = str(getattr(body, "base_model_prefix", "model") or "model")
    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for k, v in body.state_dict().items():
        t = v.detach().cpu().contiguous()
        if t.data_ptr() in seen:  # a tied copy: safetensors stores each storage once
            t = t.clone()
        seen.add(t.data_ptr())
        tensors[f"{prefix}.{k}"] = t
    tensors["score.weight"] = weight
    save_file(tensors, str(staging / "model.safetensors"), metadata={"format": "pt"})
    tok.save_pretrained(staging)
    cfg.format = NAME
    (staging / CONFIG_NAME).write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
