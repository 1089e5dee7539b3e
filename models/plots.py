"""PNG plots for people who would rather look than read (needs matplotlib: `pip install rmserve[plots]`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from models.data import RankedExample


def training_curves(history: Sequence[dict[str, Any]], path: str | Path) -> Path | None:
    if not history:
        return None
    steps = [h["step"] for h in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.5))
    a.plot(steps, [h["loss"] for h in history], lw=0.8)
    a.set_xlabel("step")
    a.set_ylabel("train loss")
    b.plot(steps, [h["accuracy"] for h in history], lw=0.8, label="train (batch)")
    dev = [(h["step"], h["dev"]["accuracy"]) for h in history if h.get("dev") and h["dev"].get("accuracy")]
    if dev:
        b.plot(*zip(*dev, strict=True), "o-", label="dev")
    b.set_xlabel("step")
    b.set_ylabel("pair accuracy")
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def eval_plots(examples: Sequence[RankedExample], scores: Sequence[Sequence[float]], out_dir: str | Path) -> list[Path]:
    """Chosen vs rejected histograms, calibration of sigmoid(r_w - r_l), accuracy by length bucket."""
    import math

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    best, worst, diffs, lengths = [], [], [], []
    for ex, sc in zip(examples, scores, strict=True):
        for w, lo in ex.pairs():
            best.append(sc[w])
            worst.append(sc[lo])
            diffs.append(sc[w] - sc[lo])
            lengths.append(len(ex.responses[w]) + len(ex.responses[lo]))
    paths = []
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.hist(best, bins=40, alpha=0.6, label="better (chosen)")
    ax.hist(worst, bins=40, alpha=0.6, label="worse (rejected)")
    ax.set_xlabel("reward")
    ax.legend()
    fig.tight_layout()
    paths.append(out / "reward_histograms.png")
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)

    # Calibration: predicted P(better wins) vs observed, in 10 bins of the prediction (both orders).
    preds = [1 / (1 + math.exp(-d)) for d in diffs] + [1 / (1 + math.exp(d)) for d in diffs]
    obs = [1.0] * len(diffs) + [0.0] * len(diffs)
    bins: list[list[float]] = [[] for _ in range(10)]
    pbin: list[list[float]] = [[] for _ in range(10)]
    for p, o in zip(preds, obs, strict=True):
        k = min(9, int(p * 10))
        bins[k].append(o)
        pbin[k].append(p)
    xs = [sum(p) / len(p) for p in pbin if p]
    ys = [sum(o) / len(o) for o in bins if o]
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.plot(xs, ys, "o-")
    ax.set_xlabel("predicted P(first is better) = sigmoid(r1 - r2)")
    ax.set_ylabel("observed frequency")
    fig.tight_layout()
    paths.append(out / "calibration.png")
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)

    # Accuracy by total length (characters) quintile.
    order = sorted(range(len(diffs)), key=lambda i: lengths[i])
    labels, accs = [], []
    for q in range(5):
        idx = order[q * len(order) // 5 : (q + 1) * len(order) // 5]
        if idx:
            accs.append(sum(1.0 if diffs[i] > 0 else 0.5 if diffs[i] == 0 else 0.0 for i in idx) / len(idx))
            labels.append(f"{lengths[idx[0]]}-{lengths[idx[-1]]}")
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.bar(labels, accs)
    ax.axhline(0.5, color="k", lw=0.8, ls="--")
    ax.set_ylabel("pair accuracy")
    ax.set_xlabel("pair length (characters), quintiles")
    fig.tight_layout()
    paths.append(out / "accuracy_by_length.png")
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)
    return paths
