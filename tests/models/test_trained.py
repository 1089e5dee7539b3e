"""Shipping only what training changed, and rebuilding the full model from the backbone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from models.evaluate import score_sequences
from models.reward_model import RewardModel
from models.trained import MANIFEST, TrainedError, assemble
from tests.models.test_train import _train, synthetic

TEXTS = ["the quick brown fox GOOD", "lazy dog BAD", "bread flour water yeast salt answers score GOOD"]


@pytest.fixture(scope="module")
def syn(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synthetic(tmp_path_factory.mktemp("data") / "syn.jsonl", 120)


def _scores(model_dir: Path) -> list[float]:
    model, tok = RewardModel.load(model_dir)
    return score_sequences(model, [tok(t)["input_ids"] for t in TEXTS], tok.pad_token_id)


@pytest.mark.parametrize(
    ("method", "extra"),
    [("lora", ["--lora-rank", "4", "--lr", "5e-3"]), ("top-n", ["--top-n", "1", "--lr", "3e-3"])],
)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_assembled_model_matches_the_trained_one(
    tmp_path: Path, llama_dir: Path, syn: Path, method: str, extra: list[str], dtype: str
) -> None:
    out = _train(llama_dir, syn, tmp_path / "rm", "--method", method, "--epochs", "1", "--trained-dtype", dtype, *extra)
    trained = out / "trained"
    manifest = json.loads((trained / MANIFEST).read_text())
    assert manifest["method"] == method and manifest["dtype"] == dtype
    names = {t for s in manifest["shards"] for t in s["tensors"]}
    assert "head.weight" in names and "head.bias" not in names  # heads are bias-free (issue 22)
    if method == "lora":
        assert manifest["lora_scales"] and all(n.endswith(("lora_A", "lora_B")) or n.startswith("head.") for n in names)
    else:
        assert any(".layers.1." in n for n in names) and not any(".layers.0." in n for n in names)
    rebuilt = assemble(trained, llama_dir, tmp_path / "rebuilt")
    want, got = _scores(out), _scores(rebuilt)
    tol = 1e-5 if dtype == "float32" else 0.05
    assert max(abs(a - b) for a, b in zip(want, got, strict=True)) < tol, (want, got)
    assert (
        json.loads((rebuilt / "rmserve.json").read_text())["normalization"]
        == json.loads((out / "rmserve.json").read_text())["normalization"]
    )


def test_damaged_shard_is_named(tmp_path: Path, llama_dir: Path, syn: Path) -> None:
    out = _train(llama_dir, syn, tmp_path / "rm", "--method", "top-n", "--top-n", "1", "--max-steps", "1")
    shard = next((out / "trained").glob("trained-*.safetensors"))
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(TrainedError, match=shard.name + ".*damaged"):
        assemble(out / "trained", llama_dir, tmp_path / "rebuilt")


def test_full_method_ships_no_trained_folder(tmp_path: Path, llama_dir: Path, syn: Path) -> None:
    out = _train(llama_dir, syn, tmp_path / "rm", "--method", "full", "--max-steps", "1")
    assert not (out / "trained").exists()
