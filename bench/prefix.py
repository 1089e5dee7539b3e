"""Shared-prefix benchmark: the same work with and without computing each prompt once, in one run,
on real HH-RLHF dialogues. Prints a table and one JSON object on its last line.

    python bench/prefix.py --model DIR [--requests 24] [--clients 8] [--rounds 2]

Sharing off and on alternate for `--rounds` rounds (this machine's speed drifts by a quarter between
minutes); each figure is total tokens over total seconds of its rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bench.common import hh_examples, resolve_model, run_load, start_service


def payloads_for(exs: list[Any], k: int, n: int) -> list[dict[str, Any]]:
    """n requests: an HH prompt with its chosen and rejected answers plus k - 2 answers from other dialogues."""
    out = []
    for i, ex in enumerate(exs[:n]):
        extra = [exs[(i + j + 1) % len(exs)].responses[j % 2] for j in range(max(0, k - 2))]
        out.append({"prompt": ex.prompt, "responses": (ex.responses + extra)[:k]})
    return out


def service_tps(
    model_dir: Path, payloads: list[dict[str, Any]], route: str, sharing: bool, requests: int, clients: int
) -> dict[str, Any]:
    """Tokens/s of the service doing exactly `requests` requests (the first ones of `payloads`)."""
    # A long deadline: at saturation on two cores a request waits tens of seconds, and a 504 would
    # drop its tokens from the count.
    env = {"RMSERVE_PREFIX_SHARING": "true" if sharing else "false", "RMSERVE_REQUEST_TIMEOUT_S": "600"}
    server = start_service(model_dir, "torch", "float32", env)
    try:
        run_load(server.url, payloads[-clients:], route=route, clients=clients, total=clients)  # warm up
        return run_load(server.url, payloads, route=route, clients=clients, total=requests)
    finally:
        server.stop()


def combined(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Several load runs as one: total tokens over total seconds, the median of their p50s."""
    errors: dict[str, int] = {}
    for r in runs:
        for k, v in r["errors"].items():
            errors[k] = errors.get(k, 0) + v
    p50 = sorted(r["p50_ms"] for r in runs)[len(runs) // 2]
    return {
        "tokens_per_s": sum(r["tokens"] for r in runs) / sum(r["seconds"] for r in runs),
        "p50_ms": p50,
        "errors": errors,
    }


def train_tokens(model_dir: Path, exs: list[Any], sharing: bool, steps: int) -> tuple[int, float]:
    """Trainer (real tokens, seconds) over `steps` steps (forward + backward, top 2 layers trained, no
    frozen cache) on HH pairs, after one warm-up step."""
    from models.evaluate import encode_examples
    from models.losses import pairwise_loss
    from models.reward_model import RewardModel
    from models.train import Scorer, TrainConfig, apply_method, build_batch, make_batches

    model, tok = RewardModel.load(model_dir, dtype="float32")
    apply_method(model, TrainConfig(method="top-n", top_n=2))
    model.train()
    groups = encode_examples(model.formatter(tok), exs)
    batches = make_batches(groups, 4096)
    scorer = Scorer(model, model, tok.pad_token_id, torch.device("cpu"), None)
    scorer.prefix_sharing = sharing
    tokens = 0
    t0 = 0.0
    for step, idx in enumerate(batches[: steps + 1]):
        if step == 1:  # the first step warms up
            t0, tokens = time.perf_counter(), 0
        b = build_batch(groups, idx)
        r = scorer.rewards(groups, b)
        loss, _ = pairwise_loss(r, torch.tensor(b.better), torch.tensor(b.worse), torch.tensor(b.pair_group))
        loss.backward()
        model.zero_grad(set_to_none=True)
        tokens += b.real_tokens
    return tokens, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="default")
    ap.add_argument("--requests", type=int, default=24, help="requests per measurement (the same ones each time)")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--train-steps", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=2, help="alternate sharing off and on this many times")
    args = ap.parse_args()
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    model_dir = resolve_model(args.model)
    exs = hh_examples(300, seed=1)

    from models.reward_model import RewardModel
    from service.runtimes.torch_runtime import TorchRuntime

    # Exactness: the same sequences scored with and without sharing, in-process.
    model, tok = RewardModel.load(model_dir, dtype="float32")
    fmt = model.formatter(tok)
    on = TorchRuntime(model, tok.pad_token_id, prefix_sharing=True)
    off = TorchRuntime(model, tok.pad_token_id, prefix_sharing=False)
    max_diff = 0.0
    for p in payloads_for(exs, 8, 8):
        seqs = [fmt.encode(p["prompt"], r).ids for r in p["responses"]]
        max_diff = max(max_diff, max(abs(a - b) for a, b in zip(on.score(seqs), off.score(seqs), strict=True)))
    del model, on, off

    rank8 = payloads_for(exs, 8, 150)
    score4 = payloads_for(exs, 4, 150)
    res: dict[str, Any] = {}
    for name, payloads, route in (("rank8", rank8, "/v1/rank"), ("score4", score4, "/v1/score")):
        runs: dict[str, list[dict[str, Any]]] = {"off": [], "on": []}
        for _ in range(args.rounds):
            for key, sharing in (("off", False), ("on", True)):
                runs[key].append(service_tps(model_dir, payloads, route, sharing, args.requests, args.clients))
        res[name] = {k: combined(v) for k, v in runs.items()}
        off_r, on_r = res[name]["off"], res[name]["on"]
        print(
            f"{name:7s} sharing off {off_r['tokens_per_s']:7.0f} tokens/s (p50 {off_r['p50_ms']:.0f} ms, "
            f"errors {off_r['errors']})   on {on_r['tokens_per_s']:7.0f} tokens/s (p50 {on_r['p50_ms']:.0f} ms, "
            f"errors {on_r['errors']})   per round off {[round(r['tokens_per_s']) for r in runs['off']]} "
            f"on {[round(r['tokens_per_s']) for r in runs['on']]}",
            flush=True,
        )
    train: dict[str, list[tuple[int, float]]] = {"off": [], "on": []}
    for _ in range(args.rounds):
        for key, sharing in (("off", False), ("on", True)):
            train[key].append(train_tokens(model_dir, exs[:120], sharing, args.train_steps))
    train_off, train_on = (sum(t for t, _ in train[k]) / sum(d for _, d in train[k]) for k in ("off", "on"))
    print(f"train   sharing off {train_off:7.0f} tokens/s   on {train_on:7.0f} tokens/s", flush=True)
    out = {
        "model": str(model_dir),
        "speedup_rank8": round(res["rank8"]["on"]["tokens_per_s"] / res["rank8"]["off"]["tokens_per_s"], 3),
        "speedup_score4": round(res["score4"]["on"]["tokens_per_s"] / res["score4"]["off"]["tokens_per_s"], 3),
        "speedup_train_pairs": round(train_on / train_off, 3),
        "max_abs_diff": max_diff,
        "rank8_tokens_per_s": {k: round(v["tokens_per_s"], 1) for k, v in res["rank8"].items()},
        "score4_tokens_per_s": {k: round(v["tokens_per_s"], 1) for k, v in res["score4"].items()},
        "train_tokens_per_s": {"off": round(train_off, 1), "on": round(train_on, 1)},
        "rank8_p50_ms": {k: round(v["p50_ms"], 1) for k, v in res["rank8"].items()},
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
