"""Inference runtimes and the one place that picks and loads one for a model directory."""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
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


AUTO_CACHE = ".rmserve-auto.json"  # in the model directory: the measured pick, keyed by machine and files


def native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX): only then may bf16 be faster than fp32."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool({"avx512_bf16", "amx_bf16"} & flags)
    except OSError:
        pass
    return False


def candidates(settings: Settings, model_dir: Path) -> list[tuple[str, str]]:
    """(runtime, dtype) pairs that `auto` may pick for `settings`; `choose_runtime` keeps those whose
    rewards it measures to be bit-for-bit independent of batch-mates and picks the fastest.

    - torch at `auto_dtype` in the forward of `settings.forward` (the canonical forward by default);
    - torch bf16 too, with the canonical forward, where bf16 is native (a GPU, or a CPU with
      AVX512-BF16/AMX): there it is the faster invariant mode; on other CPUs bf16 is emulated and slower;
    - ONNX Runtime fp32 when the directory holds that export (CPU only);
    - never dynamic int8: its activation scale is computed over the whole batch tensor, so a row's
      reward depends on its batch-mates by construction; it runs only when asked (`--dtype int8`).
    """
    from models.backbone import auto_dtype
    from models.export import ONNX_FP32

    torch_dtype = auto_dtype(settings.device) if settings.dtype == "auto" else settings.dtype
    if settings.runtime == "torch":
        if (
            settings.dtype == "auto"
            and settings.forward == "canonical"
            and torch_dtype == "float32"
            and (settings.device == "cpu" and native_bf16())
        ):
            return [("torch", "float32"), ("torch", "bfloat16")]
        return [("torch", torch_dtype)]
    if settings.runtime == "onnx" or settings.dtype == "int8":
        return [("onnx", "int8" if settings.dtype == "int8" else "float32")]
    found = [("torch", torch_dtype)]
    native = settings.device == "cpu" and native_bf16()
    if settings.dtype == "auto" and settings.forward == "canonical" and torch_dtype == "float32" and native:
        found.append(("torch", "bfloat16"))
    if settings.device == "cpu" and settings.dtype in ("auto", "float32") and (model_dir / ONNX_FP32).is_file():
        found.append(("onnx", "float32"))
    return found


Timer = Callable[[Settings, Path, str, str], "float | tuple[float, float]"]


def choose_runtime(settings: Settings, model_dir: Path, timer: Timer | None = None) -> tuple[str, str]:
    """The (runtime, dtype) to load. Explicit settings are kept; with `auto` and several candidates, the
    fastest of those measured bit-for-bit batch-invariant (`timer`, default `measure_candidate`: seconds
    for a fixed workload and the largest alone-vs-batch reward difference) wins; if none is invariant,
    the fastest. Measured once per machine, thread count, library versions, forward and model files,
    and cached in the model directory."""
    found = candidates(settings, model_dir)
    if len(found) == 1:
        return found[0]
    threads = settings.threads or cores()
    key = _cache_key(model_dir, threads)
    key["forward"] = settings.forward
    cache = model_dir / AUTO_CACHE
    try:
        cached = json.loads(cache.read_text())
        if cached.get("key") == key and tuple(cached["choice"]) in found:
            log.info("auto runtime: %s (measured before: %s)", tuple(cached["choice"]), cached["seconds"])
            return tuple(cached["choice"])  # type: ignore[return-value]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    timer = timer or measure_candidate
    seconds: dict[str, float] = {}
    difference: dict[str, float] = {}
    for r, d in found:
        got = timer(settings, model_dir, r, d)
        s, diff = got if isinstance(got, tuple) else (got, 0.0)
        seconds[f"{r}:{d}"], difference[f"{r}:{d}"] = s, diff
    invariant = [c for c in found if difference[f"{c[0]}:{c[1]}"] == 0.0]
    choice = min(invariant or found, key=lambda c: seconds[f"{c[0]}:{c[1]}"])
    if not invariant:
        log.warning("auto runtime: no candidate is batch-invariant here (%s); picking the fastest", difference)
    log.info(
        "auto runtime: %s, fastest invariant of %s (seconds per workload; differences %s)", choice, seconds, difference
    )
    try:
        record = {"key": key, "choice": list(choice), "seconds": seconds, "alone_vs_batch": difference}
        cache.write_text(json.dumps(record, indent=2) + "\n")
    except OSError as e:
        log.warning("auto runtime: cannot cache the measurement in %s: %s", cache, e)
    return choice


def measured_invariance(model_dir: Path, runtime: str, dtype: str) -> float | None:
    """The largest alone-vs-batch reward difference `auto` measured for (runtime, dtype) in `model_dir`,
    or None when it has not measured it (on this machine, with these files)."""
    try:
        cached = json.loads((model_dir / AUTO_CACHE).read_text())
        return float(cached["alone_vs_batch"][f"{runtime}:{dtype}"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _cache_key(model_dir: Path, threads: int) -> dict[str, Any]:
    import platform

    import torch

    try:
        import onnxruntime

        ort_version = onnxruntime.__version__
    except ImportError:  # pragma: no cover - onnxruntime is a dependency
        ort_version = ""
    files = {}
    for name in ("model.safetensors", "model.onnx"):
        p = model_dir / name
        if p.is_file():
            st = p.stat()
            files[name] = [st.st_size, st.st_mtime_ns]
    return {
        "cpu": _cpu_name(),
        "machine": platform.machine(),
        "threads": threads,
        "torch": torch.__version__,
        "onnxruntime": ort_version,
        "files": files,
    }


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor()


def _workload(vocab: int) -> list[Any]:
    """Like a best-of-4 request on each of two prompts: 64-token prompts, answers of 16 to 40 tokens,
    about 750 tokens, each sequence carrying its prompt boundary."""
    from models.batching import PromptSplit

    v = min(vocab, 1000) - 1  # token ids 1..v: in every vocabulary
    prompts = [[(7 * i + 11) % v + 1 for i in range(64)], [(13 * i + 5) % v + 1 for i in range(64)]]
    return [
        PromptSplit(p + [(3 * j + k) % v + 1 for j in range(16 + 8 * k)], len(p)) for p in prompts for k in range(4)
    ]


def time_candidate(settings: Settings, model_dir: Path, runtime: str, dtype: str, repeats: int = 2) -> float:
    """Best of `repeats` seconds for the fixed workload (`_workload`) through the runtime as the service
    would run it (prefix sharing counts), after one call to warm up."""
    return measure_candidate(settings, model_dir, runtime, dtype, repeats)[0]


def measure_candidate(
    settings: Settings, model_dir: Path, runtime: str, dtype: str, repeats: int = 2
) -> tuple[float, float]:
    """(best of `repeats` seconds for the fixed workload, the largest difference between a sequence's
    reward alone and in the workload's batch): what `auto` picks by."""
    rt, tokenizer = _load(settings, model_dir, runtime, dtype)
    seqs = _workload(len(tokenizer))
    together = rt.score(seqs)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        rt.score(seqs)
        best = min(best, time.perf_counter() - t)
    alone = [rt.score([s])[0] for s in (seqs[0], seqs[5])]
    diff = max(abs(alone[0] - together[0]), abs(alone[1] - together[5]))
    return round(best, 4), diff


def _load(settings: Settings, model_dir: Path, runtime: str, dtype: str) -> tuple[Runtime, Any]:
    if runtime == "onnx":
        from service.runtimes.onnx_runtime import OnnxRuntime

        return OnnxRuntime.load(model_dir, threads=settings.threads or cores(), int8=dtype == "int8")
    from models.reward_model import RewardModel
    from service.runtimes.torch_runtime import TorchRuntime

    model, tokenizer = RewardModel.load(
        model_dir,
        dtype=dtype,
        device=settings.device,
        trust_remote_code=settings.trust_remote_code,
        format=settings.model_format,
    )
    runtime_ = TorchRuntime(
        model,
        tokenizer.pad_token_id,
        forward=settings.forward,
        prefix_sharing=settings.prefix_sharing,
        min_prefix=settings.prefix_min_tokens,
    )
    return runtime_, tokenizer


def calibrate(runtime: Runtime, sequences: int = 4, length: int = 128) -> float:
    """Tokens per second of one pass of `sequences` distinct sequences of `length` tokens (ids 1..199, in
    every vocabulary; no shared prefix), after the runtime's warm-up: the batcher's prior drain rate."""
    seqs = [[(7 * i + 13 * k) % 199 + 1 for i in range(length)] for k in range(sequences)]
    t = time.perf_counter()
    runtime.score(seqs)
    return sequences * length / max(time.perf_counter() - t, 1e-6)


def load_runtime(settings: Settings, model_dir: Path) -> tuple[Runtime, Any, Any, dict[str, Any]]:
    """Load the model directory into the chosen runtime: (runtime, tokenizer, reward config, card).

    The card is what `/v1/models` shows: ids and names only, never server paths.
    """
    import torch

    from models.checkpoints import reward_config
    from service.runtimes.torch_runtime import TorchRuntime

    threads = settings.threads or cores()
    torch.set_num_threads(threads)
    name, dtype = choose_runtime(settings, model_dir)
    runtime, tokenizer = _load(settings, model_dir, name, dtype)
    if isinstance(runtime, TorchRuntime):
        cfg = runtime.model.config
        params = sum(p.numel() for p in runtime.model.parameters())
    else:
        cfg = reward_config(model_dir, settings.model_format)
        params = int(cfg.backbone_info.get("params_after_trim", 0)) + cfg.hidden_size + 1
    card = {
        "id": settings.model_id or model_dir.name,
        "backbone": str(cfg.backbone_info.get("source") or cfg.backbone),
        "parameters": params,
        "max_length": cfg.max_length,
        "dtype": runtime.dtype,
        "runtime": runtime.name,
        "mode": mode_of(runtime, model_dir),
        "normalization": cfg.normalization,
        "training": {k: cfg.training.get(k) for k in ("steps", "dev", "train_pairs", "recipe") if k in cfg.training},
    }
    return runtime, tokenizer, cfg, {**without_paths(card), "id": card["id"]}  # the id is the operator's name


def mode_of(runtime: Runtime, model_dir: Path) -> dict[str, Any]:
    """The scoring mode `/v1/models` and the card report: runtime, forward, dtype, and whether a reward is
    bit-for-bit independent of its batch-mates (the canonical forward: by construction and tests; other
    modes: as `auto` measured them here, None when not measured), on this machine kind (`cpu`)."""
    forward = str(getattr(runtime, "forward", "padded"))
    invariant: bool | None = getattr(runtime, "batch_invariant", None)
    if not invariant:
        diff = measured_invariance(model_dir, runtime.name, runtime.dtype)
        invariant = None if diff is None else diff == 0.0
    return {
        "name": f"{runtime.name}-{forward}-{runtime.dtype}",
        "runtime": runtime.name,
        "forward": forward,
        "dtype": runtime.dtype,
        "batch_invariant": invariant,
        "cpu": _cpu_name(),
    }


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
