from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from models.export import export_onnx
from models.reward_model import RewardModel
from service.runtimes.onnx_runtime import OnnxRuntime
from service.runtimes.torch_runtime import TorchRuntime

TEXTS = [
    ("Hi", "Hello"),
    ("How do I bake bread?", "Mix flour and water, knead, bake for 40 minutes."),
    ("Numbers?", "0123456789 " * 5),
    ("x", "y"),
]


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory, rm_dir: Path) -> Path:
    d = tmp_path_factory.mktemp("onnx") / "m"
    shutil.copytree(rm_dir, d)
    export_onnx(d)
    export_onnx(d, int8=True)
    return d


def _seqs(d: Path) -> list[list[int]]:
    model, tok = RewardModel.load(d)
    f = model.formatter(tok)
    return [f.encode(p, r).ids for p, r in TEXTS]


def test_onnx_fp32_matches_torch(exported: Path) -> None:
    model, tok = RewardModel.load(exported)
    seqs = _seqs(exported)
    ref = TorchRuntime(model, tok.pad_token_id)
    onnx, _ = OnnxRuntime.load(exported, int8=False)
    for batch in (seqs, seqs[:1], seqs[2:], [seqs[3]] * 3):  # dynamic batch and length axes
        assert onnx.score(batch) == pytest.approx(ref.score(batch), abs=1e-4)
    alone = [onnx.score([s])[0] for s in seqs]
    assert onnx.score(seqs) == pytest.approx(alone, abs=1e-5)


def test_onnx_int8_is_quantized_and_close_on_the_tiny_model(exported: Path) -> None:
    seqs = _seqs(exported)
    fp32, _ = OnnxRuntime.load(exported, int8=False)
    int8, _ = OnnxRuntime.load(exported, int8=True)
    assert int8.dtype == "int8"
    a, b = fp32.score(seqs), int8.score(seqs)
    assert max(abs(x - y) for x, y in zip(a, b, strict=True)) < 0.5
    assert a != b  # really quantized


def test_onnx_missing_file_is_named(tmp_path: Path, rm_dir: Path) -> None:
    from models.reward_model import ModelDirError

    with pytest.raises(ModelDirError, match="rmserve export"):
        OnnxRuntime.load(rm_dir, int8=False)


def test_service_on_onnx_runtime(exported: Path) -> None:
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.settings import Settings

    model, tok = RewardModel.load(exported)
    f = model.formatter(tok)
    ref = [model.score_ids([f.encode(p, r).ids], tok.pad_token_id)[0] for p, r in TEXTS[:2]]
    with TestClient(create_app(Settings(model=str(exported), runtime="onnx", dtype="float32"))) as c:
        body = c.post("/v1/score", json={"items": [{"prompt": p, "response": r} for p, r in TEXTS[:2]]}).json()
        assert body["scores"] == pytest.approx(ref, abs=1e-4)
        m = c.get("/v1/models").json()["data"][0]
        assert m["runtime"] == "onnx" and m["dtype"] == "float32"


def test_auto_runtime_prefers_the_export(exported: Path, rm_dir: Path) -> None:
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.settings import Settings

    with TestClient(create_app(Settings(model=str(exported)))) as c:
        m = c.get("/v1/models").json()["data"][0]
        assert (m["runtime"], m["dtype"]) == ("onnx", "float32")
    with TestClient(create_app(Settings(model=str(exported), dtype="int8"))) as c:
        m = c.get("/v1/models").json()["data"][0]
        assert (m["runtime"], m["dtype"]) == ("onnx", "int8")
    with TestClient(create_app(Settings(model=str(rm_dir)))) as c:
        assert c.get("/v1/models").json()["data"][0]["runtime"] == "torch"
