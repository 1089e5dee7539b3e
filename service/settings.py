"""Service settings: every field from RMSERVE_* environment variables or CLI flags, checked at start-up."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

log = logging.getLogger("rmserve.settings")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="RMSERVE_", extra="ignore", protected_namespaces=())

    model: str | None = Field(None, description="model directory; unset = the assembled default model")
    model_format: Literal["auto", "rmserve", "hf", "openrlhf"] = Field(
        "auto",
        description="checkpoint format of the model directory; auto = detected from its files (models/checkpoints/)",
    )
    model_id: str | None = Field(None, description="name reported in responses (default: the folder name)")
    runtime: Literal["auto", "torch", "onnx"] = Field(
        "auto",
        description="inference runtime; auto = the faster of torch fp32 and ONNX Runtime fp32 (when the model "
        "directory holds that export), measured once per machine and cached in the model directory",
    )
    dtype: Literal["auto", "float32", "bfloat16", "int8"] = Field(
        "auto",
        description="auto = float32 on a CPU (rewards independent of batch-mates), bf16 on a GPU; bfloat16 when "
        "asked (faster where native, but a reward then moves with its batch-mates); int8 is refused with its "
        "reason (dynamic int8 makes a reward depend on its batch-mates and reordered 30% of HH pairs)",
    )
    forward: Literal["canonical", "padded"] = Field(
        "canonical",
        description="torch runtime: canonical = sequences packed without padding, per-sequence attention, linear "
        "layers in fixed row tiles, each prompt computed once: a reward is the same bits alone or in any batch "
        "(per machine kind and dtype); padded = right-padded batches (a reward moves with its batch-mates by "
        "rounding). Families the canonical forward does not cover run padded",
    )
    device: str = Field(
        "cpu",
        description="cpu, cuda or cuda:N (`rmserve serve --device`); a GPU asked where torch sees none is refused at "
        "start-up. On CUDA, dtype auto is bf16: its batch invariance is not measured (scripts/gpu_check.sh measures "
        "its agreement with CPU fp32); ask --dtype float32 for rewards independent of batch-mates",
    )
    threads: int | None = Field(None, ge=1, description="intra-op threads (default: the cores available)")
    host: str = Field("127.0.0.1", description="bind address; 0.0.0.0 exposes the service and must be explicit")
    port: int = Field(8000, ge=1, le=65535)
    api_key: SecretStr | None = Field(None, description="when set, scoring routes need 'Authorization: Bearer KEY'")
    api_key_file: Path | None = Field(
        None,
        description="read the API key from this file (stripped; the Docker/Kubernetes secrets convention), "
        "so it stays out of the environment and `ps`",
    )
    auth_open_routes: bool = Field(False, description="also require the key on /health, /ready and /metrics")

    max_batch_tokens: int = Field(
        4096,
        ge=64,
        description="tokens per forward pass: real tokens (each distinct prompt once, no padding) with the "
        "canonical (packed) forward; padded tokens (longest x count) with the padded forward and ONNX",
    )
    max_batch_size: int = Field(64, ge=1, description="sequences per forward pass")
    max_pad_ratio: float = Field(
        1.3,
        ge=1.0,
        description="padded forward and ONNX: cut a pass early rather than let padding pass this ratio of its real "
        "tokens (a packed pass has no padding: unused there)",
    )
    max_wait_ms: float = Field(2.0, ge=0, description="how long a batch waits for more work once the model is idle")
    max_queued: int = Field(2048, ge=1, description="sequences waiting at most; beyond it 429 at once")
    max_responses: int = Field(64, ge=1, description="responses (or items, or queries) per request")
    max_chars: int = Field(200_000, ge=1, description="characters per text (prompt, message, response)")
    max_messages: int = Field(
        512,
        ge=1,
        description="messages per prompt (a message list, or the turns of templated text); beyond it 413 naming "
        "the prompt, before any formatting work",
    )
    max_body_bytes: int = Field(8 * 1024 * 1024, ge=1024, description="request body size; beyond it 413")
    request_timeout_s: float = Field(
        60.0,
        gt=0,
        description="per-request deadline: work that would not start "
        "within it is refused with 429 (never a 504); work already in a forward pass is answered, even late",
    )
    retry_after_s: int = Field(1, ge=1, description="Retry-After seconds sent with 429 at the hard queue cap")
    admit_wait_fraction: float = Field(
        0.7,
        gt=0,
        le=1,
        description="admit a request only when its projected completion (tokens queued ahead of it plus its "
        "own, over the measured tokens/s) lies within this fraction of its deadline; else 429 at once",
    )

    # The connection edge (uvicorn/h11 options and what they lack).
    max_connections: int = Field(
        1024,
        ge=1,
        description="open connections at most; past it the oldest idle one is closed, or (none idle) up to 64 "
        "more are accepted on which only probes and /metrics are served, other requests a JSON 503",
    )
    max_pipelined: int = Field(
        16,
        ge=1,
        description="requests one connection may pipeline (answered back to back from input already sent); "
        "the next gets 429 and the connection closes",
    )
    max_in_flight: int = Field(
        128,
        ge=1,
        description="requests being read or answered at most, probes and /metrics aside; past it 503 with "
        "Retry-After at once (bounds request bodies in memory to max_in_flight x max_body_bytes)",
    )
    max_header_bytes: int = Field(
        16 * 1024, ge=1024, description="request line plus headers at most; past it 431 and the connection closed"
    )
    header_timeout_s: float = Field(
        10.0, gt=0, description="a request's headers must arrive within this; else 408 (or close) and the connection"
    )
    body_timeout_s: float = Field(
        30.0, gt=0, description="a request's whole body must arrive within this once its headers did; else 408"
    )
    keep_alive_timeout_s: int = Field(5, ge=1, description="idle keep-alive connections close after this")
    unhealthy_after_failures: int = Field(3, ge=1, description="consecutive failed batches before /ready says 503")
    prefix_sharing: bool = Field(
        True, description="torch runtime: run a token prefix shared by sequences in a batch once (KV cache)"
    )
    prefix_min_tokens: int = Field(16, ge=1, description="shortest shared prefix worth a separate pass")
    log_texts: bool = Field(False, description="log request texts (debug only; off by default)")
    trust_remote_code: bool = Field(False, description="allow a model's own Python code (off: never run it)")

    max_reward_queries: int = Field(
        4096,
        ge=1,
        description="queries per /get_reward call (OpenRLHF sends whole rollout batches); the deadline grows "
        "with the batch: request_timeout_s per started block of max_responses queries",
    )

    @field_validator("model", "model_id")
    @classmethod
    def _empty_is_none(cls, v: str | None) -> str | None:
        return v or None

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        """cpu, cuda or cuda:N, and a CUDA device that torch can see."""
        if v == "cpu":
            return v
        if not re.fullmatch(r"cuda(:\d+)?", v):
            raise ValueError(f"device is {v!r}; use cpu, cuda or cuda:N (RMSERVE_DEVICE or rmserve serve --device)")
        import torch

        if not torch.cuda.is_available():
            raise ValueError(
                f"device is {v!r} but torch sees no CUDA GPU here (torch {torch.__version__}, built for CUDA "
                f"{torch.version.cuda or 'none'}); serve with --device cpu or run on a machine with a GPU"
            )
        index = int(v.split(":")[1]) if ":" in v else 0
        if index >= torch.cuda.device_count():
            raise ValueError(f"device is {v!r} but only {torch.cuda.device_count()} CUDA device(s) are visible")
        return v

    @model_validator(mode="after")
    def _gpu_dtype_label(self) -> Settings:
        if self.device != "cpu" and self.dtype in ("auto", "bfloat16"):
            log.warning(
                "serving on %s in bf16 (dtype %s): batch invariance not measured on a GPU; a reward may move with "
                "its batch-mates. scripts/gpu_check.sh measures agreement with CPU fp32; --dtype float32 avoids it",
                self.device,
                self.dtype,
            )
        return self

    @model_validator(mode="after")
    def _api_key(self) -> Settings:
        """One API key, never an empty one: an empty key would make `Authorization: Bearer ` pass."""
        if self.api_key_file is not None:
            if self.api_key is not None:
                raise ValueError("give the API key once: RMSERVE_API_KEY or RMSERVE_API_KEY_FILE, not both")
            try:
                text = self.api_key_file.read_text(encoding="utf-8")
            except OSError as e:
                raise ValueError(f"RMSERVE_API_KEY_FILE: cannot read {self.api_key_file}: {e.strerror}") from None
            if not text.strip():
                raise ValueError(f"RMSERVE_API_KEY_FILE: {self.api_key_file} is empty; put the key in it")
            self.api_key = SecretStr(text.strip())
        elif self.api_key is not None and not self.api_key.get_secret_value().strip():
            raise ValueError(
                "RMSERVE_API_KEY is set but empty (or only whitespace): set a key, or unset it to serve without one"
            )
        elif self.api_key is not None:
            self.api_key = SecretStr(self.api_key.get_secret_value().strip())
        return self
