"""What a finished run records: reward normalization statistics, the training record kept in
rmserve.json, and the model card (MODEL_CARD.md, metrics.json, training_curves.png)."""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from models.evaluate import EncodedExample
from models.train.batches import Batch
from models.train.scorer import Scorer


@torch.inference_mode()
def normalization(scorer: Scorer, groups: Sequence[EncodedExample], samples: int, seed: int) -> dict[str, float]:
    """Mean and std of rewards over a seeded sample of `samples` training responses (for z-scores)."""
    rng = random.Random(seed)
    keys = [(g, j) for g, grp in enumerate(groups) for j in range(len(grp.seqs))]
    keys = rng.sample(keys, min(samples, len(keys)))
    rewards: list[float] = []
    for start in range(0, len(keys), 32):
        rewards.extend(scorer.rewards(groups, Batch.of_keys(groups, keys[start : start + 32])).tolist())
    r = torch.tensor(rewards)
    std = float(r.std()) if len(r) > 1 else 1.0
    return {"mean": float(r.mean()), "std": std if std > 1e-6 else 1.0, "samples": float(len(r))}


def write_card(out: Path, training: dict[str, Any], history: list[dict[str, Any]]) -> None:
    """MODEL_CARD.md + metrics.json (+ training_curves.png when matplotlib is installed)."""
    metrics = {
        "dev": training.get("dev", {}),
        "training": {k: v for k, v in training.items() if k != "dev"},
        "history": history,
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    try:
        from models.plots import training_curves

        curves = training_curves(history, out / "training_curves.png")
    except ImportError:
        curves = None
    rec = training["recipe"]
    dev = training.get("dev", {})
    lines = [
        "# Reward model card",
        "",
        f"- Backbone: `{rec.get('backbone') or rec.get('init_model')}`",
        f"- Method: {rec['method']}"
        + (f" (top {rec['top_n']} layers)" if rec["method"] == "top-n" else "")
        + (f" (rank {rec['lora_rank']})" if rec["method"] == "lora" else ""),
        f"- Loss: {rec['loss']}, lr {rec['lr']}, max length {rec['max_length']}, dtype {rec['dtype']}",
        f"- Data: {', '.join(Path(p).name for p in rec['data'])}",
        f"- Train: {training['train_prompts']} prompts, {training['train_pairs']} pairs; "
        f"dev: {training['dev_prompts']} prompts "
        f"(hash split, fraction {training['dev_fraction']}, seed {training['seed']})",
        f"- Steps: {training['steps']}, time {training['seconds']} s, {training['tokens_per_s']} tokens/s",
        f"- Trainable parameters: {training['trainable_parameters']:,}",
        "",
        "## Dev accuracy",
        "",
        *(
            [f"Scored in mode `{dev['mode']}` (the service's default forward in the dtype it serves).", ""]
            if dev.get("mode")
            else []
        ),
        "| subset | pairs | accuracy |",
        "| --- | --- | --- |",
    ]
    for name, m in (dev.get("subsets") or {}).items():
        lines.append(f"| {name} | {m['pairs']} | {m['accuracy']:.4f} |")
    if dev.get("accuracy") is not None:
        lines.append(f"| **all** | {dev['pairs']} | **{dev['accuracy']:.4f}** |")
    if dev.get("accuracy_when_better_is_shorter") is not None:
        lines += [
            "",
            f"Accuracy on the {dev['pairs_better_is_shorter']} dev pairs whose better answer is the "
            f"shorter one: {dev['accuracy_when_better_is_shorter']:.4f}.",
        ]
    if curves:
        lines += ["", "![training curves](training_curves.png)"]
    (out / "MODEL_CARD.md").write_text("\n".join(lines) + "\n")
