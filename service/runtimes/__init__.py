"""Inference runtimes and the one place that picks and loads one for a model directory."""

from __future__ import annotations

import logging
import os
from pathlib import Path, PurePath
from typing import Any

from service.runtimes.base import Runtime
from service.settings import Settings

log = logging.getLogger(__name__)


def cores() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def resolve_model_dir(settings: Settings) -> Path:
    """The model directory to serve: `settings.model`, else the assembled default model (built on first use)."""
    if settings.model:
        return Path(settings.model)
    from models.default import default_model_dir

    return default_model_dir()


def choose_runtime(settings: Settings, model_dir: Path) -> str:
    """`settings.runtime`, with `auto` resolved: ONNX Runtime fp32 when the directory holds that export and
    the CPU path was asked for (faster than torch fp32 on CPUs without native bf16, same scores within 1e-5);
    int8 only when asked (--dtype int8); torch otherwise."""
    if settings.runtime != "auto":
        return settings.runtime
    from models.export import ONNX_FP32, ONNX_INT8

    wanted = (model_dir / ONNX_INT8) if settings.dtype == "int8" else (model_dir / ONNX_FP32)
    cpu = settings.device == "cpu" and settings.dtype != "bfloat16"
    return "onnx" if wanted.is_file() and cpu else "torch"


def load_runtime(settings: Settings, model_dir: Path) -> tuple[Runtime, Any, Any, dict[str, Any]]:
    """Load the model directory into the chosen runtime: (runtime, tokenizer, reward config, card).

    The card is what `/v1/models` shows: ids and names only, never server paths.
    """
    import torch

    from models.backbone import auto_dtype
    from models.reward_model import RewardModel, read_config

    threads = settings.threads or cores()
    torch.set_num_threads(threads)
    runtime: Runtime
    if choose_runtime(settings, model_dir) == "onnx":
        from service.runtimes.onnx_runtime import OnnxRuntime

        int8 = None if settings.dtype == "auto" else settings.dtype == "int8"
        runtime, tokenizer = OnnxRuntime.load(model_dir, threads=threads, int8=int8)
        cfg = read_config(model_dir)
        params = int(cfg.backbone_info.get("params_after_trim", 0)) + cfg.hidden_size + 1
    else:
        from service.runtimes.torch_runtime import TorchRuntime

        dtype = auto_dtype(settings.device) if settings.dtype == "auto" else settings.dtype
        model, tokenizer = RewardModel.load(
            model_dir, dtype=dtype, device=settings.device, trust_remote_code=settings.trust_remote_code
        )
        runtime = TorchRuntime(
            model, tokenizer.pad_token_id, prefix_sharing=settings.prefix_sharing, min_prefix=settings.prefix_min_tokens
        )
        cfg = model.config
        params = sum(p.numel() for p in model.parameters())
    card = {
        "id": settings.model_id or model_dir.name,
        "backbone": str(cfg.backbone_info.get("source") or cfg.backbone),
        "parameters": params,
        "max_length": cfg.max_length,
        "dtype": runtime.dtype,
        "runtime": runtime.name,
        "normalization": cfg.normalization,
        "training": {k: cfg.training.get(k) for k in ("steps", "dev", "train_pairs", "recipe") if k in cfg.training},
    }
    return runtime, tokenizer, cfg, {**without_paths(card), "id": card["id"]}  # the id is the operator's name


def without_paths(value: Any) -> Any:
    """`value` with every string that looks like a file path cut to its last part (a folder or file
    name): what the service shows (`/v1/models`, metric labels) never reveals the server's folders."""
    if isinstance(value, dict):
        return {k: without_paths(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [without_paths(v) for v in value]
    if isinstance(value, str) and ("/" in value or "\\" in value):
        return PurePath(value.replace("\\", "/").rstrip("/")).name or value
    return value
