from __future__ import annotations

import json
from pathlib import Path

import pytest

from models.data import RankedExample
from models.evaluate import bound_pairs
from service.cli import main as cli
from tests.models.test_train import synthetic


def test_bound_pairs_keeps_leading_examples_within_the_bound() -> None:
    pair = RankedExample(prompt=[{"role": "user", "content": "p"}], responses=["a", "b"], ranks=[0, 1])
    triple = RankedExample(
        prompt=[{"role": "user", "content": "p"}], responses=["a", "b", "c"], ranks=[0, 1, 2]
    )  # 3 pairs
    exs = [pair, triple, pair, pair]
    assert bound_pairs(exs, None) == exs
    assert bound_pairs(exs, 4) == [pair, triple] and bound_pairs(exs, 5) == [pair, triple, pair]
    assert bound_pairs([triple, pair], 1) == [triple]  # never empty: the first example always counts


def test_eval_max_pairs_and_progress_bar(tmp_path: Path, rm_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = synthetic(tmp_path / "syn.jsonl", 40)
    capsys.readouterr()
    assert cli(["eval", "--model", str(rm_dir), "--data", str(data), "--max-pairs", "7", "--json"]) == 0
    captured = capsys.readouterr()
    res = json.loads(captured.out.strip().splitlines()[-1])
    assert res["pairs"] == 7 and res["files"]["syn.jsonl"]["examples"] == 7
    assert "scoring" in captured.err and "14/14" in captured.err  # tqdm's bar: 7 pairs = 14 sequences
    assert cli(["eval", "--model", str(rm_dir), "--data", str(data), "--no-progress", "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out.strip().splitlines()[-1])["pairs"] == 40 and "scoring" not in captured.err


def test_eval_json_is_alone_on_stdout(tmp_path: Path, rm_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`rmserve eval --json | jq` works: stdout is the JSON object alone; the table goes to stderr."""
    data = synthetic(tmp_path / "syn.jsonl", 12)
    capsys.readouterr()
    assert cli(["eval", "--model", str(rm_dir), "--data", str(data), "--no-progress", "--json"]) == 0
    captured = capsys.readouterr()
    res = json.loads(captured.out)  # the whole of stdout
    assert res["pairs"] == 12 and "accuracy" in captured.err and "syn.jsonl" in captured.err
    assert cli(["eval", "--model", str(rm_dir), "--data", str(data), "--no-progress"]) == 0
    table = capsys.readouterr().out
    assert "syn.jsonl" in table and "accuracy" in table and not table.lstrip().startswith("{")


@pytest.mark.parametrize("native", [False, True], ids=["no-native-bf16", "native-bf16"])
def test_eval_dtype_auto_is_what_serve_picks_here(
    tmp_path: Path, rm_dir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, native: bool
) -> None:
    """`rmserve eval --dtype auto` scores in the dtype `rmserve serve` picks for the model on this CPU: canonical
    bf16 where bf16 is native and it measured faster and batch-invariant, else float32 (both CPU kinds
    tested on any machine: the kind and the measurement are patched)."""
    import shutil

    import service.runtimes as runtimes

    d = tmp_path / "m"
    shutil.copytree(rm_dir, d)
    (d / runtimes.AUTO_CACHE).unlink(missing_ok=True)  # a pick cached in the shared fixture by another test
    monkeypatch.setattr(runtimes, "native_bf16", lambda: native)
    monkeypatch.setattr(
        runtimes, "measure_candidate", lambda _s, _d, _r, dtype, *a: (0.5 if dtype == "bfloat16" else 1.0, 0.0)
    )
    data = synthetic(tmp_path / "syn.jsonl", 6)
    capsys.readouterr()
    assert cli(["eval", "--model", str(d), "--data", str(data), "--no-progress", "--json"]) == 0
    mode = json.loads(capsys.readouterr().out)["mode"]
    assert mode == ("torch-canonical-bfloat16" if native else "torch-canonical-float32")
    assert cli(["eval", "--model", str(d), "--data", str(data), "--no-progress", "--json", "--dtype", "float32"]) == 0
    assert json.loads(capsys.readouterr().out)["mode"] == "torch-canonical-float32"  # asked: kept
