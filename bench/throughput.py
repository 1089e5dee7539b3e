"""Throughput benchmark: the machine's limit, each mode's raw forward pass (torch padded fp32/bf16, torch
canonical fp32/bf16, ONNX fp32) next to its parity with torch fp32 and its largest alone-vs-batch
difference, padding's waste on HH dialogues, the service over HTTP at saturation in its default mode
(with the scores of a few requests compared alone and under that load), best-of-8 latency over HTTP
against the idle service, and a naive server, all measured in one run on real HH-RLHF dialogues.

    python bench/throughput.py --model DIR [--seconds 30] [--clients 32]

Prints a table, then one JSON object on its last line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bench.common import Server, free_port, hh_examples, percentile, python, resolve_model, run_load, start_service
from bench.parity import batch_invariance, load_spec, pair_parity


def matmul_peak(dtype: torch.dtype, seconds: float = 3.0) -> float:
    """Best sustained GFLOP/s of a transformer-shaped matmul (4096 x 576 @ 576 x 1536) in `dtype`."""
    a = torch.randn(4096, 576, dtype=dtype)
    w = torch.randn(1536, 576, dtype=dtype)
    torch.nn.functional.linear(a, w)
    best = 0.0
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        t = time.perf_counter()
        for _ in range(5):
            torch.nn.functional.linear(a, w)
        best = max(best, 5 * 2 * 4096 * 576 * 1536 / (time.perf_counter() - t) / 1e9)
    return best


def non_embedding_params(model: Any) -> int:
    emb = model.body.get_input_embeddings().weight.numel()
    return sum(p.numel() for p in model.parameters()) - emb


def raw_throughput(runtime: Any, seqs: list[Any], budgets: tuple[int, ...], seconds: float) -> dict[str, Any]:
    """Forward pass alone over batches under each token budget (length-sorted padded batches, or packed
    batches of real tokens for a packed runtime); the best one wins. Tokens are the sequences' tokens."""
    from models.batching import length_batches, packed_batches

    best: dict[str, Any] = {"tokens_per_s": 0.0}
    for budget in budgets:
        if getattr(runtime, "packed", False):
            batches = packed_batches(seqs, budget, 256)
        else:
            batches = length_batches([len(s) for s in seqs], budget)
        runtime.score([seqs[i] for i in batches[0]])  # warm up
        tokens = 0
        t0 = time.perf_counter()
        k = 0
        while time.perf_counter() - t0 < seconds:
            b = batches[k % len(batches)]
            runtime.score([seqs[i] for i in b])
            tokens += sum(len(seqs[i]) for i in b)
            k += 1
        tps = tokens / (time.perf_counter() - t0)
        if tps > best["tokens_per_s"]:
            best = {"tokens_per_s": tps, "batch_tokens": budget}
    return best


def best_of_n_http(url: str, requests: list[dict[str, Any]], rounds: int = 2) -> dict[str, float]:
    """p50/p99 milliseconds of one /v1/score request of n answers to one prompt, one at a time (the
    service otherwise idle)."""
    import httpx

    with httpx.Client(base_url=url, timeout=300) as c:
        c.post("/v1/score", json=requests[0])  # warm up
        lat = []
        for _ in range(rounds):
            for body in requests:
                t = time.perf_counter()
                r = c.post("/v1/score", json=body)
                lat.append((time.perf_counter() - t) * 1000)
                r.raise_for_status()
    return {"p50_ms": percentile(lat, 50), "p99_ms": percentile(lat, 99)}


def padding_waste(seqs: list[Any], batch_tokens: int, max_seqs: int, pad_ratio: float) -> dict[str, float]:
    """Tokens computed per real token on these sequences: padded batches as the padded forward's batcher
    cuts them (length-sorted, `batch_tokens` padded, `pad_ratio`), padded batches in arrival order (64
    sequences as they come, padded to the longest), and packed batches (no padding, each prompt once)."""
    from models.batching import length_batches, packed_batches, packed_cost

    real = sum(len(s) for s in seqs)
    sorted_cost = sum(
        max(len(seqs[i]) for i in b) * len(b)
        for b in length_batches([len(s) for s in seqs], batch_tokens, max_seqs, pad_ratio)
    )
    arrival = sum(max(len(s) for s in seqs[k : k + 64]) * len(seqs[k : k + 64]) for k in range(0, len(seqs), 64))
    packed = sum(packed_cost([seqs[i] for i in b]) for b in packed_batches(seqs, batch_tokens, max_seqs))
    return {
        "real_tokens": real,
        "padded_sorted_over_real": round(sorted_cost / real, 3),
        "padded_arrival_order_over_real": round(arrival / real, 3),
        "packed_over_real": round(packed / real, 3),
    }


def scores_alone_and_under_load(
    url: str, payloads: list[dict[str, Any]], probes: list[dict[str, Any]], clients: int, seconds: float
) -> tuple[dict[str, Any], float]:
    """The service's load result, and the largest change of a probe's score between each response
    scored alone (one request each, no other load) and the whole probe sent while `clients` others load it."""
    import httpx

    with httpx.Client(base_url=url, timeout=300) as c:

        def one(prompt: str, response: str) -> float:
            return float(c.post("/v1/score", json={"prompt": prompt, "responses": [response]}).json()["scores"][0])

        alone = [[one(p["prompt"], r) for r in p["responses"]] for p in probes]
        res: dict[str, Any] = {}
        load = threading.Thread(target=lambda: res.update(run_load(url, payloads, clients=clients, seconds=seconds)))
        load.start()
        time.sleep(min(2.0, seconds / 4))
        under = [c.post("/v1/score", json=p).json()["scores"] for p in probes]
        load.join()
    diff = max(abs(a - b) for p, q in zip(alone, under, strict=True) for a, b in zip(p, q, strict=True))
    return res, diff


def lscpu_model_name() -> str:
    """lscpu's "Model name" (the machine kind a batch-invariance guarantee is for)."""
    import subprocess

    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return next((ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")), "unknown")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="default")
    ap.add_argument("--seconds", type=float, default=30.0, help="load duration per server")
    ap.add_argument("--raw-seconds", type=float, default=15.0, help="per runtime and batch budget")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--answers", type=int, default=4, help="answers per /v1/score request")
    ap.add_argument(
        "--runtimes",
        default="torch:float32+canonical,torch:bfloat16+canonical,torch:float32,torch:bfloat16,onnx:float32",
        help="modes to measure raw: +canonical = the packed batch-invariant forward; plain torch = padded",
    )
    ap.add_argument("--budgets", default="2048,4096,8192", help="tokens per pass tried in the raw measure")
    ap.add_argument("--service-runtime", default="auto:auto", help="runtime:dtype the service runs (its default)")
    ap.add_argument("--parity-pairs", type=int, default=200, help="HH pairs each runtime is compared on")
    ap.add_argument("--invariance-pairs", type=int, default=8, help="pairs scored alone and in batches")
    ap.add_argument("--best-of", type=int, default=8, help="answers per best-of-n request")
    ap.add_argument("--best-of-requests", type=int, default=20)
    args = ap.parse_args()
    threads = len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    model_dir = resolve_model(args.model)

    from models.reward_model import RewardModel

    model, tok = RewardModel.load(model_dir, dtype="float32")
    fmt = model.formatter(tok)
    exs = hh_examples(400)
    # Requests: one HH prompt with `answers` responses (its chosen/rejected, then other dialogues' answers).
    payloads = []
    for i, ex in enumerate(exs[:200]):
        extra = [exs[(i + j + 1) % len(exs)].responses[0] for j in range(max(0, args.answers - 2))]
        payloads.append({"prompt": ex.prompt, "responses": (ex.responses + extra)[: args.answers]})
    # The raw forward pass sees exactly the sequences the service load sends.
    from models.batching import PromptSplit

    def enc(prompt: Any, answer: str) -> PromptSplit:
        e = fmt.encode(prompt, answer)
        return PromptSplit(e.ids, e.prompt_len)  # as the service hands them over

    seqs = [enc(p["prompt"], r) for p in payloads for r in p["responses"]]
    waste = padding_waste(seqs, 4096, 64, 1.3)  # the service's default limits
    print(f"padding waste on HH dialogues ({args.answers} answers a prompt): {waste}", flush=True)

    peaks = {"float32": matmul_peak(torch.float32), "bfloat16": matmul_peak(torch.bfloat16)}
    n_params = non_embedding_params(model)
    limit = max(peaks.values()) * 1e9 / (2 * n_params)

    parity_exs = hh_examples(args.parity_pairs, seed=7)
    pairs = [[enc(ex.prompt, r) for r in ex.responses] for ex in parity_exs]
    ref_rt = load_spec(model_dir, "torch:float32", threads)
    ref = [ref_rt.score(p) for p in pairs]
    del ref_rt
    raw: dict[str, Any] = {}
    for spec in args.runtimes.split(","):
        rt = load_spec(model_dir, spec, threads)  # torch: the plain forward pass (no prefix sharing)
        budgets = tuple(int(b) for b in args.budgets.split(","))
        raw[spec] = raw_throughput(rt, seqs, budgets, args.raw_seconds)
        raw[spec].update(pair_parity(ref, [rt.score(p) for p in pairs]))
        raw[spec]["batch_max_abs_diff"] = round(batch_invariance(rt.score, pairs[: args.invariance_pairs]), 6)
        print(f"raw {spec:16s} {raw[spec]}", flush=True)
        del rt
    fastest = max(raw, key=lambda k: raw[k]["tokens_per_s"])
    service_spec = args.service_runtime
    s_name, s_dtype = service_spec.split(":")

    # The mode the service picks by default (auto), as `rmserve serve` would load it.
    from service.runtimes import load_runtime
    from service.settings import Settings

    default_rt, _, _, card = load_runtime(Settings(model=str(model_dir)), model_dir)
    mode = card["mode"]
    default_spec = f"{mode['runtime']}:{mode['dtype']}" + ("+canonical" if mode["forward"] == "canonical" else "")
    del default_rt
    raw_spec = default_spec if service_spec == "auto:auto" else service_spec
    if raw_spec not in raw:
        raise SystemExit(f"--runtimes must include the service's runtime {raw_spec} to compare it with")
    bon = []
    for i, ex in enumerate(exs[: args.best_of_requests]):
        answers = ex.responses + [exs[(i + j + 1) % len(exs)].responses[0] for j in range(args.best_of - 2)]
        bon.append({"prompt": ex.prompt, "responses": answers[: args.best_of]})

    server = start_service(model_dir, s_name, s_dtype, {"RMSERVE_REQUEST_TIMEOUT_S": "600"})
    try:
        best_of = best_of_n_http(server.url, bon)  # idle service, one request at a time
        print(f"best-of-{args.best_of} over HTTP ({mode['name']}) p50 {best_of['p50_ms']:.0f} ms", flush=True)
        run_load(server.url, payloads, clients=args.clients, seconds=3)  # warm up
        service, service_diff = scores_alone_and_under_load(
            server.url, payloads, payloads[:4], args.clients, args.seconds
        )
    finally:
        server.stop()
    print(
        f"service ({service_spec} = {mode['name']}) {service['tokens_per_s']:8.0f} tokens/s  "
        f"p50 {service['p50_ms']:.0f} ms  p99 {service['p99_ms']:.0f} ms  errors {service['errors']}",
        flush=True,
    )

    port = free_port()
    naive_srv = Server([python(), "bench/naive_server.py", str(model_dir), str(port)], {}, port)
    try:
        run_load(naive_srv.url, payloads, clients=args.clients, seconds=3)
        naive = run_load(naive_srv.url, payloads, clients=args.clients, seconds=args.seconds)
    finally:
        naive_srv.stop()
    print(
        f"naive (torch fp32, one request at a time) {naive['tokens_per_s']:8.0f} tokens/s  "
        f"p50 {naive['p50_ms']:.0f} ms  p99 {naive['p99_ms']:.0f} ms",
        flush=True,
    )

    result = {
        "model": str(model_dir),
        "cpu": lscpu_model_name(),
        "threads": threads,
        "matmul_gflops": {k: round(v, 1) for k, v in peaks.items()},
        "non_embedding_params": n_params,
        "limit_tokens_per_s": round(limit, 1),
        "default_mode": mode,
        "default_runtime": default_spec,
        "default_batch_max_abs_diff": raw[raw_spec]["batch_max_abs_diff"],  # alone vs in batches, raw
        "default_service_alone_vs_load_max_abs_diff": round(service_diff, 6),  # over HTTP, under load
        "raw_tokens_per_s": {k: round(v["tokens_per_s"], 1) for k, v in raw.items()},
        "default_over_fastest_raw": round(raw[raw_spec]["tokens_per_s"] / raw[fastest]["tokens_per_s"], 3),
        "runtimes": raw,
        "parity_pairs": len(pairs),
        "padding_waste": waste,
        f"best_of_{args.best_of}_p50_ms": round(best_of["p50_ms"], 1),
        f"best_of_{args.best_of}_p99_ms": round(best_of["p99_ms"], 1),
        "service_runtime": service_spec,
        "service_tokens_per_s": round(service["tokens_per_s"], 1),
        "service_p50_ms": round(service["p50_ms"], 1),
        "service_p99_ms": round(service["p99_ms"], 1),
        "service_errors": service["errors"],
        "naive_tokens_per_s": round(naive["tokens_per_s"], 1),
        "naive_p50_ms": round(naive["p50_ms"], 1),
        "naive_p99_ms": round(naive["p99_ms"], 1),
        "service_over_raw": round(service["tokens_per_s"] / raw[raw_spec]["tokens_per_s"], 3),
        "service_over_naive": round(service["tokens_per_s"] / naive["tokens_per_s"], 3),
        "raw_over_limit": round(raw[fastest]["tokens_per_s"] / limit, 3),
        "clients": args.clients,
        "answers_per_request": args.answers,
        "seconds": {"raw": args.raw_seconds, "load": args.seconds},
    }
    print()
    print("| measure | tokens/s |")
    print("| --- | --- |")
    print(f"| limit (best matmul peak / 2 x non-embedding params) | {limit:.0f} |")
    for k, v in raw.items():
        print(f"| raw {k} | {v['tokens_per_s']:.0f} |")
    print(
        f"| service {service_spec}, {args.clients} clients x {args.answers} answers | {service['tokens_per_s']:.0f} |"
    )
    print(f"| naive server | {naive['tokens_per_s']:.0f} |")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
