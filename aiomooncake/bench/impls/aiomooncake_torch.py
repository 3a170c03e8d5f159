"""``aiomooncake-torch``: aiomooncake's torch.distributed backend ``"aiomooncake"`` (registered by
``import aiomooncake.torch``), measured exactly like gloo and nccl (see ``_torchdist``)."""

from __future__ import annotations

import importlib

from ..common import MODES as ALL_MODES
from ..common import RankContext
from ._torchdist import run_backend

NAME = "aiomooncake-torch"
WORLD = 2
MODES = ALL_MODES


def available(device: str) -> str | None:
    try:
        importlib.import_module("aiomooncake.torch")
    except Exception as e:  # not written yet, or broken: skip, never crash the launcher
        return f"aiomooncake.torch does not import ({type(e).__name__}: {e})"
    import torch.distributed as dist

    if not dist.is_available():
        return "this torch build has no torch.distributed"
    if "aiomooncake" not in getattr(dist.Backend, "backend_list", ["aiomooncake"]):
        return "importing aiomooncake.torch did not register a backend named 'aiomooncake'"
    return None


def child_env(device: str) -> dict[str, str]:
    return {}


def run(ctx: RankContext) -> None:
    importlib.import_module("aiomooncake.torch")  # registers the backend

    run_backend(ctx, "aiomooncake")
