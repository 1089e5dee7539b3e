"""Shared pieces of the benchmarks: real HH-RLHF dialogues, a server in a subprocess, a load generator."""

from __future__ import annotations

import asyncio
import os
import random
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("RMSERVE_BENCH_DATA") or ROOT.parent / "shared" / "data")  # a worktree elsewhere: set it


def hh_examples(n: int, seed: int = 0) -> list[Any]:
    """n real HH-RLHF comparisons (all four subsets, real length mix), deterministic sample."""
    from models.data import read_file

    files = sorted((SHARED / "hh-rlhf").glob("*.jsonl.gz"))
    if not files:
        raise SystemExit(f"no HH-RLHF data under {SHARED / 'hh-rlhf'}")
    exs = [e for f in files for e in read_file(f)[0]]
    rng = random.Random(seed)
    return rng.sample(exs, min(n, len(exs)))


def resolve_model(name: str) -> Path:
    if name == "default":
        from models.default import default_model_dir

        return default_model_dir()
    return Path(name)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """Runs a server command in a subprocess until /ready answers 200."""

    def __init__(self, cmd: Sequence[str], env: dict[str, str], port: int) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.proc = subprocess.Popen(
            list(cmd), env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT
        )
        deadline = time.time() + 300
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.proc.stderr.read() if self.proc.stderr else ''}")
            try:
                if httpx.get(self.url + "/ready", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError("server did not become ready")

    def rss_mb(self) -> float:
        try:
            with open(f"/proc/{self.proc.pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1]) / 1024
        except OSError:
            pass
        return float("nan")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def start_service(model_dir: Path, runtime: str, dtype: str, env: dict[str, str] | None = None) -> Server:
    """`rmserve serve` on a free loopback port, in a subprocess, ready to take load."""
    port = free_port()
    cmd = [
        python(),
        "-m",
        "service.cli",
        "serve",
        "--model",
        str(model_dir),
        "--port",
        str(port),
        "--runtime",
        runtime,
        "--dtype",
        dtype,
    ]
    return Server(cmd, env or {}, port)


def percentile(xs: Sequence[float], q: float) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[min(len(s) - 1, round(q / 100 * (len(s) - 1)))]


async def _load(
    url: str,
    payloads: Sequence[dict[str, Any]],
    route: str,
    clients: int,
    seconds: float,
    token_key: tuple[str, ...],
    total: int | None = None,
) -> dict[str, Any]:
    lat: list[float] = []
    tokens = 0
    errors: dict[str, int] = {}
    done = 0
    stop_at = time.perf_counter() + seconds
    counter = 0

    async def client(c: httpx.AsyncClient) -> None:
        nonlocal tokens, done, counter
        while (counter < total) if total is not None else (time.perf_counter() < stop_at):
            p = payloads[counter % len(payloads)]
            counter += 1
            t = time.perf_counter()
            try:
                r = await c.post(route, json=p)
            except httpx.HTTPError as e:
                errors[type(e).__name__] = errors.get(type(e).__name__, 0) + 1
                continue
            if r.status_code != 200:
                errors[str(r.status_code)] = errors.get(str(r.status_code), 0) + 1
                continue
            lat.append(time.perf_counter() - t)
            body = r.json()
            for k in token_key:
                body = body[k]
            tokens += int(body)
            done += 1

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    t0 = time.perf_counter()
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as c:
        await asyncio.gather(*(client(c) for _ in range(clients)))
    wall = time.perf_counter() - t0
    return {
        "requests": done,
        "tokens": tokens,
        "seconds": wall,
        "tokens_per_s": tokens / wall,
        "p50_ms": percentile(lat, 50) * 1000,
        "p99_ms": percentile(lat, 99) * 1000,
        "errors": errors,
    }


def run_load(
    url: str,
    payloads: Sequence[dict[str, Any]],
    *,
    route: str = "/v1/score",
    clients: int = 32,
    seconds: float = 30.0,
    token_key: tuple[str, ...] = ("usage", "tokens"),
    total: int | None = None,
) -> dict[str, Any]:
    """Closed-loop load: `clients` clients each send the next payload as soon as their last answer
    came. For `seconds`, or with `total`, until exactly that many requests were sent (the same work
    for every configuration compared: payloads differ in length, so a timed window would compare
    different mixes)."""
    return asyncio.run(_load(url, payloads, route, clients, seconds, token_key, total))


def python() -> str:
    return sys.executable
