"""The frozen-layer cache on disk: reused by a later run, resumed after a cut, missed when its key changes."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import torch

import models.frozen_cache as fc
from models.reward_model import RewardModel
from tests.models.test_train import _train, synthetic

KEY = {"frozen_weights": "w", "data": ["d"], "max_length": 64}


@pytest.fixture(scope="module")
def model_and_seqs(llama_dir: Path) -> tuple[RewardModel, list[list[int]], int]:
    model, tok = RewardModel.from_backbone(llama_dir, max_length=64, seed=2)
    model.eval()
    f = model.formatter(tok)
    answers = ["Mix flour.", "No", "Knead, then bake for an hour.", "yes " * 9, "Water and salt.", "ok"]
    seqs = [f.encode(f"Question {i}: how do I bake bread?", a).ids for i, a in enumerate(answers)]
    return model, seqs, tok.pad_token_id


def _features(model_and_seqs: Any, cache_dir: Path, key: dict[str, Any] = KEY, **kw: Any) -> tuple[Any, int]:
    model, seqs, pad = model_and_seqs
    return fc.cached_features(model, seqs, 1, pad, cache_dir=cache_dir, key=key, chunk_tokens=40, **kw)


def per_chunk(store: fc.DiskFeatures, model_and_seqs: Any) -> list[torch.Tensor]:
    """The states computed chunk by chunk as the cache does (batch shapes change float rounding)."""
    model, seqs, pad = model_and_seqs
    return [f for a, b in store.chunks for f in fc.frozen_features(model, seqs[a:b], 1, pad)]


def test_second_run_reads_everything_from_disk(
    tmp_path: Path, model_and_seqs: Any, caplog: pytest.LogCaptureFixture
) -> None:
    model, seqs, pad = model_and_seqs
    caplog.set_level(logging.INFO, logger="models.frozen_cache")
    first, n1 = _features(model_and_seqs, tmp_path)
    assert n1 == len(seqs) and "frozen-layer cache miss" in caplog.text
    assert len(first.chunks) > 2  # several chunks of at most 40 tokens (a longer sequence alone)
    caplog.clear()
    again, n2 = _features(model_and_seqs, tmp_path)
    assert n2 == 0 and "frozen-layer cache hit" in caplog.text and "0 of 6 sequences computed" in caplog.text
    assert len(list(tmp_path.iterdir())) == 1
    for i, w in enumerate(per_chunk(again, model_and_seqs)):
        assert torch.equal(again[i], w), i
    whole = fc.frozen_features(model, seqs, 1, pad)  # one batch: equal up to rounding
    assert all(torch.allclose(again[i], w, atol=1e-5) for i, w in enumerate(whole))


def test_a_cut_run_resumes_from_its_last_complete_chunk(
    tmp_path: Path, model_and_seqs: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    seqs = model_and_seqs[1]
    real = fc.frozen_features
    calls = {"n": 0}

    def cut_after_two_chunks(*a: Any, **k: Any) -> list[torch.Tensor]:
        calls["n"] += 1
        if calls["n"] > 2:
            raise KeyboardInterrupt("killed")
        return real(*a, **k)

    monkeypatch.setattr(fc, "frozen_features", cut_after_two_chunks)
    with pytest.raises(KeyboardInterrupt):
        _features(model_and_seqs, tmp_path)
    monkeypatch.setattr(fc, "frozen_features", real)
    folder = next(tmp_path.iterdir())
    assert sorted(p.name for p in folder.glob("chunk-*.bin")) == ["chunk-00000.bin", "chunk-00001.bin"]
    # A chunk file cut short (a kill during a copy) counts as missing too.
    (folder / "chunk-00001.bin").write_bytes((folder / "chunk-00001.bin").read_bytes()[:-4])
    caplog.set_level(logging.INFO, logger="models.frozen_cache")
    store, computed = _features(model_and_seqs, tmp_path)
    first_chunk = store.chunks[0][1]
    assert computed == len(seqs) - first_chunk and "frozen-layer cache resumed" in caplog.text
    assert all(torch.equal(store[i], w) for i, w in enumerate(per_chunk(store, model_and_seqs)))


def test_another_key_misses(tmp_path: Path, model_and_seqs: Any, llama_dir: Path) -> None:
    _features(model_and_seqs, tmp_path)
    assert _features(model_and_seqs, tmp_path, {**KEY, "max_length": 128})[1] == 6
    assert _features(model_and_seqs, tmp_path, dtype=torch.bfloat16)[1] == 6
    other, _ = RewardModel.from_backbone(llama_dir, max_length=64, seed=2)
    with torch.no_grad():
        other.body.layers[0].mlp.up_proj.weight.mul_(2)  # a frozen layer changes: another fingerprint
    model = model_and_seqs[0]
    assert fc.frozen_fingerprint(model, 1) != fc.frozen_fingerprint(other, 1)
    with torch.no_grad():
        other.body.layers[1].mlp.up_proj.weight.mul_(2)  # the trained top layer is not part of it
    other.body.layers[0].mlp.up_proj.weight.data.div_(2)
    assert fc.frozen_fingerprint(model, 1) == fc.frozen_fingerprint(other, 1)
    assert len(list(tmp_path.iterdir())) == 3


def test_bf16_storage_holds_the_rounded_states(tmp_path: Path, model_and_seqs: Any) -> None:
    store, _ = _features(model_and_seqs, tmp_path, dtype=torch.bfloat16)
    for i, w in enumerate(per_chunk(store, model_and_seqs)):
        assert store[i].dtype == torch.bfloat16 and torch.equal(store[i], w.to(torch.bfloat16))


def test_training_reuses_the_cache_and_misses_on_another_max_length(
    tmp_path: Path, llama_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = synthetic(tmp_path / "syn.jsonl", 60)
    common = ["--method", "top-n", "--top-n", "1", "--max-steps", "2", "--cache-frozen", "on"]
    caplog.set_level(logging.INFO, logger="models.frozen_cache")
    _train(llama_dir, data, tmp_path / "a", *common)
    assert caplog.text.count("frozen-layer cache miss") == 2  # train and dev
    caplog.clear()
    _train(llama_dir, data, tmp_path / "b", *common)
    assert caplog.text.count("frozen-layer cache hit") == 2 and "cache miss" not in caplog.text
    assert all(" 0 of " in r.getMessage() for r in caplog.records if "frozen-layer cache" in r.getMessage())
    caplog.clear()
    _train(llama_dir, data, tmp_path / "c", *common, "--max-length", "24")
    assert caplog.text.count("frozen-layer cache miss") == 2
