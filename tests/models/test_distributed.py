"""The trainer under torchrun on CPU (gloo, 2 processes, a tiny Llama): the same per-step losses at any
world size (one process with --grad-accum 2, DDP on 2 ranks, FSDP2 on 2 ranks), sharded checkpoints
that resume exactly, the FSDP output in the standard format, the memory per rank, and the refusals."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from service.cli import main as cli
from tests.models.test_train import synthetic

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synthetic(tmp_path_factory.mktemp("dist") / "syn.jsonl", 44, seed=3)


def train_args(llama_dir: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "train",
        "--backbone",
        str(llama_dir),
        "--data",
        str(data),
        "--out",
        str(out),
        "--method",
        "full",
        "--dtype",
        "float32",
        "--batch-tokens",
        "300",
        "--dev-fraction",
        "0.1",
        "--lr",
        "2e-3",
        "--seed",
        "0",
        "--norm-samples",
        "16",
        "--cache-dir",
        "none",
        *extra,
    ]


def torchrun(
    args: list[str], nproc: int = 2, timeout: float = 240, entry: tuple[str, ...] = ("-m", "service.cli")
) -> subprocess.CompletedProcess[str]:
    """`torchrun --standalone --nproc-per-node N -m service.cli ARGS` (or another `entry`) in a subprocess
    (gloo on CPU); asserts it exits 0."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    proc = subprocess.run([*cmd, *entry, *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def losses(out: Path) -> list[float]:
    return [h["loss"] for h in json.loads((out / "metrics.json").read_text())["history"]]


def training(out: Path) -> dict[str, Any]:
    return dict(json.loads((out / "metrics.json").read_text())["training"])


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, llama_dir: Path, data: Path) -> dict[str, Path]:
    """The same recipe three ways: one process with --grad-accum 2, DDP on 2 ranks, FSDP on 2 ranks."""
    tmp = tmp_path_factory.mktemp("runs")
    assert cli(train_args(llama_dir, data, tmp / "one", "--grad-accum", "2")) == 0
    torchrun(train_args(llama_dir, data, tmp / "ddp"))
    torchrun(train_args(llama_dir, data, tmp / "fsdp", "--sharding", "fsdp"))
    return {"one": tmp / "one", "ddp": tmp / "ddp", "fsdp": tmp / "fsdp"}


def test_same_losses_one_process_ddp_fsdp(runs: dict[str, Path], llama_dir: Path, data: Path) -> None:
    from models.train import TrainConfig, build_batches, load_data, load_model

    a, b, c = losses(runs["one"]), losses(runs["ddp"]), losses(runs["fsdp"])
    print("\nstep  one process, --grad-accum 2  DDP, 2 ranks  FSDP, 2 ranks")
    for k, (x, y, z) in enumerate(zip(a, b, c, strict=True)):
        print(f"{k + 1:4d}  {x:.6f}  {y:.6f}  {z:.6f}")
    # The recipe's micro-batch count is odd: the last step has one micro-batch, so on 2 ranks one
    # rank runs a weight-0 repeat there, and the remainder still counts the same as on one process.
    cfg = TrainConfig(backbone=str(llama_dir), data=[str(data)], out="unused", batch_tokens=300, dev_fraction=0.1)
    model, tok = load_model(cfg)
    n_micro = len(build_batches(cfg, load_data(cfg, model.formatter(tok)).train))
    assert n_micro % 2 == 1 and len(a) == len(b) == len(c) == (n_micro + 1) // 2 >= 4
    assert max(abs(x - y) for x, y in zip(a, b, strict=True)) < 1e-4
    assert max(abs(x - z) for x, z in zip(a, c, strict=True)) < 1e-4
    accs = [[h["accuracy"] for h in json.loads((runs[k] / "metrics.json").read_text())["history"]] for k in runs]
    assert accs[0] == accs[1] == accs[2]
    assert training(runs["fsdp"])["sharding"] == "fsdp" and training(runs["fsdp"])["world_size"] == 2


def test_fsdp_memory_per_rank_about_half(runs: dict[str, Path]) -> None:
    m1 = training(runs["one"])["memory_per_rank"]
    mf = training(runs["fsdp"])["memory_per_rank"]
    md = training(runs["ddp"])["memory_per_rank"]
    print("\nbytes per rank: one process", m1, "\nDDP, 2 ranks", md, "\nFSDP, 2 ranks", mf)
    assert len(m1) == 1 and len(md) == 2 and len(mf) == 2
    assert md[0] == md[1] == m1[0]  # DDP: a full copy of everything on every rank
    for rank in mf:
        for kind in ("parameters", "gradients", "optimizer_state"):
            assert 0 < rank[kind] <= 0.6 * m1[0][kind], (kind, rank, m1)


def test_fsdp_output_is_the_same_model_and_loads(runs: dict[str, Path]) -> None:
    """The full state dict gathered on rank 0 is the model DDP trained (within fp32 noise), saved in the
    model's normal format: it loads and scores like the DDP model."""
    import torch

    from models.reward_model import RewardModel

    fsdp, tok = RewardModel.load(runs["fsdp"])
    ddp, _ = RewardModel.load(runs["ddp"])
    sd_f, sd_d = fsdp.state_dict(), ddp.state_dict()
    assert sd_f.keys() == sd_d.keys()
    assert max((sd_f[k] - sd_d[k]).abs().max().item() for k in sd_f) < 1e-4
    seqs = [tok("the quick GOOD")["input_ids"], tok("lazy dog BAD BAD")["input_ids"]]
    r_f = torch.tensor(fsdp.score_ids(seqs, tok.pad_token_id))
    r_d = torch.tensor(ddp.score_ids(seqs, tok.pad_token_id))
    assert torch.allclose(r_f, r_d, atol=1e-4)
    assert training(runs["fsdp"])["trainable_tensors_changed"] == training(runs["fsdp"])["trainable_tensors"] > 0
    # In the standard transformers format (issue 22's save), transformers itself scores it the same.
    arch = json.loads((runs["fsdp"] / "config.json").read_text()).get("architectures") or [""]
    if arch[0].endswith("ForSequenceClassification"):
        from transformers import AutoModelForSequenceClassification

        hf = AutoModelForSequenceClassification.from_pretrained(runs["fsdp"], dtype=torch.float32).eval()
        with torch.no_grad():
            r_hf = torch.tensor([hf(input_ids=torch.tensor([s])).logits[0, 0].item() for s in seqs])
        assert torch.allclose(r_hf, r_f, atol=1e-5), (r_hf, r_f)


def test_fsdp_halt_and_resume_is_exact(runs: dict[str, Path], llama_dir: Path, data: Path, tmp_path: Path) -> None:
    """Halted after step 5 with sharded (torch.distributed.checkpoint) checkpoints every 2 steps, then
    resumed from step 4: the same losses as the uninterrupted FSDP run."""
    out = tmp_path / "halted"
    args = train_args(llama_dir, data, out, "--sharding", "fsdp", "--save-every", "2")
    torchrun([*args, "--halt-after", "5"])
    assert not (out / "metrics.json").exists()
    ck = out / ".checkpoint"
    assert json.loads((ck / "state.json").read_text())["step"] == 4
    assert any((ck / "sharded").glob("*.distcp"))
    torchrun([*args, "--resume"])
    assert losses(out) == losses(runs["fsdp"])


# rank 1's training-loop clock jumps a day ahead after the loop starts; rank 0's is the real one
FAST_CLOCK_ON_RANK_1 = """
import os, sys, time, types
import models.train.loop as loop
if os.environ["RANK"] == "1":
    calls = [0]
    def fast() -> float:
        calls[0] += 1
        return time.time() + (86400.0 if calls[0] > 1 else 0.0)
    loop.time = types.SimpleNamespace(time=fast)
from service.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("sharding", ["ddp", "fsdp"])
def test_time_limit_is_one_decision_for_every_rank(tmp_path: Path, llama_dir: Path, data: Path, sharding: str) -> None:
    """--time-limit under torchrun when the ranks' clocks disagree (rank 1 past the limit after step 1,
    rank 0 an hour short of it): every rank stops after step 1 and the model is written. A rank deciding
    alone left the loop while the other ran the next step's collectives: gloo aborted ("collective
    mismatch") or the run hung."""
    script = tmp_path / "fast_clock.py"
    script.write_text(FAST_CLOCK_ON_RANK_1)
    out = tmp_path / "rm"
    torchrun(
        train_args(llama_dir, data, out, "--sharding", sharding, "--time-limit", "3600"),
        timeout=120,
        entry=(str(script),),
    )
    tr = training(out)
    assert tr["time_limited"] == {"seconds": 3600.0, "step": 1, "of_steps": 10}
    assert len(losses(out)) == 1


def test_refusals_name_what_does_not_combine(tmp_path: Path, llama_dir: Path, data: Path) -> None:
    """What runs outside the DDP/FSDP wrapper, or keeps whole tensors on one process, is refused before
    any process group is joined."""
    from models.train import config_from_args, train
    from service.cli import build_parser

    def refused(*extra: str) -> str:
        args = build_parser().parse_args(train_args(llama_dir, data, tmp_path / "x", "--sharding", "fsdp", *extra))
        with pytest.raises(ValueError) as e:
            train(config_from_args(args))
        return str(e.value)

    assert "--prefix-sharing on does not combine with --sharding fsdp" in refused("--prefix-sharing", "on")
    msg = refused("--method", "top-n", "--top-n", "1", "--cache-frozen", "on")
    assert "--cache-frozen on does not combine with --sharding fsdp" in msg and "gradients" in msg
    msg = refused("--early-stopping-patience", "2", "--eval-every", "2")
    assert "--early-stopping-patience does not combine with --sharding fsdp" in msg
    import torch.distributed as tdist

    assert not tdist.is_initialized()


@pytest.mark.parametrize(
    "method",
    [
        ["--method", "top-n", "--top-n", "1"],
        ["--method", "lora", "--lora-rank", "4", "--dtype", "bfloat16", "--gradient-checkpointing"],
    ],
    ids=["top-n", "lora-bf16-checkpointing"],
)
def test_methods_train_sharded(tmp_path: Path, llama_dir: Path, data: Path, method: list[str]) -> None:
    """top-N layers and LoRA (peft) train under FSDP on 2 ranks (LoRA in bf16 mixed precision with
    gradient checkpointing), with dev evaluation on every rank along the way; every trainable tensor
    moves, the frozen ones do not, and the shipped `trained/` tensors are written."""
    out = tmp_path / "rm"
    torchrun(train_args(llama_dir, data, out, "--sharding", "fsdp", "--eval-every", "3", *method))
    tr = training(out)
    assert tr["trainable_tensors_changed"] == tr["trainable_tensors"] > 0
    assert any("dev" in h for h in json.loads((out / "metrics.json").read_text())["history"])
    assert (out / "trained").is_dir()
    from models.reward_model import RewardModel

    model, _ = RewardModel.load(out)
    base, _ = RewardModel.from_backbone(llama_dir)
    sd, sd0 = model.body.state_dict(), base.body.state_dict()
    if method[1] == "top-n":
        import torch

        assert torch.equal(sd["layers.0.mlp.up_proj.weight"], sd0["layers.0.mlp.up_proj.weight"])  # frozen
        assert not torch.equal(sd["layers.1.mlp.up_proj.weight"], sd0["layers.1.mlp.up_proj.weight"])


def test_fsdp_on_one_process_matches_and_resumes(tmp_path: Path, llama_dir: Path, data: Path) -> None:
    """FSDP on a group of one (no torchrun): the losses of the plain process, and a halt + resume from
    its sharded checkpoint gives them again (quick, in this process)."""
    plain, fsdp, halted = tmp_path / "plain", tmp_path / "fsdp", tmp_path / "halted"
    assert cli(train_args(llama_dir, data, plain, "--grad-accum", "2")) == 0
    assert cli(train_args(llama_dir, data, fsdp, "--grad-accum", "2", "--sharding", "fsdp")) == 0
    a, b = losses(plain), losses(fsdp)
    assert max(abs(x - y) for x, y in zip(a, b, strict=True)) < 1e-5 and len(a) == len(b)
    args = train_args(llama_dir, data, halted, "--grad-accum", "2", "--sharding", "fsdp", "--save-every", "2")
    assert cli([*args, "--halt-after", "3"]) == 0
    assert cli([*args, "--resume"]) == 0
    assert losses(halted) == b
