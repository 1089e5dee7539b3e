"""`rmserve serve --device` / RMSERVE_DEVICE: a GPU asked where torch sees none is refused before a port
is bound, with a message that says so; a malformed device names what is allowed."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from service.cli import main as cli
from service.settings import Settings


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_serve_device_cuda_refused_without_gpu(rm_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(["serve", "--model", str(rm_dir), "--device", "cuda", "--port", "1"]) == 2
    err = capsys.readouterr().err
    assert "device" in err and "torch sees no CUDA GPU" in err and "--device cpu" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_rmserve_device_env_refused_without_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RMSERVE_DEVICE", "cuda:0")
    with pytest.raises(ValidationError, match="torch sees no CUDA GPU"):
        Settings()


def test_device_names_what_is_allowed() -> None:
    with pytest.raises(ValidationError, match="use cpu, cuda or cuda:N"):
        Settings(device="gpu")
    assert Settings(device="cpu").device == "cpu"
