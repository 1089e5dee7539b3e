"""Evaluation of a reward model on comparison data (`rmserve eval`)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from models.batching import PromptSplit, length_batches, packed_batches
from models.data import FORMATS, RankedExample, read_file
from models.formatting import Formatter
from models.reward_model import RewardModel, collate

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EncodedExample:
    """The token ids of each response of one example (same order as example.responses)."""

    example: RankedExample
    seqs: list[list[int]]
    prompt_lens: list[int]
    truncated: list[bool]


def encode_examples(formatter: Formatter, examples: Sequence[RankedExample]) -> list[EncodedExample]:
    out = []
    for ex in examples:
        enc = [formatter.encode(ex.prompt, r) for r in ex.responses]
        out.append(EncodedExample(ex, [e.ids for e in enc], [e.prompt_len for e in enc], [e.truncated for e in enc]))
    return out


@torch.inference_mode()
def score_sequences(
    model: RewardModel,
    seqs: Sequence[Sequence[int]],
    pad_id: int,
    *,
    batch_tokens: int = 16384,
    autocast_dtype: torch.dtype | None = None,
    progress: bool = False,
    forward: str = "canonical",
) -> list[float]:
    """Rewards for token id lists in input order; with `progress`, a tqdm bar counts the sequences scored.

    forward="canonical" (the service's default, models/canonical.py): packed passes of at most
    `batch_tokens` real tokens, in the weights' dtype (`autocast_dtype` is not used: the service does
    not autocast), so each reward is the bits the service returns for that sequence in that dtype on
    this machine, whatever it is evaluated with. Sequences carrying a prompt boundary (`PromptSplit`) are
    split there, as the service splits them. Families the canonical forward does not cover, and
    forward="padded", run length-sorted padded batches of `batch_tokens` padded tokens.
    """
    from models.canonical import canonical_rewards, supports

    out = [0.0] * len(seqs)
    bar = tqdm(total=len(seqs), desc="scoring", unit="seq", disable=not progress, dynamic_ncols=True)
    if forward == "canonical" and supports(model.body):
        for idx in packed_batches(seqs, batch_tokens):
            rewards = canonical_rewards(model.body, model.head, [seqs[i] for i in idx], pad_id=pad_id).tolist()
            for i, r in zip(idx, rewards, strict=True):
                out[i] = float(r)
            bar.update(len(idx))
        bar.close()
        return out
    for idx in length_batches([len(s) for s in seqs], batch_tokens):
        ids, mask = collate([seqs[i] for i in idx], pad_id, "right", model.device)
        with torch.autocast(model.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            rewards = model(ids, mask).float().tolist()
        for i, r in zip(idx, rewards, strict=True):
            out[i] = r
        bar.update(len(idx))
    bar.close()
    return out


def score_encoded(
    model: RewardModel,
    encoded: Sequence[EncodedExample],
    pad_id: int,
    *,
    batch_tokens: int = 16384,
    autocast_dtype: torch.dtype | None = None,
    progress: bool = False,
    forward: str = "canonical",
) -> list[list[float]]:
    """Rewards per example, each response split at its prompt boundary as the service splits it."""
    flat = [PromptSplit(s, p) for e in encoded for s, p in zip(e.seqs, e.prompt_lens, strict=True)]
    flat_scores = score_sequences(
        model,
        flat,
        pad_id,
        batch_tokens=batch_tokens,
        autocast_dtype=autocast_dtype,
        progress=progress,
        forward=forward,
    )
    out, k = [], 0
    for e in encoded:
        out.append(flat_scores[k : k + len(e.seqs)])
        k += len(e.seqs)
    return out


def kendall_tau(ranks: Sequence[int], scores: Sequence[float]) -> float | None:
    """Kendall tau between human ranks (0 = best) and scores; pairs tied in rank are left out."""
    conc = disc = total = 0
    for i in range(len(ranks)):
        for j in range(i + 1, len(ranks)):
            if ranks[i] == ranks[j]:
                continue
            total += 1
            human = 1 if ranks[i] < ranks[j] else -1  # i better than j
            s = scores[i] - scores[j]
            if s * human > 0:
                conc += 1
            elif s * human < 0:
                disc += 1
    return (conc - disc) / total if total else None


def metrics_from_scores(examples: Sequence[RankedExample], scores: Sequence[Sequence[float]]) -> dict[str, Any]:
    """Pair accuracy (score ties count 0.5), mean margin, per subset, Kendall tau for lists with K > 2,
    and accuracy on the pairs whose better response is the shorter one (a length-bias check)."""
    hits = 0.0
    n = 0
    margin_sum = 0.0
    by_subset: dict[str, list[float]] = defaultdict(list)
    shorter_hits: list[float] = []
    taus: list[float] = []
    for ex, sc in zip(examples, scores, strict=True):
        pairs = ex.pairs()
        if not pairs and len(set(ex.responses)) == 1:
            # Identical sides (e.g. HH pairs with chosen == rejected): a tie by construction.
            by_subset[ex.subset].append(0.5)
            hits += 0.5
            n += 1
            continue
        for w, lo in pairs:
            d = sc[w] - sc[lo]
            h = 1.0 if d > 0 else 0.5 if d == 0 else 0.0
            hits += h
            n += 1
            margin_sum += d
            by_subset[ex.subset].append(h)
            if len(ex.responses[w]) < len(ex.responses[lo]):
                shorter_hits.append(h)
        if len(ex.responses) > 2:
            t = kendall_tau(ex.ranks, sc)
            if t is not None:
                taus.append(t)
    out: dict[str, Any] = {
        "examples": len(examples),
        "pairs": n,
        "accuracy": hits / n if n else None,
        "mean_margin": margin_sum / n if n else None,
        "subsets": {k: {"pairs": len(v), "accuracy": sum(v) / len(v)} for k, v in sorted(by_subset.items()) if k},
        "accuracy_when_better_is_shorter": sum(shorter_hits) / len(shorter_hits) if shorter_hits else None,
        "pairs_better_is_shorter": len(shorter_hits),
    }
    if taus:
        out["kendall_tau"] = sum(taus) / len(taus)
        out["ranked_lists"] = len(taus)
    return out


def evaluate_examples(
    model: RewardModel,
    tokenizer: Any,
    examples: Sequence[RankedExample],
    *,
    batch_tokens: int = 16384,
    autocast_dtype: torch.dtype | None = None,
    progress: bool = False,
    forward: str = "canonical",
) -> tuple[dict[str, Any], list[list[float]]]:
    encoded = encode_examples(model.formatter(tokenizer), examples)
    scores = score_encoded(
        model,
        encoded,
        tokenizer.pad_token_id,
        batch_tokens=batch_tokens,
        autocast_dtype=autocast_dtype,
        progress=progress,
        forward=forward,
    )
    return metrics_from_scores(examples, scores), scores


def example_pairs(ex: RankedExample) -> int:
    """The pairs an example counts for in the metrics (identical sides: one tie)."""
    pairs = len(ex.pairs())
    return 1 if not pairs and len(set(ex.responses)) == 1 else pairs


def bound_pairs(examples: Sequence[RankedExample], max_pairs: int | None) -> list[RankedExample]:
    """The leading examples whose pairs fit in `max_pairs` (None: all); at least one example."""
    if max_pairs is None:
        return list(examples)
    out: list[RankedExample] = []
    total = 0
    for ex in examples:
        n = example_pairs(ex)
        if out and total + n > max_pairs:
            break
        out.append(ex)
        total += n
    return out


def add_eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model directory")
    p.add_argument(
        "--model-format",
        default="auto",
        choices=["auto", "rmserve", "hf", "openrlhf"],
        help="checkpoint format of --model (auto: detected from its files)",
    )
    p.add_argument("--data", nargs="+", required=True, help="comparison files (JSONL or .jsonl.gz)")
    p.add_argument("--format", choices=FORMATS, default=None, help="data format (default: detected)")
    p.add_argument("--dev-only", action="store_true", help="score only the dev split recorded in the model card")
    p.add_argument("--dev-fraction", type=float, default=None, help="dev split fraction (default: the model's)")
    p.add_argument("--seed", type=int, default=None, help="split seed (default: the model's)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16"],
        help="inference dtype; auto = what `rmserve serve` runs the torch runtime in here (on a CPU float32, or "
        "canonical bf16 where the CPU has it natively and it measured faster and batch-invariant)",
    )
    p.add_argument(
        "--forward",
        default="canonical",
        choices=["canonical", "padded"],
        help="canonical = the service's default forward (packed, batch-invariant): the accuracy of the rewards "
        "it serves; padded = right-padded batches",
    )
    p.add_argument(
        "--batch-tokens",
        type=int,
        default=16384,
        help="tokens per forward pass (real tokens when canonical, padded tokens when padded)",
    )
    p.add_argument("--skip-bad", action="store_true", help="skip and count malformed lines")
    p.add_argument(
        "--max-pairs", type=int, default=None, help="score at most this many pairs in all (the leading examples)"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar (stderr)")
    p.add_argument("--plots", default=None, help="write PNG plots to this folder")
    p.add_argument(
        "--json",
        action="store_true",
        help="print the results as one JSON object, alone on stdout (the table goes to stderr)",
    )


def main(args: argparse.Namespace) -> int:
    from models.backbone import auto_dtype
    from models.data import split_dev

    dtype = auto_dtype(args.device) if args.dtype == "auto" else args.dtype
    forward = getattr(args, "forward", "canonical")
    model, tok = RewardModel.load(
        args.model, dtype=dtype, device=args.device, format=getattr(args, "model_format", None)
    )
    training = model.config.training or {}
    from models.canonical import supports

    mode = f"torch-{'canonical' if forward == 'canonical' and supports(model.body) else 'padded'}-{dtype}"
    result: dict[str, Any] = {"model": str(args.model), "mode": mode, "files": {}}
    hits_all = 0.0
    pairs_all = 0
    all_examples: list[RankedExample] = []
    all_scores: list[list[float]] = []
    max_pairs: int | None = getattr(args, "max_pairs", None)
    if max_pairs is not None and max_pairs < 1:
        raise SystemExit(f"--max-pairs must be at least 1, got {max_pairs}")
    args.no_progress = getattr(args, "no_progress", False)
    for path in args.data:
        examples, _stats = read_file(path, args.format, skip_bad=args.skip_bad, drop_identical=False)
        if args.dev_only:
            frac = args.dev_fraction if args.dev_fraction is not None else training.get("dev_fraction", 0.05)
            seed = args.seed if args.seed is not None else training.get("seed", 0)
            _, examples = split_dev(examples, frac, seed)
        if max_pairs is not None:
            examples = bound_pairs(examples, max_pairs - pairs_all) if max_pairs > pairs_all else []
            if not examples:
                log.info("%s: skipped, --max-pairs %d reached", Path(path).name, max_pairs)
                continue
        metrics, scores = evaluate_examples(
            model, tok, examples, batch_tokens=args.batch_tokens, progress=not args.no_progress, forward=forward
        )
        result["files"][Path(path).name] = metrics
        if metrics["pairs"]:
            hits_all += metrics["accuracy"] * metrics["pairs"]
            pairs_all += metrics["pairs"]
        all_examples.extend(examples)
        all_scores.extend(scores)
        log.info("%s: %d pairs, accuracy %.4f", Path(path).name, metrics["pairs"], metrics["accuracy"] or 0.0)
    result["pairs"] = pairs_all
    result["accuracy"] = hits_all / pairs_all if pairs_all else None
    result["all"] = metrics_from_scores(all_examples, all_scores)  # per subset, length-bias check, Kendall tau
    if args.plots:
        from models.plots import eval_plots

        result["plots"] = [str(p) for p in eval_plots(all_examples, all_scores, args.plots)]
    table = sys.stderr if args.json else sys.stdout  # with --json, stdout holds the JSON alone
    for name, m in result["files"].items():
        print(f"{name:45s} pairs {m['pairs']:6d}  accuracy {m['accuracy'] or float('nan'):.4f}", file=table)
    print(f"{'all':45s} pairs {pairs_all:6d}  accuracy {result['accuracy'] or float('nan'):.4f}  ({mode})", file=table)
    short = result["all"]["accuracy_when_better_is_shorter"]
    if short is not None:
        print(
            f"{'pairs whose better answer is the shorter':45s} pairs {result['all']['pairs_better_is_shorter']:6d}  "
            f"accuracy {short:.4f}",
            file=table,
        )
    if args.json:
        sys.stdout.write(json.dumps(result) + "\n")
    return 0
