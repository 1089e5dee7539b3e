"""Checkpoints for `--resume`: trainable tensors, optimizer and scheduler state, RNG, step and history,
written to OUT/.checkpoint atomically (a temporary folder renamed over the old one)."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from models.train.config import TrainConfig

CHECKPOINT_DIR = ".checkpoint"

# The recipe fields that decide which micro-batches make each optimizer step (with world x grad_accum):
# a resumed run must agree on them, or it silently continues a different model.
STEP_SEQUENCE_FIELDS = (
    "data",
    "format",
    "skip_bad",
    "seed",
    "batch_tokens",
    "max_length",
    "epochs",
    "max_steps",
    "train_max",
    "dev_fraction",
    "balance_subsets",
)


def check_resume(state: dict[str, Any], cfg: TrainConfig, world: int, ck: Path) -> None:
    """Refuse (ValueError) to resume the checkpoint at `ck`, whose state.json is `state`, with a run
    whose step sequence differs: micro-batches per optimizer step (world x grad_accum; another split
    of the same product is allowed, as the loop gives the same steps at any world size) and each of
    `STEP_SEQUENCE_FIELDS`. `world`: this run's number of processes. A checkpoint written before the
    world size was recorded is checked on grad_accum alone."""
    saved = state.get("config") or {}
    problems = []
    saved_world = state.get("world")
    saved_accum = int(saved.get("grad_accum", 1))
    if saved_world is None:
        if saved_accum != cfg.grad_accum:
            problems.append(f"--grad-accum was {saved_accum}, now {cfg.grad_accum}")
    elif int(saved_world) * saved_accum != world * cfg.grad_accum:
        problems.append(
            f"micro-batches per optimizer step (world size x --grad-accum) were {saved_world} x {saved_accum} = "
            f"{int(saved_world) * saved_accum}, now {world} x {cfg.grad_accum} = {world * cfg.grad_accum}"
        )
    now = asdict(cfg)
    for name in STEP_SEQUENCE_FIELDS:
        if name not in saved:
            continue
        old, new = saved[name], now[name]
        if name == "data":
            old, new = [str(Path(p).resolve()) for p in old], [str(Path(p).resolve()) for p in new]
        if old != new:
            problems.append(f"--{name.replace('_', '-')} was {saved[name]!r}, now {now[name]!r}")
    if problems:
        raise ValueError(
            f"--resume: {ck} was written by a run with another step sequence: " + "; ".join(problems) + ". "
            "Resume with the checkpoint's values (any world size x --grad-accum with the same product), "
            "or start afresh without --resume (or with another --out)"
        )


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that train, detached float32 copies on the CPU (copies even where the parameter
    already is one: a kept state must not follow later steps)."""
    return {
        n: p.detach().to("cpu", torch.float32, copy=True).contiguous()
        for n, p in model.named_parameters()
        if p.requires_grad
    }


def load_trainable_state(model: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """Copy `state` (from `trainable_state`) into the model's parameters; `what` names the source in errors."""
    params = dict(model.named_parameters())
    missing = [n for n in state if n not in params]
    if missing:
        raise ValueError(f"{what} parameters {missing[:3]} do not exist in this model (other --method?)")
    with torch.no_grad():
        for n, t in state.items():
            params[n].copy_(t)


def save_checkpoint(
    out: Path,
    model: nn.Module,
    opt: torch.optim.Optimizer,
    sched: Any,
    step: int,
    history: list[dict[str, Any]],
    cfg: TrainConfig,
    extra: tuple[dict[str, Any], dict[str, torch.Tensor]] | None = None,
    world: int = 1,
) -> None:
    """`extra`: (JSON-able state, tensors) of another part of the run (early stopping's best weights);
    `world`: the run's number of processes (recorded for `check_resume`)."""
    ck = out / CHECKPOINT_DIR
    tmp = out / (CHECKPOINT_DIR + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_file(trainable_state(model), str(tmp / "trainable.safetensors"))
    torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict()}, tmp / "optimizer.pt")
    save_file({"cpu": torch.get_rng_state()}, str(tmp / "rng.safetensors"))
    state = {
        "step": step,
        "history": history,
        "config": asdict(cfg),
        "world": world,
        "extra": extra[0] if extra else None,
    }
    if extra and extra[1]:
        save_file(extra[1], str(tmp / "extra.safetensors"))
    (tmp / "state.json").write_text(json.dumps(state))
    if ck.exists():
        shutil.rmtree(ck)
    os.replace(tmp, ck)


def read_checkpoint_state(out: Path) -> dict[str, Any]:
    """OUT/.checkpoint/state.json; FileNotFoundError naming the folder when there is none."""
    ck = out / CHECKPOINT_DIR
    if not (ck / "state.json").is_file():
        raise FileNotFoundError(f"--resume: no checkpoint at {ck}")
    return dict(json.loads((ck / "state.json").read_text()))


def load_checkpoint(
    out: Path, model: nn.Module, opt: torch.optim.Optimizer, sched: Any
) -> tuple[int, list[dict[str, Any]]]:
    """Restore what `save_checkpoint` wrote; returns (step, history)."""
    ck = out / CHECKPOINT_DIR
    if not (ck / "state.json").is_file():
        raise FileNotFoundError(f"--resume: no checkpoint at {ck}")
    state = json.loads((ck / "state.json").read_text())
    if state.get("sharded"):
        raise ValueError(f"--resume: {ck} holds FSDP shards; resume it with --sharding fsdp on as many ranks")
    load_trainable_state(model, load_file(str(ck / "trainable.safetensors")), "--resume: checkpoint")
    blob = torch.load(ck / "optimizer.pt", weights_only=True, map_location="cpu")
    opt.load_state_dict(blob["optimizer"])
    sched.load_state_dict(blob["scheduler"])
    torch.set_rng_state(load_file(str(ck / "rng.safetensors"))["cpu"])
    return int(state["step"]), list(state["history"])


def load_checkpoint_extra(out: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]] | None:
    """The `extra` that `save_checkpoint` was given, or None."""
    ck = out / CHECKPOINT_DIR
    state = json.loads((ck / "state.json").read_text()).get("extra")
    if state is None:
        return None
    tensors = load_file(str(ck / "extra.safetensors")) if (ck / "extra.safetensors").is_file() else {}
    return state, tensors


def remove_checkpoint(out: Path) -> None:
    ck = out / CHECKPOINT_DIR
    if ck.exists():
        shutil.rmtree(ck)


SHARDED_DIR = "sharded"  # inside the checkpoint folder: torch.distributed.checkpoint's files, one per rank


def save_sharded_checkpoint(
    out: Path,
    model: nn.Module,
    opt: torch.optim.Optimizer,
    sched: Any,
    step: int,
    history: list[dict[str, Any]],
    cfg: TrainConfig,
    dist: Any,
) -> None:
    """Under FSDP, on every rank: the trainable parameters' and the optimizer's shards written with
    torch.distributed.checkpoint (each rank writes its own), the scheduler, step and history by rank
    0; the folder replaces the old checkpoint once every rank has written (atomic, like
    `save_checkpoint`). `dist`: the run's `Distributed`."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    ck = out / CHECKPOINT_DIR
    tmp = out / (CHECKPOINT_DIR + ".tmp")
    if dist.is_main:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    dist.barrier()
    model_sd, optim_sd = get_state_dict(model, opt, options=StateDictOptions(ignore_frozen_params=True))
    dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=str(tmp / SHARDED_DIR))
    if dist.is_main:
        torch.save({"scheduler": sched.state_dict()}, tmp / "scheduler.pt")
        save_file({"cpu": torch.get_rng_state()}, str(tmp / "rng.safetensors"))
        state = {
            "step": step,
            "history": history,
            "config": asdict(cfg),
            "world": dist.world,
            "extra": None,
            "sharded": True,
        }
        (tmp / "state.json").write_text(json.dumps(state))
    dist.barrier()
    if dist.is_main:
        if ck.exists():
            shutil.rmtree(ck)
        os.replace(tmp, ck)
    dist.barrier()


def load_sharded_checkpoint(
    out: Path, model: nn.Module, opt: torch.optim.Optimizer, sched: Any
) -> tuple[int, list[dict[str, Any]]]:
    """Restore what `save_sharded_checkpoint` wrote, on every rank of the same world size; returns
    (step, history)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

    ck = out / CHECKPOINT_DIR
    if not (ck / "state.json").is_file():
        raise FileNotFoundError(f"--resume: no checkpoint at {ck}")
    state = json.loads((ck / "state.json").read_text())
    if not state.get("sharded"):
        raise ValueError(f"--resume: {ck} was written without --sharding fsdp; resume it the way it was run")
    model_sd, optim_sd = get_state_dict(model, opt, options=StateDictOptions(ignore_frozen_params=True))
    # every key of these dicts is read from the checkpoint (dcp.load fails on one it lacks); the frozen
    # parameters are not in them, hence strict=False when they go back into the model
    dcp.load({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=str(ck / SHARDED_DIR))  # in place
    opts = StateDictOptions(ignore_frozen_params=True, strict=False)
    set_state_dict(model, opt, model_state_dict=model_sd, optim_state_dict=optim_sd, options=opts)
    sched.load_state_dict(torch.load(ck / "scheduler.pt", weights_only=True)["scheduler"])
    torch.set_rng_state(load_file(str(ck / "rng.safetensors"))["cpu"])
    return int(state["step"]), list(state["history"])
