"""Sustained overload against the default settings with a 10 s deadline: many clients, each sending
requests of 8 long answers back to back (after a 429 a client waits `--backoff` seconds, not the
Retry-After, so the pressure stays; `--honour-retry-after` makes them wait it, as RewardClient does).
Counts 200/429/504, latency of accepted and refused requests, and the accepted throughput against an
unloaded run (one client) of the same requests. Then memory under
stalled uploads: `--stalled` connections each send the headers and 1 MB of a larger body, then stall.

Prints a summary and one JSON object on its last line.

    nice -n 5 python bench/overload.py [--seconds 40] [--clients 48]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import socket
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import contextlib

import httpx

from bench.common import hh_examples, percentile, resolve_model, start_service

log = logging.getLogger("bench.overload")


def long_requests(n: int, answers: int, min_chars: int) -> list[dict[str, Any]]:
    """`n` requests of `answers` long answers each (HH-RLHF answers of at least `min_chars`), one prompt each."""
    exs = hh_examples(4000)
    long = [r for ex in exs for r in ex.responses if len(r) >= min_chars]
    prompts = [ex.prompt for ex in exs]
    return [
        {
            "prompt": prompts[i % len(prompts)],
            "responses": [long[(i * answers + k) % len(long)] for k in range(answers)],
        }
        for i in range(n)
    ]


async def drive(
    url: str,
    payloads: list[dict[str, Any]],
    clients: int,
    seconds: float,
    backoff: float,
    honour_retry_after: bool = False,
) -> dict[str, Any]:
    codes: dict[str, int] = {}
    lat: dict[int, list[float]] = {200: [], 429: [], 504: []}
    answers = 0
    counter = 0
    stop_at = time.perf_counter() + seconds

    async def client(c: httpx.AsyncClient) -> None:
        nonlocal answers, counter
        while time.perf_counter() < stop_at:
            p = payloads[counter % len(payloads)]
            counter += 1
            t = time.perf_counter()
            try:
                r = await c.post("/v1/score", json=p)
                code = r.status_code
            except httpx.HTTPError as e:
                codes[type(e).__name__] = codes.get(type(e).__name__, 0) + 1
                continue
            codes[str(code)] = codes.get(str(code), 0) + 1
            lat.setdefault(code, []).append(time.perf_counter() - t)
            if code == 200:
                answers += len(p["responses"])
            elif code == 429:
                wait = float(r.headers.get("retry-after", 0)) if honour_retry_after else 0.0
                await asyncio.sleep(max(backoff, wait))

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    t0 = time.perf_counter()
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as c:
        await asyncio.gather(*(client(c) for _ in range(clients)))
    wall = time.perf_counter() - t0
    return {
        "codes": codes,
        "answers_per_s": answers / wall,
        "seconds": round(wall, 1),
        "p50_200_ms": round(percentile(lat[200], 50) * 1000) if lat[200] else None,
        "p99_200_ms": round(percentile(lat[200], 99) * 1000) if lat[200] else None,
        "p50_429_ms": round(percentile(lat[429], 50) * 1000, 1) if lat[429] else None,
        "p99_429_ms": round(percentile(lat[429], 99) * 1000, 1) if lat[429] else None,
    }


def stalled_uploads(url: str, n: int, sent_bytes: int, rss: Any) -> dict[str, Any]:
    """`n` connections that send the headers of a bigger body plus `sent_bytes` of it, then stall."""
    host, port = "127.0.0.1", int(url.rsplit(":", 1)[1])
    before = rss()
    socks = []
    chunk = b'{"prompt": "' + b"a" * (sent_bytes - 12)
    for _ in range(n):
        s = socket.create_connection((host, port))
        s.sendall(
            b"POST /v1/score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: " + str(2 * sent_bytes).encode() + b"\r\n\r\n"
        )
        socks.append(s)
    for s in socks:
        with contextlib.suppress(OSError):
            s.sendall(chunk)
    time.sleep(2.0)
    peak = rss()
    for s in socks:
        s.close()
    time.sleep(2.0)
    return {"stalled": n, "rss_before_mb": round(before), "rss_stalled_mb": round(peak), "rss_after_mb": round(rss())}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="default")
    ap.add_argument("--seconds", type=float, default=40.0)
    ap.add_argument("--unloaded-seconds", type=float, default=20.0)
    ap.add_argument("--clients", type=int, default=48)
    ap.add_argument("--answers", type=int, default=8)
    ap.add_argument("--min-chars", type=int, default=1200, help="shortest answer counted as long")
    ap.add_argument("--deadline", type=float, default=10.0, help="RMSERVE_REQUEST_TIMEOUT_S")
    ap.add_argument("--backoff", type=float, default=0.2, help="a client's pause after a 429")
    ap.add_argument(
        "--honour-retry-after", action="store_true", help="clients wait Retry-After after a 429 (as RewardClient does)"
    )
    ap.add_argument("--stalled", type=int, default=100, help="stalled 1 MB uploads for the memory phase")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)

    payloads = long_requests(200, args.answers, args.min_chars)
    server = start_service(resolve_model(args.model), "auto", "auto", {"RMSERVE_REQUEST_TIMEOUT_S": str(args.deadline)})
    try:
        rss_start = server.rss_mb()
        unloaded = asyncio.run(drive(server.url, payloads, 1, args.unloaded_seconds, args.backoff))
        log.info("unloaded: %s", unloaded)
        loaded = asyncio.run(
            drive(server.url, payloads, args.clients, args.seconds, args.backoff, args.honour_retry_after)
        )
        log.info("overload: %s", loaded)
        rss_loaded = server.rss_mb()
        memory = stalled_uploads(server.url, args.stalled, 1024 * 1024, server.rss_mb)
        log.info("stalled uploads: %s", memory)
    finally:
        server.stop()
    codes = loaded["codes"]
    result = {
        "clients": args.clients,
        "answers_per_request": args.answers,
        "seconds": args.seconds,
        "deadline_s": args.deadline,
        "honour_retry_after": args.honour_retry_after,
        "n200": codes.get("200", 0),
        "n429": codes.get("429", 0),
        "n504": codes.get("504", 0),
        "other": {k: v for k, v in codes.items() if k not in ("200", "429", "504")},
        "p50_200_ms": loaded["p50_200_ms"],
        "p99_200_ms": loaded["p99_200_ms"],
        "p50_429_ms": loaded["p50_429_ms"],
        "p99_429_ms": loaded["p99_429_ms"],
        "answers_per_s_loaded": round(loaded["answers_per_s"], 2),
        "answers_per_s_unloaded": round(unloaded["answers_per_s"], 2),
        "throughput_ratio": round(loaded["answers_per_s"] / unloaded["answers_per_s"], 3)
        if unloaded["answers_per_s"]
        else None,
        "unloaded_p50_ms": unloaded["p50_200_ms"],
        "rss_start_mb": round(rss_start),
        "rss_after_load_mb": round(rss_loaded),
        **memory,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
