"""What trains: the fine-tuning method (full, top-N layers, LoRA), and the optimizer over it."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.hooks import RemovableHandle

from models.reward_model import RewardModel
from models.train.config import TrainConfig


def transformer_layers(body: nn.Module) -> nn.ModuleList:
    for name in ("layers", "h", "block", "blocks"):
        mod = getattr(body, name, None)
        if isinstance(mod, nn.ModuleList):
            return mod
    raise ValueError(f"cannot find the transformer layers of {type(body).__name__}")


def final_norm(body: nn.Module) -> nn.Module | None:
    for name in ("norm", "ln_f", "final_layer_norm", "final_layernorm"):
        mod = getattr(body, name, None)
        if isinstance(mod, nn.Module):
            return mod
    return None


def apply_method(model: RewardModel, cfg: TrainConfig) -> None:
    """Choose what trains: everything, the top N layers (+ final norm), or LoRA adapters. The head always."""
    if cfg.method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
    elif cfg.method == "top-n":
        layers = transformer_layers(model.body)
        if not 0 <= cfg.top_n <= len(layers):
            raise ValueError(f"--top-n is {cfg.top_n}; the backbone has {len(layers)} layers")
        model.body.requires_grad_(False)
        for layer in list(layers)[len(layers) - cfg.top_n :]:
            layer.requires_grad_(True)
        norm = final_norm(model.body)
        if norm is not None and cfg.top_n > 0:
            norm.requires_grad_(True)
    elif cfg.method == "lora":
        from peft import LoraConfig, get_peft_model

        lcfg = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=0.0, target_modules="all-linear")
        model.body = get_peft_model(model.body, lcfg)
    else:
        raise ValueError(f"--method {cfg.method!r} is unknown; use full, top-n or lora")
    model.head.requires_grad_(True)
    # New heads are bias-free (centering then acts on the weights, as in TRL). A head loaded from an older
    # model keeps its bias: pairwise and listwise losses give it no gradient, only centering does.
    if getattr(model.head, "bias", None) is not None:
        model.head.bias.requires_grad_(cfg.center_coef > 0)


def use_frozen_cache(cfg: TrainConfig, model: RewardModel, world: int) -> bool:
    from models.frozen_cache import supports_cache

    if cfg.method != "top-n" or cfg.cache_frozen == "off":
        return False
    ok = supports_cache(model.body) and world == 1 and 0 < cfg.top_n < len(transformer_layers(model.body))
    if cfg.cache_frozen == "on" and not ok:
        raise ValueError(
            "--cache-frozen on needs --method top-n with 0 < N < layers, a Llama-family body and one process"
        )
    return ok


def merge_method(model: Any, cfg: TrainConfig) -> None:
    if cfg.method == "lora":
        model.body = model.body.merge_and_unload()


def build_optimizer(model: RewardModel, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters: the head at `head_lr` (default 10 x lr), the body at `lr`;
    `weight_decay` on matrices only (biases and norm weights are not pulled toward zero)."""
    head_ids = {id(p) for p in model.head.parameters()}
    head_lr = cfg.head_lr or cfg.lr * 10
    groups: list[dict[str, Any]] = []
    for in_head, lr in ((True, head_lr), (False, cfg.lr)):
        params = [p for p in model.parameters() if p.requires_grad and (id(p) in head_ids) == in_head]
        for decay in (True, False):
            chosen = [p for p in params if (p.ndim >= 2) == decay]
            if chosen:
                groups.append({"params": chosen, "lr": lr, "weight_decay": cfg.weight_decay if decay else 0.0})
    return torch.optim.AdamW(groups)


def add_head_dropout(model: RewardModel, p: float) -> RemovableHandle | None:
    """Dropout with probability p on the head's input (the pooled last-token state) in training mode,
    on every path that reaches the head (plain, shared-prefix, frozen cache); none in eval mode."""
    if not p:
        return None

    def hook(head: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        return (F.dropout(args[0], p, head.training), *args[1:])

    return model.head.register_forward_pre_hook(hook)
