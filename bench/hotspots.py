"""Where the service spends its time under load: py-spy samples the running `rmserve serve` while
32 clients send /v1/score (4 HH answers each), then prints the share of samples per stage.

    python bench/hotspots.py --model DIR [--runtime auto] [--seconds 30]

Needs py-spy (`pip install py-spy`; sampling another process may need root or ptrace rights).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import hh_examples, resolve_model, run_load, start_service

# A sample's stage: the first of these found in its stack (innermost first), else "other".
STAGES = [
    ("model forward (onnxruntime)", ("InferenceSession.run", "onnxruntime")),
    ("model forward (torch)", ("RewardModel.forward", "shared_prefix_rewards", "_call_impl")),
    ("tokenize + format", ("Formatter.encode", "apply_chat_template", "tokenizers", "encode_batch")),
    ("batcher", ("batcher.py",)),
    ("JSON + validation", ("pydantic", "json", "jsonable_encoder", "render")),
    ("event loop + sockets (uvloop)", ("Runner.run (asyncio", "asyncio/")),
    ("HTTP (uvicorn, starlette)", ("uvicorn", "starlette", "h11", "httptools")),
]


def stage_of(stack: str) -> str:
    frames = stack.split(";")[::-1]
    for frame in frames:
        for name, keys in STAGES:
            if any(k in frame for k in keys):
                return name
    return "other"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="default")
    ap.add_argument("--runtime", default="auto")
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--out", default="profile.txt", help="collapsed stacks written here")
    args = ap.parse_args()
    model_dir = resolve_model(args.model)
    exs = hh_examples(200, seed=2)
    payloads = [{"prompt": e.prompt, "responses": (e.responses * 2)[:4]} for e in exs]
    server = start_service(model_dir, args.runtime, "auto")
    try:
        run_load(server.url, payloads, clients=args.clients, seconds=3)
        spy = subprocess.Popen(
            [
                "py-spy",
                "record",
                "--pid",
                str(server.proc.pid),
                "--duration",
                str(int(args.seconds)),
                "--format",
                "raw",
                "--nonblocking",
                "--threads",
                "-o",
                args.out,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        res: dict = {}
        t = threading.Thread(
            target=lambda: res.update(run_load(server.url, payloads, clients=args.clients, seconds=args.seconds + 2))
        )
        t.start()
        spy.wait()
        t.join()
    finally:
        server.stop()
    counts: Counter[str] = Counter()
    for line in Path(args.out).read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        counts[stage_of(stack)] += int(n)
    total = sum(counts.values()) or 1  # samples of threads on the CPU (py-spy leaves idle ones out)
    for name, n in counts.most_common():
        print(f"{name:32s} {100 * n / total:5.1f}% of busy samples")
    out = {k: round(v / total, 4) for k, v in counts.items()}
    out["forward_share_of_busy"] = round(
        (counts["model forward (onnxruntime)"] + counts["model forward (torch)"]) / total, 4
    )
    out["service_tokens_per_s"] = round(res.get("tokens_per_s", 0.0), 1)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
