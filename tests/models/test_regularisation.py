"""Regularisation and early stopping: weight decay, head dropout, label smoothing, the best weights kept,
and balanced subsets."""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
from pathlib import Path

import pytest
import torch

from models.data import RankedExample, read_files, split_dev, write_jsonl
from models.evaluate import EncodedExample
from models.losses import pairwise_loss
from models.reward_model import RewardModel
from models.train import (
    EarlyStopping,
    TrainConfig,
    add_train_args,
    apply_method,
    balanced_order,
    build_optimizer,
    config_from_args,
)
from models.train.methods import add_head_dropout
from tests.models.test_train import _train, synthetic


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


def test_label_smoothing_is_the_bradley_terry_loss_with_a_soft_target() -> None:
    rewards = torch.tensor([1.5, -0.5, 0.25, 2.0, 1.0])
    better, worse, group = torch.tensor([0, 0, 2, 3]), torch.tensor([1, 2, 1, 4]), torch.tensor([0, 0, 0, 1])
    eps = 0.1
    loss, acc = pairwise_loss(rewards, better, worse, group, label_smoothing=eps)
    per = [-(1 - eps) * log_sigmoid(d) - eps * log_sigmoid(-d) for d in (2.0, 1.25, 0.75, 1.0)]
    assert loss.item() == pytest.approx(((per[0] + per[1] + per[2]) / 3 + per[3]) / 2, abs=1e-6)
    plain, _ = pairwise_loss(rewards, better, worse, group)
    assert plain.item() == pytest.approx(((-sum(log_sigmoid(d) for d in (2.0, 1.25, 0.75))) / 3 - log_sigmoid(1.0)) / 2)
    assert acc.item() == 1.0
    # The smoothed loss is least at d = log((1 - eps) / eps), not at d -> infinity.
    d = torch.tensor([math.log(9.0)], requires_grad=True)
    r = torch.cat([d, torch.zeros(1)])
    pairwise_loss(r, torch.tensor([0]), torch.tensor([1]), torch.tensor([0]), label_smoothing=eps)[0].backward()
    assert d.grad is not None and abs(d.grad.item()) < 1e-6


def test_weight_decay_shrinks_matrices_only(llama_dir: Path) -> None:
    model, _ = RewardModel.from_backbone(llama_dir, seed=1)
    cfg = TrainConfig(method="top-n", top_n=1, lr=1e-2, head_lr=0.1, weight_decay=0.5, center_coef=0.1)
    apply_method(model, cfg)
    opt = build_optimizer(model, cfg)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)  # no gradient: only the decay moves a weight
    opt.step()
    params = dict(model.named_parameters())
    assert torch.equal(params["head.weight"], before["head.weight"] * (1 - 0.1 * 0.5))
    up = "body.layers.1.mlp.up_proj.weight"
    assert torch.equal(params[up], before[up] * (1 - 1e-2 * 0.5))
    for n in ("body.layers.1.input_layernorm.weight", "body.norm.weight"):  # heads have no bias (issue 22)
        assert torch.equal(params[n], before[n]), n


def test_head_dropout_acts_in_training_only(llama_dir: Path) -> None:
    model, _ = RewardModel.from_backbone(llama_dir, seed=1)
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    mask = torch.ones_like(ids)
    model.eval()
    with torch.no_grad():
        clean = model(ids, mask)
        handle = add_head_dropout(model, 0.5)
        assert handle is not None and torch.equal(model(ids, mask), clean)
        model.train()
        torch.manual_seed(0)
        noisy = {model(ids, mask).item() for _ in range(8)}
        assert len(noisy) > 1 and clean.item() not in noisy
        handle.remove()
        assert torch.equal(model(ids, mask), clean)
    assert add_head_dropout(model, 0.0) is None


def test_early_stopping_keeps_the_best_weights() -> None:
    lin = torch.nn.Linear(3, 1)
    stop = EarlyStopping(patience=2)
    assert not stop.update(lin, 0.6, 10)
    best = lin.weight.detach().clone()
    with torch.no_grad():
        lin.weight.add_(1.0)
    assert not stop.update(lin, 0.6, 20)  # equal is no improvement: 1 of 2
    assert stop.update(lin, 0.55, 30)  # 2 of 2: stop
    stop.restore(lin)
    assert torch.equal(lin.weight, best) and stop.best_step == 10 and stop.best == 0.6


def test_training_stops_early_and_ships_the_best_evaluation(tmp_path: Path, llama_dir: Path) -> None:
    data = synthetic(tmp_path / "syn.jsonl", 120)
    args = ["--method", "full", "--lr", "3e-3", "--max-steps", "40", "--eval-every", "2"]
    out = _train(llama_dir, data, tmp_path / "rm", *args, "--early-stopping-patience", "2", "--head-dropout", "0.1")
    m = json.loads((out / "metrics.json").read_text())
    evals = [(h["step"], h["dev"]["accuracy"]) for h in m["history"] if "dev" in h]
    es = m["training"]["early_stopping"]
    best_step, best = max(evals, key=lambda e: (e[1], -e[0]))  # the first evaluation with the best accuracy
    assert es["stopped"] and m["training"]["steps"] < 40 and m["training"]["steps"] == evals[-1][0]
    assert (es["best_step"], es["best_accuracy"]) == (best_step, best)
    assert all(a <= best and s > best_step for s, a in evals[-2:])  # two evaluations without a better one
    assert m["dev"]["accuracy"] == best  # the shipped model is the best evaluation's
    assert RewardModel.load(out)[0].config.training["early_stopping"]["best_step"] == best_step


def test_balanced_order_repeats_smaller_subsets() -> None:
    def ex(subset: str) -> EncodedExample:
        return EncodedExample(
            RankedExample([{"role": "user", "content": "q"}], ["a", "b"], [0, 1], subset=subset), [], [], []
        )

    groups = [ex("a"), ex("a"), ex("a"), ex("a"), ex("a"), ex("b"), ex("b"), ex("c")]
    order = balanced_order(groups, seed=0)
    counts = {s: sum(groups[i].example.subset == s for i in order) for s in "abc"}
    assert counts == {"a": 5, "b": 5, "c": 5}
    assert sorted(i for i in order if i < 5) == [0, 1, 2, 3, 4]  # the largest subset once each
    assert order.count(7) == 5 and sorted(order.count(i) for i in (5, 6)) == [2, 3]
    assert balanced_order(groups, seed=0) == order


def test_training_with_balanced_subsets(tmp_path: Path, llama_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    recs = [json.loads(line) for line in synthetic(tmp_path / "syn.jsonl", 60).read_text().splitlines()]
    for i, r in enumerate(recs):
        r["subset"] = "small" if i < 12 else "large"
    write_jsonl(tmp_path / "sub.jsonl", recs)
    caplog.set_level(logging.INFO, logger="models.train.run")
    out = _train(
        llama_dir, tmp_path / "sub.jsonl", tmp_path / "rm", "--method", "top-n", "--top-n", "1", "--balance-subsets"
    )
    train_ex, _ = split_dev(read_files([str(tmp_path / "sub.jsonl")])[0], 0.2, 0)
    counts = {s: sum(e.subset == s for e in train_ex) for s in ("small", "large")}
    assert 0 < counts["small"] < counts["large"]
    assert f"balanced subsets: {len(train_ex)} prompts become {2 * counts['large']} per epoch" in caplog.text
    assert json.loads((out / "metrics.json").read_text())["training"]["recipe"]["balance_subsets"] is True


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--label-smoothing", "0.5"], "--label-smoothing is 0.5; it must lie in [0, 0.5)"),
        (["--label-smoothing", "0.1", "--loss", "listwise"], "--label-smoothing applies to --loss pairwise"),
        (["--head-dropout", "1"], "--head-dropout is 1.0; it must lie in [0, 1)"),
        (["--early-stopping-patience", "2"], "give --eval-every N"),
        (["--weight-decay", "-1"], "--weight-decay is -1.0; it must be >= 0"),
    ],
)
def test_bad_regularisation_values_are_named(extra: list[str], message: str) -> None:
    p = argparse.ArgumentParser()
    add_train_args(p)
    args = p.parse_args(["--backbone", "b", "--data", "d", "--out", "o", *extra])
    with pytest.raises(ValueError) as err:
        config_from_args(args)
    assert message in str(err.value)


def test_early_stopping_state_survives_a_kill_and_resume(tmp_path: Path, llama_dir: Path) -> None:
    data = synthetic(tmp_path / "syn.jsonl", 80)
    common = ["--method", "top-n", "--top-n", "1", "--lr", "3e-3", "--max-steps", "10", "--eval-every", "2"]
    common += ["--early-stopping-patience", "50", "--save-every", "4"]
    full = _train(llama_dir, data, tmp_path / "a", *common)
    part = tmp_path / "b"
    _train(llama_dir, data, part, *common, "--halt-after", "6")  # last checkpoint: step 4
    state = json.loads((part / ".checkpoint" / "state.json").read_text())["extra"]
    assert state["best_step"] in (2, 4) and (part / ".checkpoint" / "extra.safetensors").is_file()
    _train(llama_dir, data, part, *common, "--resume")
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (full, part))
    assert a["training"]["early_stopping"] == b["training"]["early_stopping"]
    assert a["dev"]["accuracy"] == b["dev"]["accuracy"]


def test_dev_max_takes_examples_in_turn_from_each_subset() -> None:
    from models.train.run import spread_take

    def ex(subset: str, i: int) -> RankedExample:
        return RankedExample([{"role": "user", "content": f"q{i}"}], ["a", "b"], [0, 1], subset=subset)

    exs = [ex("a", i) for i in range(6)] + [ex("b", i) for i in range(6, 8)] + [ex("c", i) for i in range(8, 12)]
    got = spread_take(exs, 7)
    assert [e.subset for e in got] == ["a", "a", "a", "b", "b", "c", "c"]  # order as read; 3 + 2 (all of b) + 2
    assert [e.prompt[0]["content"] for e in got] == ["q0", "q1", "q2", "q6", "q7", "q8", "q9"]  # each subset's first
    assert spread_take(exs, 100) == exs and spread_take(exs, 0) == []


def test_time_limit_ends_the_loop_then_evaluates_and_saves(tmp_path: Path, llama_dir: Path) -> None:
    """--time-limit 0.001 s: the loop stops after its first step, the model is evaluated and written as at
    the end (the card records where it stopped); with early stopping the last weights compete too."""
    data = synthetic(tmp_path / "syn.jsonl", 60)
    args = ["--method", "top-n", "--top-n", "1", "--max-steps", "20", "--time-limit", "0.001"]
    out = _train(llama_dir, data, tmp_path / "rm", *args, "--eval-every", "5", "--early-stopping-patience", "3")
    m = json.loads((out / "metrics.json").read_text())
    assert m["training"]["steps"] == 1 and m["training"]["time_limited"] == {
        "seconds": 0.001,
        "step": 1,
        "of_steps": 20,
    }
    assert [h["step"] for h in m["history"] if "dev" in h] == [1]  # the stopped weights were evaluated
    assert m["training"]["early_stopping"]["best_step"] == 1 and m["dev"]["accuracy"] is not None
    assert RewardModel.load(out)[0].config.training["time_limited"]["step"] == 1
    with pytest.raises(ValueError, match=re.escape("--time-limit is -1.0; it must be >= 0")):
        p = argparse.ArgumentParser()
        add_train_args(p)
        config_from_args(p.parse_args(["--backbone", "b", "--data", "d", "--out", "o", "--time-limit", "-1"]))
