"""What training changed, shipped small, and the model rebuilt from it.

`save_trained` writes only the tensors a LoRA or top-N run trained (LoRA A/B matrices with their scales,
or the top layers and final norm, plus the head) as safetensors shards with a manifest of sha256 hashes.
`assemble` rebuilds the full reward-model directory from the backbone and those tensors: plain tensors
replace the backbone's, and each LoRA pair is merged as W += scale * B @ A (what peft's merge does).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from models.backbone import BackboneError, sha256_file
from models.checkpoints.files import make_readable
from models.head import ScoreHead
from models.reward_model import CONFIG_NAME, RewardConfig, RewardModel, read_config, read_json_object

log = logging.getLogger(__name__)

MANIFEST = "trained.json"
SHARD_BYTES = 15 << 20  # under the 16 MiB a file that many transfer limits and git hosts handle well
_PEFT_PREFIX = "base_model.model."


class TrainedError(BackboneError):
    """A shipped-weights folder that is missing, corrupt or does not fit the backbone."""


def trained_tensors(model: RewardModel, method: str) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """(name -> tensor, LoRA module -> scale) of what `method` trains, detached on the CPU.

    LoRA pairs are named `<module>.lora_A` / `<module>.lora_B` with peft's prefixes removed, so that
    they read as the plain model's module names; the head is always included.
    """
    if method == "full":
        raise ValueError("--method full trains every tensor: the whole model directory is what it ships")
    tensors: dict[str, torch.Tensor] = {}
    scales: dict[str, float] = {}
    for name, mod in model.named_modules():
        a: Any = getattr(mod, "lora_A", None)
        if isinstance(a, nn.ModuleDict) and "default" in a:
            base = name.replace(_PEFT_PREFIX, "")
            lora_a: Any = a["default"]
            lora_b: Any = mod.lora_B["default"]  # type: ignore[index]
            scaling: Any = mod.scaling
            tensors[f"{base}.lora_A"] = lora_a.weight  # (r, in)
            tensors[f"{base}.lora_B"] = lora_b.weight  # (out, r)
            scales[base] = float(scaling["default"])
    for name, p in model.named_parameters():
        if (p.requires_grad and "lora_" not in name) or name.startswith("head."):
            tensors[name.replace(_PEFT_PREFIX, "")] = p
    if method == "lora" and not scales:
        raise ValueError("--method lora but the model holds no LoRA adapters")
    return {k: v.detach().to("cpu", copy=True) for k, v in tensors.items()}, scales


def save_trained(
    tensors: dict[str, torch.Tensor],
    scales: dict[str, float],
    config: RewardConfig,
    out_dir: str | Path,
    *,
    method: str,
    dtype: torch.dtype = torch.bfloat16,
    shard_bytes: int = SHARD_BYTES,
) -> Path:
    """Write the trained tensors (head in float32, the rest in `dtype`) as shards + trained.json + rmserve.json."""
    out = Path(out_dir)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    shards: list[dict[str, Any]] = []
    cur: dict[str, torch.Tensor] = {}
    size = 0

    def flush() -> None:
        nonlocal cur, size
        if not cur:
            return
        name = f"trained-{len(shards):05d}.safetensors"
        save_file(cur, str(out / name))
        shards.append({"file": name, "sha256": sha256_file(out / name), "tensors": sorted(cur)})
        cur, size = {}, 0

    for key in sorted(tensors):
        t = tensors[key].float() if key.startswith("head.") else tensors[key].to(dtype)
        t = t.contiguous()
        nbytes = t.numel() * t.element_size()
        if cur and size + nbytes > shard_bytes:
            flush()
        cur[key] = t
        size += nbytes
    flush()
    manifest = {
        "format_version": 1,
        "method": method,
        "dtype": str(dtype).removeprefix("torch."),
        "lora_scales": scales,
        "backbone_info": config.backbone_info,
        "shards": shards,
        "parameters": sum(t.numel() for t in tensors.values()),
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    (out / CONFIG_NAME).write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    make_readable(out)  # save_file writes 0600: readable by the container's uid too
    return out


def read_trained(trained_dir: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor], RewardConfig]:
    """Manifest, tensors and reward config of a shipped folder; every shard's sha256 is checked."""
    d = Path(trained_dir)
    manifest = read_json_object(d / MANIFEST, TrainedError, f"{d} is not a folder written by save_trained")
    tensors: dict[str, torch.Tensor] = {}
    for shard in manifest.get("shards", []):
        p = d / shard["file"]
        if not p.is_file():
            raise TrainedError(f"{p} is missing (listed in {MANIFEST})")
        digest = sha256_file(p)
        if digest != shard["sha256"]:
            raise TrainedError(f"{p} has sha256 {digest}, {MANIFEST} expects {shard['sha256']}: the file is damaged")
        tensors.update(load_file(str(p)))
    return manifest, tensors, read_config(d)


@torch.no_grad()
def apply_trained(model: RewardModel, manifest: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    """Put the shipped tensors into a fresh model on the same backbone (in place)."""
    params = dict(model.named_parameters())
    scales: dict[str, float] = manifest.get("lora_scales", {})
    for key, t in tensors.items():
        if key.endswith((".lora_A", ".lora_B")):
            continue
        if key not in params:
            raise TrainedError(f"shipped tensor {key} has no place in the backbone (a different architecture?)")
        if tuple(params[key].shape) != tuple(t.shape):
            raise TrainedError(
                f"shipped tensor {key} has shape {tuple(t.shape)}, the backbone's is {tuple(params[key].shape)}"
            )
        params[key].copy_(t.to(params[key].dtype))
    for base, scale in scales.items():
        weight = params.get(f"{base}.weight")
        a, b = tensors.get(f"{base}.lora_A"), tensors.get(f"{base}.lora_B")
        if weight is None or a is None or b is None:
            raise TrainedError(f"LoRA module {base} is incomplete or has no weight in the backbone")
        delta = (b.float() @ a.float()) * scale  # (out, r) @ (r, in) -> (out, in)
        if tuple(delta.shape) != tuple(weight.shape):
            raise TrainedError(f"LoRA module {base} makes {tuple(delta.shape)}, the weight is {tuple(weight.shape)}")
        weight.add_(delta.to(weight.dtype))


def assemble(trained_dir: str | Path, backbone: str | Path, out: str | Path) -> Path:
    """Backbone + shipped tensors -> a full model directory (float32) at `out`."""
    manifest, tensors, cfg = read_trained(trained_dir)
    model, tok = RewardModel.from_backbone(
        backbone, dtype="float32", max_length=cfg.max_length, truncation=cfg.truncation, seed=None
    )
    bias = tensors.pop("head.bias", None)
    if bias is not None:  # shipped before heads were bias-free: keep it until save folds it into the mean
        model.head = ScoreHead(model.head.in_features, bias=True)
    apply_trained(model, manifest, tensors)
    if bias is not None:
        with torch.no_grad():
            model.head.bias.copy_(bias.float().reshape(1))
    cfg.backbone_info = model.config.backbone_info
    cfg.backbone = model.config.backbone
    model.config = cfg
    model.eval()
    return model.save(out, tok)
