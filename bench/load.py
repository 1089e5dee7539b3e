"""Load and soak test over loopback: many concurrent clients for a bounded time; every answer is
checked against the request's own score computed alone (nothing lost, nothing mixed); memory at
start and end. Prints a summary and one JSON object on its last line.

    python bench/load.py --model DIR [--seconds 120] [--clients 48]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx

from bench.common import hh_examples, percentile, resolve_model, start_service


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="default")
    ap.add_argument("--seconds", type=float, default=120.0)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--pool", type=int, default=300, help="distinct (prompt, answer) items")
    ap.add_argument("--max-queued", type=int, default=256, help="admission limit given to the server")
    ap.add_argument("--tolerance", type=float, default=1e-4)
    args = ap.parse_args()
    model_dir = resolve_model(args.model)

    from models.reward_model import RewardModel

    model, tok = RewardModel.load(model_dir, dtype="float32")
    fmt = model.formatter(tok)
    exs = hh_examples(args.pool)
    # HH holds a few empty answers, which the service refuses by design (422): leave them out here.
    items = [(ex.prompt, ex.responses[i % 2]) for i, ex in enumerate(exs) if ex.responses[i % 2]]
    # Reference: each item scored alone, in-process, fp32.
    ref = [model.score_ids([fmt.encode(p, r).ids], tok.pad_token_id)[0] for p, r in items]
    del model

    server = start_service(model_dir, "torch", "float32", {"RMSERVE_MAX_QUEUED": str(args.max_queued)})
    rss_start = server.rss_mb()
    lat: list[float] = []
    errors: dict[str, int] = {}
    mismatches = 0
    checked = 0
    rss_samples: list[float] = [rss_start]

    async def client(c: httpx.AsyncClient, rng: random.Random, stop_at: float) -> None:
        nonlocal mismatches, checked
        while time.perf_counter() < stop_at:
            k = rng.randint(1, 4)
            idx = rng.sample(range(len(items)), k)
            route = "/v1/score"
            body = {"items": [{"prompt": items[i][0], "response": items[i][1]} for i in idx]}
            t = time.perf_counter()
            try:
                r = await c.post(route, json=body)
            except httpx.HTTPError as e:
                errors[type(e).__name__] = errors.get(type(e).__name__, 0) + 1
                continue
            if r.status_code != 200:
                errors[str(r.status_code)] = errors.get(str(r.status_code), 0) + 1
                if r.status_code == 429:
                    await asyncio.sleep(float(r.headers.get("retry-after", "1")))
                continue
            lat.append(time.perf_counter() - t)
            for i, s in zip(idx, r.json()["scores"], strict=True):
                checked += 1
                if abs(s - ref[i]) > args.tolerance:
                    mismatches += 1

    async def sampler(stop_at: float) -> None:
        while time.perf_counter() < stop_at:
            await asyncio.sleep(5)
            rss_samples.append(server.rss_mb())

    async def run() -> float:
        stop_at = time.perf_counter() + args.seconds
        t0 = time.perf_counter()
        limits = httpx.Limits(max_connections=args.clients, max_keepalive_connections=args.clients)
        async with httpx.AsyncClient(base_url=server.url, timeout=120, limits=limits) as c:
            await asyncio.gather(sampler(stop_at), *(client(c, random.Random(i), stop_at) for i in range(args.clients)))
        return time.perf_counter() - t0

    try:
        wall = asyncio.run(run())
        rss_end = server.rss_mb()
        metrics = httpx.get(server.url + "/metrics").text
    finally:
        server.stop()
    # Memory growth over the second half of the run (after warm-up allocations settle).
    half = rss_samples[len(rss_samples) // 2 :] or rss_samples
    result = {
        "model": str(model_dir),
        "seconds": round(wall, 1),
        "clients": args.clients,
        "requests_ok": len(lat),
        "requests_per_s": round(len(lat) / wall, 2),
        "scores_checked": checked,
        "mismatched_scores": mismatches,
        "errors": errors,
        "p50_ms": round(percentile(lat, 50) * 1000, 1),
        "p99_ms": round(percentile(lat, 99) * 1000, 1),
        "rss_start_mb": round(rss_start, 1),
        "rss_end_mb": round(rss_end, 1),
        "rss_growth_second_half_mb": round(half[-1] - half[0], 1),
        "rss_samples_mb": [round(x) for x in rss_samples],
        "server_requests_total": sum(
            float(ln.split()[-1]) for ln in metrics.splitlines() if ln.startswith("rmserve_requests_total{")
        ),
    }
    print(
        f"{result['requests_ok']} requests in {wall:.0f} s ({result['requests_per_s']}/s), "
        f"{checked} scores checked, {mismatches} mismatched, errors {errors}, "
        f"p50 {result['p50_ms']} ms, p99 {result['p99_ms']} ms, RSS {rss_start:.0f} -> {rss_end:.0f} MB"
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
