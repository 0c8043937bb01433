"""torch.distributed set-up for the loop: torchrun env, gloo on CPU / NCCL on GPU, small helpers."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.nn.functional import all_gather

__all__ = ["DistInfo", "init_distributed", "is_dist", "rank", "world_size", "all_reduce_mean",
           "all_reduce_sum", "gather_with_grad", "barrier"]


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT);
    a single process without those variables (or an already initialised group) is used as is.
    device: "auto" (cuda if available) | "cpu" | "cuda"."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("nccl" if device == "cuda" else "gloo")
    r, w = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    local = int(os.environ.get("LOCAL_RANK", r if device == "cuda" else 0))
    if device == "cuda":
        torch.cuda.set_device(local % torch.cuda.device_count())
        dev = torch.device("cuda", local % torch.cuda.device_count())
    else:
        dev = torch.device("cpu")
    return DistInfo(r, w, local, dev)


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_dist() else 0


def world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    if is_dist():
        x = x.clone()
        dist.all_reduce(x)
    return x


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    return all_reduce_sum(x) / world_size()


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """[b, ...] on every rank -> [world*b, ...] in rank order; the gradient flows back to every
    rank's slice (``torch.distributed.nn.functional.all_gather``). Identity on one process."""
    if not is_dist():
        return x
    return torch.cat(all_gather(x), 0)


def barrier() -> None:
    if is_dist():
        dist.barrier()
