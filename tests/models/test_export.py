from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

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


def test_int8_is_refused_with_its_reason(exported: Path) -> None:
    from fastapi.testclient import TestClient

    from models.export import Int8Refused
    from service.app import create_app
    from service.settings import Settings

    with pytest.raises(Int8Refused, match="batch-mates"):
        export_onnx(exported, int8=True)
    assert not (exported / "model.int8.onnx").exists()
    with pytest.raises(Int8Refused, match="use float32"):
        OnnxRuntime.load(exported, int8=True)
    with pytest.raises(Int8Refused), TestClient(create_app(Settings(model=str(exported), dtype="int8"))):
        pass


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


def test_auto_runtime_candidates_follow_native_bf16(
    exported: Path, rm_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Canonical bf16 is an `auto` candidate only where the CPU computes bf16 natively; an explicit
    dtype or forward is kept as asked on either kind."""
    import service.runtimes as runtimes
    from service.runtimes import candidates
    from service.settings import Settings

    s = Settings(model=str(exported), runtime="auto", dtype="auto")
    monkeypatch.setattr(runtimes, "native_bf16", lambda: True)
    assert candidates(s, exported) == [("torch", "float32"), ("torch", "bfloat16"), ("onnx", "float32")]
    assert candidates(Settings(model=str(rm_dir), runtime="auto", dtype="auto"), rm_dir) == [
        ("torch", "float32"),
        ("torch", "bfloat16"),
    ]
    padded = Settings(model=str(exported), runtime="auto", dtype="auto", forward="padded")
    assert candidates(padded, exported) == [("torch", "float32"), ("onnx", "float32")]  # padded bf16 varies
    assert candidates(Settings(model=str(exported), dtype="float32"), exported) == [
        ("torch", "float32"),
        ("onnx", "float32"),
    ]
    monkeypatch.setattr(runtimes, "native_bf16", lambda: False)
    assert candidates(s, exported) == [("torch", "float32"), ("onnx", "float32")]


def test_auto_runtime_picks_the_faster_measured_candidate_and_caches_it(
    exported: Path, rm_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import json

    from fastapi.testclient import TestClient

    import service.runtimes as runtimes
    from service.app import create_app
    from service.runtimes import AUTO_CACHE, candidates, choose_runtime
    from service.settings import Settings

    # the CPU kind must not change the test: bf16 candidates are tested in the test above
    monkeypatch.setattr(runtimes, "native_bf16", lambda: False)
    # explicit auto: RMSERVE_RUNTIME / RMSERVE_DTYPE in the environment must not change the test
    s = Settings(model=str(exported), runtime="auto", dtype="auto")
    assert candidates(s, exported) == [("torch", "float32"), ("onnx", "float32")]
    assert candidates(Settings(model=str(rm_dir), runtime="auto", dtype="auto"), rm_dir) == [
        ("torch", "float32")
    ]  # nothing to measure
    assert candidates(Settings(model=str(exported), dtype="int8"), exported) == [("onnx", "int8")]  # only when asked
    assert candidates(Settings(model=str(exported), dtype="bfloat16"), exported) == [("torch", "bfloat16")]
    calls: list[str] = []

    def timer(onnx_seconds: float) -> Any:
        def t(settings: Settings, d: Path, runtime: str, dtype: str) -> float:
            calls.append(runtime)
            return onnx_seconds if runtime == "onnx" else 1.0

        return t

    (exported / AUTO_CACHE).unlink(missing_ok=True)
    assert choose_runtime(s, exported, timer(0.5)) == ("onnx", "float32")
    assert calls == ["torch", "onnx"]
    assert json.loads((exported / AUTO_CACHE).read_text())["choice"] == ["onnx", "float32"]
    assert choose_runtime(s, exported, timer(2.0)) == ("onnx", "float32")  # cached: not measured again
    assert calls == ["torch", "onnx"]
    with TestClient(create_app(s)) as c:  # the service reads the cached pick
        m = c.get("/v1/models").json()["data"][0]
        assert (m["runtime"], m["dtype"]) == ("onnx", "float32")
    other = Settings(
        model=str(exported), runtime="auto", dtype="auto", threads=7
    )  # another thread count is another measurement
    assert choose_runtime(other, exported, timer(2.0)) == ("torch", "float32")
    assert calls == ["torch", "onnx", "torch", "onnx"]
    with TestClient(create_app(Settings(model=str(rm_dir), runtime="auto", dtype="auto"))) as c:
        assert c.get("/v1/models").json()["data"][0]["runtime"] == "torch"
    (exported / AUTO_CACHE).unlink()


def test_time_candidate_runs_each_runtime(exported: Path) -> None:
    from service.runtimes import time_candidate
    from service.settings import Settings

    s = Settings(model=str(exported), threads=1)
    for runtime in ("torch", "onnx"):
        assert 0.0 < time_candidate(s, exported, runtime, "float32", repeats=1) < 60.0
