from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.tiny import make_gpt2, make_llama, make_tokenizer, save_lm

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def tokenizer() -> Any:
    return make_tokenizer()


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer: Any) -> Path:
    return save_lm(make_llama(len(tokenizer)), tokenizer, tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="session")
def gpt2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tok = make_tokenizer(chat_template=False)
    return save_lm(make_gpt2(len(tok)), tok, tmp_path_factory.mktemp("gpt2"))


@pytest.fixture(scope="session")
def rm_dir(tmp_path_factory: pytest.TempPathFactory, llama_dir: Path) -> Path:
    """A saved tiny Llama reward model directory (random head, fixed seed)."""
    from models.reward_model import RewardModel

    model, tok = RewardModel.from_backbone(llama_dir, max_length=128, seed=1)
    model.config.normalization = {"mean": 0.5, "std": 2.0}
    return model.save(tmp_path_factory.mktemp("rm") / "model", tok)
