"""The distributed refusals and notices as plain functions (no torchrun): the early-stopping refusal
gives the reason of its mode, --cache-frozen auto says when it turns the cache off, and the reward
model's forward returns a fresh tensor (FSDP2 warns about a view returned by the module it wraps)."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from models.reward_model import RewardModel
from models.train.config import TrainConfig
from models.train.run import check_distributed, frozen_cache_off_reason


def test_early_stopping_refusal_names_the_reason_of_each_mode() -> None:
    cfg = TrainConfig(early_stopping_patience=2, eval_every=2)
    with pytest.raises(ValueError) as fsdp:
        check_distributed(TrainConfig(**{**cfg.__dict__, "sharding": "fsdp"}), 2)
    with pytest.raises(ValueError) as ddp:
        check_distributed(cfg, 2)
    assert "does not combine with --sharding fsdp" in str(fsdp.value) and "shards" in str(fsdp.value)
    assert "DDP" not in str(fsdp.value)
    assert "does not combine with DDP on 2 processes" in str(ddp.value)
    assert "only rank 0 evaluates" in str(ddp.value)
    check_distributed(cfg, 1)  # one process: allowed


def test_cache_frozen_auto_says_why_it_is_off_under_torchrun() -> None:
    cfg = TrainConfig(method="top-n", cache_frozen="auto")
    ddp = frozen_cache_off_reason(cfg, 2, fsdp=False)
    fsdp = frozen_cache_off_reason(cfg, 1, fsdp=True)
    assert ddp is not None and "off under DDP on 2 processes" in ddp and "gradients" in ddp
    assert fsdp is not None and "off under --sharding fsdp" in fsdp
    assert frozen_cache_off_reason(cfg, 1, fsdp=False) is None  # one process decides by the model
    assert frozen_cache_off_reason(TrainConfig(method="lora"), 2, fsdp=False) is None  # no cache to turn off
    assert frozen_cache_off_reason(TrainConfig(method="top-n", cache_frozen="off"), 2, fsdp=False) is None


def test_forward_returns_a_fresh_tensor(llama_dir: Path) -> None:
    model, _tok = RewardModel.from_backbone(llama_dir, max_length=32, seed=0)
    ids = torch.tensor([[5, 6, 7], [8, 9, 10]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r = model(ids, torch.ones_like(ids))
    assert r.shape == (2,) and not r._is_view()
