"""``nccl``: torch.distributed's NCCL backend between two GPUs of this host (see ``_torchdist``)."""

from __future__ import annotations

import torch

from ..common import MODES as ALL_MODES
from ..common import RankContext
from ._torchdist import run_backend

NAME = "nccl"
WORLD = 2
MODES = ALL_MODES


def available(device: str) -> str | None:
    import torch.distributed as dist

    if device != "cuda":
        return "nccl needs --device cuda"
    if not dist.is_available() or not dist.is_nccl_available():
        return "this torch build has no NCCL backend"
    n = torch.cuda.device_count()
    if n < 2:
        return f"nccl needs 2 GPUs, this host has {n}"
    return None


def child_env(device: str) -> dict[str, str]:
    return {}


def run(ctx: RankContext) -> None:
    run_backend(ctx, "nccl")
