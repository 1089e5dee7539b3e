"""scripts/gpu_check.py's choices that need no GPU: which backbone, which data, and how a fine-tune
that fails or overruns is recorded (under the same key a success would use)."""

from __future__ import annotations

import importlib.util
import subprocess
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def gc() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_the_smollm2_backbone_is_picked_by_name(gc: ModuleType, tmp_path: Path) -> None:
    for name in ("Aaa-other", "HuggingFaceTB--SmolLM2-135M-Instruct"):
        (tmp_path / "backbones" / name).mkdir(parents=True)
    assert gc.find_backbone(tmp_path).name == "HuggingFaceTB--SmolLM2-135M-Instruct"
    (tmp_path / "backbones" / "HuggingFaceTB--SmolLM2-135M-Instruct").rmdir()
    with pytest.raises(SystemExit, match=r"no SmolLM2 backbone .* give --backbone"):
        gc.find_backbone(tmp_path)


def test_data_dir_given_wins_and_none_found_means_synthetic(gc: ModuleType, tmp_path: Path) -> None:
    assert gc.find_data_dir(str(tmp_path)) == tmp_path
    found = gc.find_data_dir(None)
    assert found is None or (found.name == "data" and found.parent.name == "shared" and found.is_dir())
    exs, source = gc.examples(None, 4)
    assert source == "synthetic" and len(exs) == 4


def test_failed_and_timed_out_fine_tunes_use_the_success_keys(
    gc: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[Any] = []

    def fake_run(cmd: list[str], **kw: Any) -> Any:
        calls.append(kw["timeout"])
        if "fsdp" in cmd:
            raise subprocess.TimeoutExpired(cmd, kw["timeout"], stderr="still loading")
        return subprocess.CompletedProcess(cmd, 1, "", "boom")

    monkeypatch.setattr(gc.subprocess, "run", fake_run)
    exs, _ = gc.examples(None, 4)
    out = gc.finetune(tmp_path / "bb", "cpu", exs, 1, 256, timeout=7.0)
    assert calls == [7.0, 7.0]
    assert set(out) >= {"one_process", "fsdp"} and "ddp" not in out
    assert out["one_process"]["error"] == "boom" and out["one_process"]["timed_out"] is False
    assert out["fsdp"]["timed_out"] is True and "7 s" in out["fsdp"]["error"]
