from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from models.data import RankedExample, write_jsonl
from models.evaluate import EncodedExample, encode_examples, kendall_tau
from models.formatting import Formatter
from models.reward_model import RewardModel
from models.train import build_batch, make_batches, micro_batch_stream
from service.cli import main as cli

WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "lazy",
    "dog",
    "bread",
    "flour",
    "water",
    "yeast",
    "salt",
    "answers",
    "score",
]


def synthetic(path: Path, n: int, seed: int = 0, ranked: bool = False) -> Path:
    """A learnable preference: the better response carries the GOOD marker, the worse one BAD."""
    rng = random.Random(seed)
    sent = lambda a, b: " ".join(rng.choice(WORDS) for _ in range(rng.randint(a, b)))  # noqa: E731
    recs: list[dict[str, Any]] = []
    for _ in range(n):
        if ranked:
            k = rng.randint(2, 5)
            resp = [sent(2, 8) + (" GOOD" if i == 0 else " BAD" * i) for i in range(k)]
            recs.append({"prompt": sent(3, 10), "responses": resp, "ranks": list(range(k))})
        else:
            recs.append({"prompt": sent(3, 10), "chosen": sent(3, 9) + " GOOD", "rejected": sent(3, 9) + " BAD"})
    write_jsonl(path, recs)
    return path


@pytest.fixture(scope="module")
def syn(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synthetic(tmp_path_factory.mktemp("data") / "syn.jsonl", 240)


def _train(llama_dir: Path, data: Path, out: Path, *extra: str) -> Path:
    args = [
        "train",
        "--backbone",
        str(llama_dir),
        "--data",
        str(data),
        "--out",
        str(out),
        "--dtype",
        "float32",
        "--batch-tokens",
        "1024",
        "--dev-fraction",
        "0.2",
        "--seed",
        "0",
        "--cache-dir",
        str(out.parent / "frozen-cache"),  # not the user's RMSERVE_HOME
        *extra,
    ]
    assert cli(args) == 0
    return out


def test_kwise_batch_forwards_each_response_once(tokenizer: Any) -> None:
    f = Formatter(tokenizer, 128)
    exs = [
        RankedExample([{"role": "user", "content": f"q{k}"}], [f"a{i}" for i in range(k)], list(range(k)))
        for k in range(2, 10)
    ]
    groups = encode_examples(f, exs)
    batch = build_batch(groups, list(range(len(groups))))
    assert len(batch.seqs) == sum(range(2, 10))  # every response once
    for gi, k in enumerate(range(2, 10)):
        assert batch.pair_group.count(gi) == k * (k - 1) // 2
    assert len(set(zip(batch.better, batch.worse, strict=True))) == len(batch.better)


def test_token_budget_batches(tokenizer: Any) -> None:
    f = Formatter(tokenizer, 128)
    exs = [RankedExample([{"role": "user", "content": "q " * (i % 17)}], ["a " * i, "b"], [0, 1]) for i in range(40)]
    groups = encode_examples(f, exs)
    batches = make_batches(groups, 400)
    assert sorted(i for b in batches for i in b) == list(range(40))
    for b in batches:
        seqs = [s for i in b for s in groups[i].seqs]
        assert len(b) == 1 or max(map(len, seqs)) * len(seqs) <= 400
    assert list(micro_batch_stream(3, 2, 0)) == list(micro_batch_stream(3, 2, 0))
    assert len(list(micro_batch_stream(4, 1.5, 0))) == 6


@pytest.mark.parametrize("method", ["full", "top-n", "lora"])
def test_training_learns_a_synthetic_preference(tmp_path: Path, llama_dir: Path, syn: Path, method: str) -> None:
    extra = {
        "full": ["--lr", "2e-3"],
        "top-n": ["--top-n", "1", "--lr", "3e-3"],
        "lora": ["--lora-rank", "8", "--lr", "5e-3"],
    }[method]
    out = _train(llama_dir, syn, tmp_path / "rm", "--method", method, "--epochs", "3", *extra)
    card = json.loads((out / "metrics.json").read_text())
    assert card["dev"]["accuracy"] >= 0.95, card["dev"]
    tr = card["training"]
    assert tr["trainable_tensors_changed"] == tr["trainable_tensors"] > 0  # every trained parameter moved
    # The saved directory loads and reproduces the dev accuracy exactly through `rmserve eval`.
    model, _ = RewardModel.load(out)
    assert model.config.normalization and model.config.normalization["std"] > 0
    assert (out / "MODEL_CARD.md").read_text().count("Dev accuracy") == 1
    if method == "top-n":
        base, _ = RewardModel.from_backbone(llama_dir)
        sd, sd0 = model.body.state_dict(), base.body.state_dict()
        assert torch.equal(sd["layers.0.mlp.up_proj.weight"], sd0["layers.0.mlp.up_proj.weight"])  # frozen
        assert not torch.equal(sd["layers.1.mlp.up_proj.weight"], sd0["layers.1.mlp.up_proj.weight"])


def test_listwise_on_ranked_lists(tmp_path: Path, llama_dir: Path) -> None:
    data = synthetic(tmp_path / "ranked.jsonl", 160, ranked=True)
    out = _train(
        llama_dir,
        data,
        tmp_path / "rm",
        "--method",
        "full",
        "--loss",
        "listwise",
        "--epochs",
        "3",
        "--lr",
        "2e-3",
    )
    dev = json.loads((out / "metrics.json").read_text())["dev"]
    assert dev["accuracy"] >= 0.95 and dev["kendall_tau"] > 0.8


def test_eval_json_matches_training_dev_figures(
    tmp_path: Path, llama_dir: Path, syn: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = _train(llama_dir, syn, tmp_path / "rm", "--method", "full", "--epochs", "1", "--lr", "1e-3")
    dev = json.loads((out / "metrics.json").read_text())["dev"]
    capsys.readouterr()
    assert (
        cli(
            [
                "eval",
                "--model",
                str(out),
                "--data",
                str(syn),
                "--dev-only",
                "--json",
                "--plots",
                str(tmp_path / "plots"),
            ]
        )
        == 0
    )
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["accuracy"] == dev["accuracy"] and res["files"]["syn.jsonl"]["pairs"] == dev["pairs"]
    assert res["all"]["accuracy"] == dev["accuracy"]
    assert res["all"]["accuracy_when_better_is_shorter"] == dev["accuracy_when_better_is_shorter"]
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == [
        "accuracy_by_length.png",
        "calibration.png",
        "reward_histograms.png",
    ]


def test_kill_and_resume_matches_uninterrupted(tmp_path: Path, llama_dir: Path, syn: Path) -> None:
    common = ["--method", "top-n", "--top-n", "1", "--max-steps", "8", "--lr", "1e-3", "--save-every", "4"]
    full = _train(llama_dir, syn, tmp_path / "a", *common)
    part = tmp_path / "b"
    _train(llama_dir, syn, part, *common, "--halt-after", "5")  # dies after step 5; last checkpoint: step 4
    assert (part / ".checkpoint" / "state.json").is_file() and not (part / "rmserve.json").exists()
    _train(llama_dir, syn, part, *common, "--resume")
    a, b = load_file(str(full / "model.safetensors")), load_file(str(part / "model.safetensors"))
    assert torch.allclose(a["score.weight"], b["score.weight"], atol=1e-5)
    ma, mb = load_file(str(full / "model.safetensors")), load_file(str(part / "model.safetensors"))
    assert all(torch.allclose(ma[k], mb[k], atol=1e-5) for k in ma)
    assert not (part / ".checkpoint").exists()


def test_kendall_tau() -> None:
    assert kendall_tau([0, 1, 2], [3.0, 2.0, 1.0]) == 1.0
    assert kendall_tau([0, 1, 2], [1.0, 2.0, 3.0]) == -1.0
    assert kendall_tau([0, 0], [1.0, 2.0]) is None


def test_bad_data_stops_with_line(tmp_path: Path, llama_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x", "chosen": "a", "rejected": "b"}\n{"prompt": "x", "chosen": 1, "rejected": "b"}\n')
    rc = cli(["train", "--backbone", str(llama_dir), "--data", str(bad), "--out", str(tmp_path / "o")])
    assert rc == 2 and "bad.jsonl:2" in capsys.readouterr().err


_ = EncodedExample  # re-exported type used by the trainer


def test_frozen_cache_matches_the_full_model(llama_dir: Path, tokenizer: Any) -> None:
    from models.frozen_cache import frozen_features, rewards_from_features

    model, tok = RewardModel.from_backbone(llama_dir, max_length=64, seed=2)
    model.eval()
    f = model.formatter(tok)
    seqs = [f.encode("How do I bake bread?", r).ids for r in ("Mix flour.", "No", "Knead, then bake for an hour.")]
    feats = frozen_features(model, seqs, 1, tok.pad_token_id)
    with torch.no_grad():
        cached = rewards_from_features(model, feats, 1)
    full = torch.tensor(model.score_ids(seqs, tok.pad_token_id))
    assert torch.allclose(cached, full, atol=1e-5)


def test_training_with_and_without_the_cache_agree(tmp_path: Path, llama_dir: Path, syn: Path) -> None:
    common = ["--method", "top-n", "--top-n", "1", "--max-steps", "5", "--lr", "1e-3"]
    on = _train(llama_dir, syn, tmp_path / "on", *common, "--cache-frozen", "on")
    off = _train(llama_dir, syn, tmp_path / "off", *common, "--cache-frozen", "off")
    a, b = load_file(str(on / "model.safetensors")), load_file(str(off / "model.safetensors"))
    assert torch.allclose(a["score.weight"], b["score.weight"], atol=1e-4)
    da = json.loads((on / "metrics.json").read_text())["dev"]
    db = json.loads((off / "metrics.json").read_text())["dev"]
    assert da["accuracy"] == db["accuracy"]


def test_prefix_sharing_step_matches_plain_loss_and_gradients(llama_dir: Path) -> None:
    from models.losses import pairwise_loss
    from models.train import Scorer

    model, tok = RewardModel.from_backbone(llama_dir, max_length=128, seed=4)
    model.train()
    f = model.formatter(tok)
    exs = [
        RankedExample(
            [{"role": "user", "content": "How do I bake bread? Tell me the steps."}],
            ["Mix flour.", "No", "Knead, then bake for an hour."],
            [0, 2, 1],
        ),
        RankedExample([{"role": "user", "content": "Numbers?"}], ["0123456789", "no"], [0, 1]),
    ]
    groups = encode_examples(f, exs)
    batch = build_batch(groups, [0, 1])

    def loss_and_grads(sharing: bool) -> tuple[float, dict[str, torch.Tensor]]:
        model.zero_grad()
        scorer = Scorer(model, model, tok.pad_token_id, torch.device("cpu"), None)
        scorer.prefix_sharing = sharing
        r = scorer.rewards(groups, batch)
        assert scorer.shared_sequences == (5 if sharing else 0)  # both prompts' answers took the shared path
        loss, _ = pairwise_loss(
            r, torch.tensor(batch.better), torch.tensor(batch.worse), torch.tensor(batch.pair_group)
        )
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    l0, g0 = loss_and_grads(False)
    l1, g1 = loss_and_grads(True)
    assert abs(l0 - l1) < 1e-4
    assert g0.keys() == g1.keys() and len(g0) > 10
    for n in g0:
        assert torch.allclose(g0[n], g1[n], atol=1e-4), n


@pytest.mark.slow
def test_trains_under_torchrun_with_two_processes(tmp_path: Path, llama_dir: Path, syn: Path) -> None:
    """DDP on CPU (gloo): the same trainer, two ranks, rank 0 writes the model."""
    import subprocess
    import sys

    out = tmp_path / "ddp"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "service.cli",
        "train",
        "--backbone",
        str(llama_dir),
        "--data",
        str(syn),
        "--out",
        str(out),
        "--method",
        "full",
        "--lr",
        "2e-3",
        "--max-steps",
        "6",
        "--dtype",
        "float32",
        "--device",
        "cpu",
        "--batch-tokens",
        "1024",
        "--dev-fraction",
        "0.2",
    ]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=300, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    card = json.loads((out / "metrics.json").read_text())
    assert card["training"]["steps"] == 6
    assert card["training"]["trainable_tensors_changed"] == card["training"]["trainable_tensors"]
    RewardModel.load(out)


def test_plain_scorer_runs_length_chunks_with_the_same_rewards(llama_dir: Path) -> None:
    from models.prefix import length_chunks
    from models.reward_model import collate
    from models.train import Scorer

    model, tok = RewardModel.from_backbone(llama_dir, max_length=128, seed=4)
    seqs = [[5 + i % 7] * n for i, n in enumerate((3, 60, 4, 58, 20, 5))]
    assert len(length_chunks([len(s) for s in seqs])) > 1
    scorer = Scorer(model, model, tok.pad_token_id, torch.device("cpu"), None)
    with torch.no_grad():
        got = scorer._plain(seqs).tolist()
        ids, mask = collate(seqs, tok.pad_token_id, "right", torch.device("cpu"))
        ref = model(ids, mask).tolist()
    assert got == pytest.approx(ref, abs=1e-5)


@pytest.mark.parametrize("method", ["full", "top-n"])
def test_training_output_is_world_readable(tmp_path: Path, llama_dir: Path, syn: Path, method: str) -> None:
    """Every folder rmserve train writes is 0755 and every file 0644 at least (trained/ shards included:
    safetensors writes 0600), so the README's read-only mount with the image's uid 10001 can read it."""
    extra = ["--top-n", "1"] if method == "top-n" else []
    out = _train(llama_dir, syn, tmp_path / "rm", "--method", method, "--max-steps", "2", *extra)
    paths = [out, *out.rglob("*")]
    if method == "top-n":
        assert (out / "trained" / "trained-00000.safetensors").is_file()
    bad = [
        f"{p.relative_to(out)} {oct(p.stat().st_mode & 0o777)}"
        for p in paths
        if p.is_dir() and p.stat().st_mode & 0o755 != 0o755
    ]
    bad += [
        f"{p.relative_to(out)} {oct(p.stat().st_mode & 0o777)}"
        for p in paths
        if p.is_file() and p.stat().st_mode & 0o644 != 0o644
    ]
    assert not bad, bad
