"""``gloo``: torch.distributed's CPU backend, point-to-point over TCP (see ``_torchdist``)."""

from __future__ import annotations

from ..common import MODES as ALL_MODES
from ..common import RankContext
from ._torchdist import run_backend

NAME = "gloo"
WORLD = 2
MODES = ALL_MODES


def available(device: str) -> str | None:
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        return "this torch build has no gloo backend"
    if device != "cpu":
        return "gloo send/recv only takes CPU tensors"
    return None


def child_env(device: str) -> dict[str, str]:
    return {}


def run(ctx: RankContext) -> None:
    run_backend(ctx, "gloo")
