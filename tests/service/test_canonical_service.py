"""Through the service, in fp32 and bf16: a (prompt, answer)'s reward under 32 concurrent clients, whatever
its batch-mates and whether its prompt is shared, is the same bits as when it is scored alone."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import httpx
import pytest

from service.settings import Settings
from tests.service.conftest import live_server

PROMPTS = [f"Question {i}: how do I bake {'good ' * (i % 4)}bread?" for i in range(6)]
ANSWERS = [" ".join(["flour"] * (1 + j % 5)) + f" and water, answer {j}" for j in range(5)]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_32_concurrent_clients_get_the_bits_of_each_pair_alone(rm_dir: Path, dtype: str) -> None:
    settings = Settings(model=str(rm_dir), dtype=dtype, runtime="torch", max_wait_ms=20)
    with live_server(settings) as url:
        card = httpx.get(url + "/v1/models").json()["data"][0]
        assert card["mode"]["forward"] == "canonical" and card["mode"]["batch_invariant"] is True
        assert card["mode"]["dtype"] == dtype

        async def main() -> tuple[dict[tuple[int, int], float], list[tuple[list[int], int, list[float]]]]:
            async with httpx.AsyncClient(base_url=url, timeout=120) as c:
                alone = {}
                for i, p in enumerate(PROMPTS):  # one pair per request, one request at a time
                    for j, a in enumerate(ANSWERS):
                        r = await c.post("/v1/score", json={"prompt": p, "responses": [a]})
                        alone[i, j] = r.json()["scores"][0]
                rng = random.Random(5)
                asks = [
                    (rng.randrange(len(PROMPTS)), rng.sample(range(len(ANSWERS)), rng.randint(1, 5))) for _ in range(96)
                ]

                async def client(k: int) -> list[tuple[list[int], int, list[float]]]:
                    out = []
                    for i, js in asks[k::32]:  # 32 clients, 3 requests each
                        body = {"prompt": PROMPTS[i], "responses": [ANSWERS[j] for j in js]}
                        r = await c.post("/v1/score", json=body)
                        assert r.status_code == 200, r.text[:200]
                        out.append((js, i, r.json()["scores"]))
                    return out

                got = [x for part in await asyncio.gather(*(client(k) for k in range(32))) for x in part]
                return alone, got

        alone, got = asyncio.run(main())
        metrics = httpx.get(url + "/metrics").text
    for js, i, scores in got:
        assert scores == [alone[i, j] for j in js], (i, js)
    assert len(set(alone.values())) > len(alone) // 2  # not a constant
    lines = metrics.splitlines()
    count = float(next(ln for ln in lines if ln.startswith("rmserve_batch_size_count")).split()[-1])
    le1 = float(next(ln for ln in lines if ln.startswith('rmserve_batch_size_bucket{le="1.0"}')).split()[-1])
    assert count > le1  # passes of several sequences did run


@pytest.mark.parametrize("native", [False, True], ids=["no-native-bf16", "native-bf16"])
def test_auto_picks_the_fastest_mode_measured_invariant(
    rm_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, native: bool
) -> None:
    """A faster candidate whose rewards moved with their batch-mates is not picked; the measurement is
    cached with each candidate's alone-vs-batch difference and the card's mode reports it. Both CPU
    kinds are tested on any machine: where bf16 is native (AMX / AVX512-BF16) canonical bf16 is a
    candidate too, elsewhere it is not (emulated bf16 is slower)."""
    import json
    import shutil

    import service.runtimes as runtimes
    from models.export import ONNX_FP32
    from service.runtimes import AUTO_CACHE, choose_runtime, measured_invariance

    monkeypatch.setattr(runtimes, "native_bf16", lambda: native)
    d = tmp_path / "m"
    shutil.copytree(rm_dir, d)
    (d / AUTO_CACHE).unlink(missing_ok=True)  # a pick cached in the shared fixture by another test
    (d / ONNX_FP32).write_bytes(b"not measured for real here")
    # seconds, alone-vs-batch difference per candidate; bf16 fastest but (here) not invariant
    measured = {"torch:float32": (1.0, 0.0), "torch:bfloat16": (0.3, 1e-3), "onnx:float32": (0.5, 3e-6)}

    def timer(_s: Settings, _d: Path, r: str, t: str) -> tuple[float, float]:
        return measured[f"{r}:{t}"]

    s = Settings(model=str(d), runtime="auto", dtype="auto")  # named: RMSERVE_DTYPE in the environment must not decide
    assert choose_runtime(s, d, timer) == ("torch", "float32")
    cached = json.loads((d / AUTO_CACHE).read_text())
    expected = {"torch:float32": 0.0, "onnx:float32": 3e-6} | ({"torch:bfloat16": 1e-3} if native else {})
    assert cached["alone_vs_batch"] == expected
    assert measured_invariance(d, "onnx", "float32") == 3e-6
    (d / AUTO_CACHE).unlink()
    measured["onnx:float32"] = (0.5, 0.0)  # invariant and faster: picked
    assert choose_runtime(s, d, timer) == ("onnx", "float32")
    (d / AUTO_CACHE).unlink()
    measured["torch:bfloat16"] = (0.3, 0.0)  # invariant and fastest: picked where bf16 is native, else not a candidate
    assert choose_runtime(s, d, timer) == (("torch", "bfloat16") if native else ("onnx", "float32"))
