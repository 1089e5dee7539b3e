"""Runtime parity on real HH-RLHF pairs: each runtime/dtype against torch fp32, by max score
difference, by agreement on which answer of a pair scores higher, and by batch invariance (the same
sequence scored alone, in shuffled mixed-length batches and with its pair-mates sharing a prompt).
JSON on the last line.

    python bench/parity.py --model DIR [--pairs 200] [--invariance-pairs 16]
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import hh_examples, resolve_model

Score = Callable[[Sequence[Sequence[int]]], list[float]]
SPECS = ("torch:bfloat16", "torch:float32+sharing", "onnx:float32")


def pair_parity(ref: Sequence[Sequence[float]], got: Sequence[Sequence[float]]) -> dict[str, float]:
    """Max |score difference| and the share of pairs ordered the same way, `got` against `ref` (pairs of scores)."""
    diff = max(abs(a - b) for p, q in zip(ref, got, strict=True) for a, b in zip(p, q, strict=True))
    agree = sum((p[0] > p[1]) == (q[0] > q[1]) for p, q in zip(ref, got, strict=True)) / len(ref)
    return {"max_abs_diff": round(diff, 6), "pair_order_agreement": round(agree, 4)}


def batch_invariance(score: Score, pairs: Sequence[Sequence[Sequence[int]]], batch: int = 16, seed: int = 0) -> float:
    """Largest change of a sequence's score between alone and in a batch: shuffled mixed-length
    batches of `batch` sequences, and batches of 4 pairs kept together (their answers share a prompt,
    so a shared-prefix runtime takes that path)."""
    seqs = [s for p in pairs for s in p]
    alone = [score([s])[0] for s in seqs]
    order = list(range(len(seqs)))
    random.Random(seed).shuffle(order)
    worst = 0.0
    for start in range(0, len(order), batch):
        idx = order[start : start + batch]
        for i, r in zip(idx, score([seqs[i] for i in idx]), strict=True):
            worst = max(worst, abs(r - alone[i]))
    k = 0
    for start in range(0, len(pairs), 4):
        for r in score([s for p in pairs[start : start + 4] for s in p]):
            worst = max(worst, abs(r - alone[k]))
            k += 1
    return worst


def load_spec(model_dir: Path, spec: str, threads: int) -> Any:
    """A runtime for `name:dtype[+sharing|+canonical]` (torch runs the padded forward without prefix sharing
    unless +sharing; +canonical is the packed batch-invariant forward, the service's default)."""
    from models.export import ONNX_FP32, export_onnx
    from models.reward_model import RewardModel
    from service.runtimes.onnx_runtime import OnnxRuntime
    from service.runtimes.torch_runtime import TorchRuntime

    name, dtype = spec.split(":")
    dtype, _, extra = dtype.partition("+")
    if name == "torch":
        m, tok = RewardModel.load(model_dir, dtype=dtype)
        forward = "canonical" if extra == "canonical" else "padded"
        return TorchRuntime(m, tok.pad_token_id, forward=forward, prefix_sharing=extra == "sharing")
    if not (model_dir / ONNX_FP32).is_file():
        export_onnx(model_dir)
    rt, _ = OnnxRuntime.load(model_dir, threads=threads, int8=dtype == "int8")
    return rt


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="default")
    ap.add_argument("--pairs", type=int, default=200)
    ap.add_argument("--invariance-pairs", type=int, default=16, help="pairs scored alone and in batches")
    ap.add_argument("--specs", default=",".join(SPECS))
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    model_dir = resolve_model(args.model)

    from models.reward_model import RewardModel

    exs = hh_examples(args.pairs, seed=7)
    model, tok = RewardModel.load(model_dir, dtype="float32")
    fmt = model.formatter(tok)
    del model
    pairs = [[fmt.encode(ex.prompt, r).ids for r in ex.responses] for ex in exs]
    ref_rt = load_spec(model_dir, "torch:float32", args.threads)
    ref = [ref_rt.score(p) for p in pairs]
    out: dict[str, Any] = {"model": str(model_dir), "pairs": len(pairs)}
    out["torch:float32"] = {"batch_max_abs_diff": batch_invariance(ref_rt.score, pairs[: args.invariance_pairs])}
    del ref_rt
    for spec in args.specs.split(","):
        rt = load_spec(model_dir, spec, args.threads)
        out[spec] = pair_parity(ref, [rt.score(p) for p in pairs])
        out[spec]["batch_max_abs_diff"] = batch_invariance(rt.score, pairs[: args.invariance_pairs])
        logging.info("%-24s %s", spec, out[spec])
        del rt
    print(json.dumps(out))


if __name__ == "__main__":
    main()
