"""The implementations the benchmark compares, one module each.

Every module provides ``NAME``, ``WORLD`` (processes it needs: 2, or 1 for ``copy``), ``MODES``,
``available(device) -> str | None`` (None, or why it must be skipped; cheap and safe to call in the
launcher), ``child_env(device) -> dict`` (environment its processes need before they start) and
``run(ctx)``, which each rank calls to measure ``ctx.points`` in order.
"""

from __future__ import annotations

import importlib
from typing import Protocol, cast

from ..common import RankContext

# name -> module, in the order the table shows them
IMPLS: dict[str, str] = {
    "aiomooncake": "aiomooncake_async",
    "aiomooncake-torch": "aiomooncake_torch",
    "te-raw": "te_raw",
    "gloo": "gloo",
    "nccl": "nccl",
    "mooncake-pg": "mooncake_pg",
    "copy": "copy",
}
OURS = ("aiomooncake", "aiomooncake-torch")
REFERENCES = ("te-raw", "gloo", "copy")


class Impl(Protocol):
    NAME: str
    WORLD: int
    MODES: tuple[str, ...]

    def available(self, device: str) -> str | None: ...

    def child_env(self, device: str) -> dict[str, str]: ...

    def run(self, ctx: RankContext) -> None: ...


def load(name: str) -> Impl:
    if name not in IMPLS:
        raise KeyError(f"unknown implementation {name!r}; choose from {', '.join(IMPLS)}")
    return cast(Impl, importlib.import_module(f"{__name__}.{IMPLS[name]}"))
