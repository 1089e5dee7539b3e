"""`--resume` refuses a run whose step sequence differs from the checkpoint's (world size x
--grad-accum, seed, data, batch tokens, ...), naming the checkpoint's value and the new one."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch import nn

from models.train.checkpoint import CHECKPOINT_DIR, check_resume, read_checkpoint_state, save_checkpoint
from models.train.config import TrainConfig


def _checkpoint(out: Path, cfg: TrainConfig, world: int) -> dict:
    """A real checkpoint of a one-layer model, as the loop writes it; its state.json."""
    model = nn.Linear(2, 1)
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    save_checkpoint(out, model, opt, sched, 4, [], cfg, None, world)
    return read_checkpoint_state(out)


@pytest.fixture
def cfg(tmp_path: Path) -> TrainConfig:
    return TrainConfig(backbone="b", data=[str(tmp_path / "d.jsonl")], out=str(tmp_path / "out"), grad_accum=1)


def test_a_two_rank_checkpoint_is_refused_on_one_process(tmp_path: Path, cfg: TrainConfig) -> None:
    """The reviewer's case: 2 ranks x 1 written, 1 x 1 resumed (twice the steps, another model)."""
    state = _checkpoint(tmp_path, cfg, world=2)
    assert state["world"] == 2
    with pytest.raises(ValueError) as e:
        check_resume(state, cfg, 1, tmp_path / CHECKPOINT_DIR)
    msg = str(e.value)
    assert "2 x 1 = 2" in msg and "now 1 x 1 = 1" in msg and str(tmp_path / CHECKPOINT_DIR) in msg
    assert "same product" in msg


def test_the_same_product_of_world_and_grad_accum_resumes(tmp_path: Path, cfg: TrainConfig) -> None:
    state = _checkpoint(tmp_path, cfg, world=2)
    check_resume(state, replace(cfg, grad_accum=2), 1, tmp_path)  # 1 x 2 == 2 x 1: the same steps
    check_resume(state, cfg, 2, tmp_path)
    # what does not touch the step sequence may change (halt_after is how a halted run is resumed)
    check_resume(state, replace(cfg, eval_every=3, save_every=7, halt_after=9, device="auto"), 2, tmp_path)
    with pytest.raises(ValueError, match="now 2 x 2 = 4"):
        check_resume(state, replace(cfg, grad_accum=2), 2, tmp_path)


@pytest.mark.parametrize(
    ("field", "value", "flag"),
    [
        ("seed", 1, "--seed was 0, now 1"),
        ("batch_tokens", 2048, "--batch-tokens was 4096, now 2048"),
        ("data", ["other.jsonl"], "--data was"),
        ("max_length", 256, "--max-length was 512, now 256"),
        ("epochs", 2.0, "--epochs was 1.0, now 2.0"),
        ("train_max", 10, "--train-max was 0, now 10"),
    ],
)
def test_a_changed_step_sequence_field_is_refused(
    tmp_path: Path, cfg: TrainConfig, field: str, value: object, flag: str
) -> None:
    state = _checkpoint(tmp_path, cfg, world=1)
    with pytest.raises(ValueError, match=flag):
        check_resume(state, replace(cfg, **{field: value}), 1, tmp_path)


def test_a_checkpoint_without_a_world_size_is_checked_on_grad_accum(tmp_path: Path, cfg: TrainConfig) -> None:
    state = _checkpoint(tmp_path, cfg, world=1)
    del state["world"]
    check_resume(state, cfg, 2, tmp_path)
    with pytest.raises(ValueError, match="--grad-accum was 1, now 2"):
        check_resume(state, replace(cfg, grad_accum=2), 1, tmp_path)
