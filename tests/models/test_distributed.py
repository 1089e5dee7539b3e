"""The trainer under torchrun on CPU (gloo, 2 processes, a tiny Llama): the same per-step losses at any
world size (one process with --grad-accum 2, DDP on 2 ranks, FSDP2 on 2 ranks), sharded checkpoints
that resume exactly, the FSDP output in the standard format, the memory per rank, and the refusals."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from service.cli import main as cli
from tests.models.test_train import synthetic

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synthetic(tmp_path_factory.mktemp("dist") / "syn.jsonl", 60, seed=3)


def train_args(llama_dir: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "train",
        "--backbone",
        str(llama_dir),
        "--data",
        str(data),
        "--out",
        str(out),
        "--method",
        "full",
        "--dtype",
        "float32",
        "--batch-tokens",
        "300",
        "--dev-fraction",
        "0.1",
        "--lr",
        "2e-3",
        "--seed",
        "0",
        "--norm-samples",
        "16",
        "--cache-dir",
        "none",
        *extra,
    ]


def torchrun(args: list[str], nproc: int = 2, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    """`torchrun --standalone --nproc-per-node N -m service.cli ARGS` in a subprocess (gloo on CPU)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    proc = subprocess.run(
        [*cmd, "-m", "service.cli", *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def losses(out: Path) -> list[float]:
    return [h["loss"] for h in json.loads((out / "metrics.json").read_text())["history"]]


def training(out: Path) -> dict[str, Any]:
    return dict(json.loads((out / "metrics.json").read_text())["training"])


def test_same_losses_one_process_ddp_fsdp(tmp_path: Path, llama_dir: Path, data: Path) -> None:
    one = tmp_path / "one"
    assert cli(train_args(llama_dir, data, one, "--grad-accum", "2")) == 0
    torchrun(train_args(llama_dir, data, tmp_path / "ddp"))
    torchrun(train_args(llama_dir, data, tmp_path / "fsdp", "--sharding", "fsdp"))
    a, b, c = losses(one), losses(tmp_path / "ddp"), losses(tmp_path / "fsdp")
    print("step  one-process-ga2  ddp-2  fsdp-2")
    for k, (x, y, z) in enumerate(zip(a, b, c, strict=True)):
        print(f"{k + 1:4d}  {x:.6f}  {y:.6f}  {z:.6f}")
    assert len(a) == len(b) == len(c) >= 4
    assert max(abs(x - y) for x, y in zip(a, b, strict=True)) < 1e-4
    assert max(abs(x - z) for x, z in zip(a, c, strict=True)) < 1e-4
    # memory: FSDP's parameters (and optimizer state) per rank are about half of one process's
    m1 = training(one)["memory_per_rank"][0]
    mf = training(tmp_path / "fsdp")["memory_per_rank"]
    print("memory one process", m1, "fsdp per rank", mf)
    assert len(mf) == 2
    for rank in mf:
        assert rank["parameters"] <= 0.6 * m1["parameters"]
        assert rank["optimizer_state"] <= 0.6 * m1["optimizer_state"]
    assert training(tmp_path / "fsdp")["sharding"] == "fsdp"
