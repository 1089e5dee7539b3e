"""What a GPU adds to the CPU-tested project, measured in one run and written as one JSON object.

    python scripts/gpu_check.py [--device cuda] [--out gpu_check.json] [--model DIR] [--backbone DIR]

1. serving: `rmserve serve --device DEVICE` (bf16 on CUDA) over HTTP against a naive loop (one
   request at a time, its responses padded into one batch, the same model and dtype in process),
   on the same requests (bench/common.py's service runner and load generator);
2. training: a short full fine-tune of the real backbone, without and with `--sharding fsdp` on one
   rank (seconds, per-step losses, bytes per rank, largest loss difference);
3. parity: rewards on DEVICE in bf16 against CPU fp32 on the same pairs (pair-order agreement,
   largest difference).

`--device cpu` is the dry run (small sizes, fp32 serving: bf16 is slow on CPUs without native bf16).
Data: HH-RLHF under --data-dir when present, else synthetic dialogues (said in the JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import python, run_load, start_service  # noqa: E402
from bench.parity import pair_parity  # noqa: E402


def examples(data_dir: Path | None, n: int, seed: int = 0) -> tuple[list[Any], str]:
    """n comparisons: HH-RLHF when `data_dir/hh-rlhf` holds it, else synthetic (prompt, 2 answers)."""
    from models.data import RankedExample, read_file

    files = sorted((data_dir / "hh-rlhf").glob("*.jsonl.gz")) if data_dir else []
    if files:
        exs = [e for e in read_file(files[0])[0]]
        return random.Random(seed).sample(exs, min(n, len(exs))), f"hh-rlhf ({files[0].name})"
    rng = random.Random(seed)
    words = [
        "the",
        "a",
        "bread",
        "flour",
        "water",
        "yeast",
        "oven",
        "bake",
        "knead",
        "rise",
        "salt",
        "sugar",
        "warm",
        "hour",
        "dough",
    ]
    out = []
    for _ in range(n):
        q = " ".join(rng.choice(words) for _ in range(rng.randint(8, 40)))
        a, b = (" ".join(rng.choice(words) for _ in range(rng.randint(10, 120))) for _ in range(2))
        out.append(RankedExample([{"role": "user", "content": q}], [a, b], [0, 1]))
    return out, "synthetic"


def serving(model_dir: Path, device: str, dtype: str, exs: list[Any], requests: int) -> dict[str, Any]:
    """The service (dynamic batching) and a naive loop on the same requests, tokens per second each."""
    import torch

    from models.reward_model import RewardModel, collate

    payloads = [{"prompt": e.prompt, "responses": e.responses} for e in exs]
    server = start_service(model_dir, "torch", dtype, env={"RMSERVE_DEVICE": device})
    try:
        run_load(server.url, payloads[:8], clients=4, total=8)  # warm up
        svc = run_load(server.url, payloads, clients=32, total=requests)
    finally:
        server.stop()
    model, tok = RewardModel.load(model_dir, dtype=dtype)
    model.to(device).eval()
    fmt = model.formatter(tok)
    tokens = 0
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    t0 = time.perf_counter()
    with torch.inference_mode():
        for k in range(requests):
            p = payloads[k % len(payloads)]
            seqs = [fmt.encode(p["prompt"], r).ids for r in p["responses"]]
            ids, mask = collate(seqs, tok.pad_token_id, "right", torch.device(device))
            model(ids, mask).tolist()
            tokens += sum(len(s) for s in seqs)
    sync()
    naive_s = time.perf_counter() - t0
    naive = {"requests": requests, "tokens": tokens, "seconds": round(naive_s, 3), "tokens_per_s": tokens / naive_s}
    return {
        "dtype": dtype,
        "service": svc,
        "naive_loop": naive,
        "service_over_naive": round(svc["tokens_per_s"] / naive["tokens_per_s"], 2),
    }


def finetune(
    backbone: Path, device: str, exs: list[Any], steps: int, batch_tokens: int, timeout: float
) -> dict[str, Any]:
    """`rmserve train --method full --max-steps STEPS` without and with --sharding fsdp (one rank),
    under "one_process" and "fsdp" (a failure or a run past `timeout` seconds is recorded there too,
    as {"error": ..., "timed_out": bool})."""
    from models.data import write_jsonl

    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    data = work / "pairs.jsonl"
    recs = []
    for e in exs:
        best, worst = (e.responses[i] for i in sorted(range(2), key=lambda i: e.ranks[i]))
        recs.append({"prompt": e.prompt, "chosen": best, "rejected": worst})
    write_jsonl(data, recs)
    out: dict[str, Any] = {"backbone": str(backbone), "steps": steps}
    dtype = "bfloat16" if device.startswith("cuda") else "float32"
    for sharding in ("ddp", "fsdp"):
        key = "fsdp" if sharding == "fsdp" else "one_process"  # ddp on one process: no wrapper at all
        run_dir = work / sharding
        cmd = [python(), "-m", "service.cli", "train", "--backbone", str(backbone), "--data", str(data)]
        cmd += ["--out", str(run_dir), "--method", "full", "--max-steps", str(steps), "--device", device]
        cmd += ["--dtype", dtype, "--batch-tokens", str(batch_tokens), "--lr", "1e-5", "--dev-fraction", "0.1"]
        cmd += ["--sharding", sharding, "--norm-samples", "32", "--max-length", "512", "--cache-dir", "none"]
        t0 = time.perf_counter()
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        try:
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            tail = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
            out[key] = {"error": f"timed out after {timeout:.0f} s", "timed_out": True, "stderr": tail[-2000:]}
            continue
        seconds = time.perf_counter() - t0
        if proc.returncode != 0:
            out[key] = {"error": proc.stderr[-2000:], "timed_out": False, "returncode": proc.returncode}
            continue
        metrics = json.loads((run_dir / "metrics.json").read_text())
        out[key] = {
            "seconds": round(seconds, 1),
            "losses": [round(h["loss"], 6) for h in metrics["history"]],
            "memory_per_rank": metrics["training"]["memory_per_rank"],
            "dev_accuracy": metrics["dev"].get("accuracy"),
            "dtype": dtype,
        }
    a, b = out.get("one_process", {}).get("losses"), out.get("fsdp", {}).get("losses")
    if a and b:
        out["max_loss_diff"] = max(abs(x - y) for x, y in zip(a, b, strict=True))
    return out


def parity(model_dir: Path, device: str, exs: list[Any]) -> dict[str, Any]:
    """Rewards on `device` in bf16 against CPU fp32 on the same pairs."""
    from models.reward_model import RewardModel

    ref, tok = RewardModel.load(model_dir, dtype="float32")
    fmt = ref.formatter(tok)
    pairs = [[fmt.encode(e.prompt, r).ids for r in e.responses[:2]] for e in exs]
    flat = [s for p in pairs for s in p]
    want = ref.score_ids(flat, tok.pad_token_id)
    del ref
    got_model, _ = RewardModel.load(model_dir, dtype="bfloat16")
    got_model.to(device).eval()
    got = got_model.score_ids(flat, tok.pad_token_id)
    halves = range(0, len(flat), 2)
    pp = pair_parity([want[i : i + 2] for i in halves], [got[i : i + 2] for i in halves])
    return {"pairs": len(pairs), "against": "cpu float32", "dtype": "bfloat16", "device": device, **pp}


def find_data_dir(given: str | None) -> Path | None:
    """--data-dir when given; else the first `shared/data` found beside the checkout this script runs
    from, or beside the main checkout when this one is a git worktree; None (synthetic data) if none."""
    if given:
        return Path(given)
    roots = [ROOT, ROOT.parent]
    try:  # a worktree's common git dir is MAIN/.git: look beside MAIN too
        common = subprocess.run(
            ["git", "rev-parse", "--path-format=absolute", "--git-common-dir"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        if common:
            roots += [Path(common).parent, Path(common).parent.parent]
    except (OSError, subprocess.SubprocessError):
        pass
    for r in roots:
        if (r / "shared" / "data").is_dir():
            return r / "shared" / "data"
    return None


def find_backbone(home: Path) -> Path:
    """The SmolLM2 backbone under HOME/backbones (by name), so another fetched backbone is not picked."""
    found = sorted(p for p in (home / "backbones").glob("*") if "smollm2" in p.name.lower())
    if not found:
        have = sorted(p.name for p in (home / "backbones").glob("*"))
        raise SystemExit(f"no SmolLM2 backbone under {home / 'backbones'} (found {have}); give --backbone DIR")
    return found[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", help="cuda (the check) or cpu (a dry run, small sizes)")
    ap.add_argument("--out", default="gpu_check.json")
    ap.add_argument("--model", default="default", help="reward model directory to serve (default: the default model)")
    ap.add_argument("--backbone", default=None, help="SFT backbone to fine-tune (default: RMSERVE_HOME's SmolLM2)")
    ap.add_argument(
        "--data-dir",
        default=None,
        help="folder holding hh-rlhf/*.jsonl.gz (default: shared/data beside this checkout or the main one; "
        "synthetic dialogues when none is found, said in the JSON)",
    )
    ap.add_argument(
        "--train-timeout",
        type=float,
        default=None,
        help="seconds allowed to each fine-tune run (default 75 on CUDA, keeping the check under 5 minutes; "
        "900 on CPU); a run past it is recorded as timed out",
    )
    ap.add_argument("--requests", type=int, default=None)
    ap.add_argument("--pairs", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None)
    args = ap.parse_args()
    cuda = args.device.startswith("cuda")
    requests = args.requests or (512 if cuda else 16)
    n_pairs = args.pairs or (256 if cuda else 16)
    steps = args.steps or (30 if cuda else 3)
    import torch

    from models.backbone import default_home

    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no GPU here; use --device cpu for the dry run")
    model_dir = Path(args.model) if args.model != "default" else default_home() / "models" / "default"
    backbone = Path(args.backbone) if args.backbone else find_backbone(default_home())
    data_dir = find_data_dir(args.data_dir)
    train_timeout = args.train_timeout or (75.0 if cuda else 900.0)
    if data_dir is None:
        print("gpu_check: no shared/data found (give --data-dir); using synthetic dialogues", file=sys.stderr)
    exs, source = examples(data_dir, max(requests, n_pairs, 64))
    t0 = time.perf_counter()
    result: dict[str, Any] = {
        "device": args.device,
        "gpu": torch.cuda.get_device_name() if cuda else None,
        "torch": torch.__version__,
        "model": str(model_dir),
        "data": source,
        "data_dir": str(data_dir) if data_dir else None,
        "dry_run": not cuda,
    }
    result["serving"] = serving(model_dir, args.device, "bfloat16" if cuda else "float32", exs[:requests], requests)
    result["finetune"] = finetune(backbone, args.device, exs, steps, 4096 if cuda else 1024, train_timeout)
    result["parity"] = parity(model_dir, args.device, exs[:n_pairs])
    result["seconds"] = round(time.perf_counter() - t0, 1)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
