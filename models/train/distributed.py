"""One process or several under torchrun: rank, device, the DDP wrapper, and the end of the
collective part (after it only rank 0 evaluates and saves)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as tdist
from torch import nn

T = TypeVar("T")


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


@dataclass
class Distributed:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @classmethod
    def start(cls, device: str) -> Distributed:
        """Read torchrun's environment and, with more than one process, join the process group."""
        rank, world, local_rank = dist_info()
        d = cls(rank, world, local_rank, resolve_device(device, local_rank))
        if world > 1:
            tdist.init_process_group("nccl" if d.device.type == "cuda" else "gloo")
        return d

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, batches: list[T]) -> list[T]:
        """This rank's batches. Every rank takes the same number (DDP steps in lockstep); a remainder
        smaller than the world size is left out."""
        return batches[self.rank :: self.world][: len(batches) // self.world] if self.world > 1 else batches

    def wrap(self, model: nn.Module) -> nn.Module:
        """The module to run forward passes through: DDP over `model` with several processes."""
        if self.world == 1:
            return model
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(model, device_ids=[self.local_rank] if self.device.type == "cuda" else None)

    def end_training(self) -> bool:
        """Wait for every rank; True on the rank that goes on to evaluate and save (the others leave)."""
        if self.world > 1:
            tdist.barrier()
            if not self.is_main:
                tdist.destroy_process_group()
        return self.is_main

    def close(self) -> None:
        if self.world > 1:
            tdist.destroy_process_group()
