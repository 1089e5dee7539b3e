"""One process or several under torchrun: rank, device, the DDP or FSDP2 wrapper, global sums of
what the loop logs, memory per rank, and the end of the collective part.

Sharding is applied to the model once (`fully_shard` per decoder layer, then the root); the loop only
learns of ranks through `all_sum` (torchtitan's habit). Under FSDP every parameter is a DTensor whose
local shard lives on this rank.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as tdist
from torch import nn

log = logging.getLogger(__name__)

SHARDINGS = ("ddp", "fsdp")


def dist_info() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) when not distributed."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0"))


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda was asked but no CUDA device is available")
        return torch.device("cuda", local_rank)
    return torch.device(name)


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of `t`: the local shard of a DTensor (FSDP), else `t` itself."""
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


def memory_per_rank(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes this rank holds of the parameters, the gradients and the optimizer state (local shards
    under FSDP, whole tensors otherwise). Activations and temporary all-gathered layers are not counted."""
    params = sum(local_tensor(p).numel() * p.element_size() for p in model.parameters())
    grads = sum(local_tensor(p.grad).numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
    state = 0
    for s in opt.state.values():
        for v in s.values():
            if isinstance(v, torch.Tensor):
                state += local_tensor(v).numel() * v.element_size()
    return {"parameters": params, "gradients": grads, "optimizer_state": state}


@dataclass
class Distributed:
    rank: int
    world: int
    local_rank: int
    device: torch.device
    sharding: str = "ddp"  # ddp | fsdp; what `wrap` does with several processes (fsdp also on one)

    @classmethod
    def start(cls, device: str, sharding: str = "ddp") -> Distributed:
        """Read torchrun's environment and, with more than one process (or FSDP), join the process group."""
        if sharding not in SHARDINGS:
            raise ValueError(f"--sharding is {sharding!r}; use one of {', '.join(SHARDINGS)}")
        rank, world, local_rank = dist_info()
        d = cls(rank, world, local_rank, resolve_device(device, local_rank), sharding)
        if d.device.type == "cuda":
            torch.cuda.set_device(d.device)
        if d.collective and not tdist.is_initialized():
            if world == 1:  # FSDP on one process (no torchrun): a group of one
                os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
                os.environ.setdefault("MASTER_PORT", str(_free_port()))
                os.environ.setdefault("RANK", "0")
                os.environ.setdefault("WORLD_SIZE", "1")
            tdist.init_process_group("nccl" if d.device.type == "cuda" else "gloo")
        return d

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def fsdp(self) -> bool:
        return self.sharding == "fsdp"

    @property
    def collective(self) -> bool:
        """True when a process group exists: several processes, or FSDP on one."""
        return self.world > 1 or self.fsdp

    def wrap(self, model: nn.Module, layers: nn.ModuleList, head: nn.Module, mixed_bf16: bool) -> nn.Module:
        """The module to run forward passes through. One process: `model`. DDP: a wrapper over it.
        FSDP2: `model` itself, sharded in place (each of `layers`, the `head`, then the root), the
        parameters cast to bf16 for compute with fp32 gradient reduction when `mixed_bf16` (the head
        stays in float32, as the model reads rewards out at full precision)."""
        if self.fsdp:
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

            mesh = init_device_mesh(self.device.type, (self.world,))
            mp = (
                MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
                if mixed_bf16
                else MixedPrecisionPolicy()
            )
            for layer in layers:
                fully_shard(layer, mesh=mesh, mp_policy=mp)
            fully_shard(head, mesh=mesh, mp_policy=MixedPrecisionPolicy())
            fully_shard(model, mesh=mesh, mp_policy=mp)
            return model
        if self.world == 1:
            return model
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(model, device_ids=[self.local_rank] if self.device.type == "cuda" else None)

    def all_sum(self, values: list[float]) -> list[float]:
        """Element-wise sums of `values` over every rank (float64; `values` itself with one process)."""
        if not self.collective or self.world == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        tdist.all_reduce(t)
        return t.tolist()

    def any_rank(self, flag: bool) -> bool:
        """True when `flag` is true on at least one rank (a collective: every rank must call it at the
        same point); `flag` itself with one process. For decisions that must be the same on every rank
        but rest on local state, such as a wall clock."""
        return self.all_sum([float(flag)])[0] > 0

    def barrier(self) -> None:
        if self.collective:
            tdist.barrier()

    def end_training(self) -> bool:
        """Wait for every rank; True on the rank that goes on to evaluate and save (the others leave)."""
        if self.collective:
            if not self.is_main:
                self.leave()
                return False
            tdist.barrier()  # meets the others' barrier in `leave`
        return self.is_main

    def leave(self) -> None:
        """Every rank, done with collectives: wait for the others, then leave the group.

        Why the barrier: gloo's worker threads release a finished collective's tensors a moment after
        the caller's `wait()` returns. A rank that leaves and exits at once can reach interpreter
        shutdown inside that moment; the worker then needs the GIL of a finalizing interpreter and the
        process aborts (SIGABRT, "terminate called without an active exception", in
        `ProcessGroupGloo::AsyncWork::~AsyncWork`; seen in a core dump of `--halt-after` under load, see
        pytorch/pytorch#179291). FSDP2 keeps the group's threads alive past `destroy_process_group`, so
        leaving is not enough; a barrier first makes every earlier collective finish on every rank, which
        closes that window in practice (no test can prove it shut)."""
        if self.collective and tdist.is_initialized():
            tdist.barrier()
            tdist.destroy_process_group()

    def close(self) -> None:
        """Leave the group without waiting (after an error, when a peer may never reach a barrier)."""
        if self.collective and tdist.is_initialized():
            tdist.destroy_process_group()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def broadcast_object(obj: Any, dist: Distributed) -> Any:
    """`obj` from rank 0 on every rank."""
    if not dist.collective or dist.world == 1:
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src=0)
    return box[0]
