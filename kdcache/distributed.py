"""torch.distributed helpers shared by both stages (launched by torchrun, or a single process)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def ranks_from_env() -> Ranks:
    return Ranks(
        rank=int(os.environ.get("RANK", "0")),
        world=int(os.environ.get("WORLD_SIZE", "1")),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
    )


def init(device: torch.device | None = None) -> Ranks:
    """Join the process group when launched with more than one rank (NCCL on CUDA, else gloo)."""
    ranks = ranks_from_env()
    if ranks.world > 1 and not dist.is_initialized():
        backend = "nccl" if device is not None and torch.device(device).type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
    return ranks


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def broadcast_object(value, src: int = 0):
    """Send a picklable value from ``src`` to every rank (identity on a single process)."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    box = [value]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def resolve_device(requested: str, ranks: Ranks) -> torch.device:
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda":
        return torch.device("cuda", ranks.local_rank)
    return torch.device(requested)
