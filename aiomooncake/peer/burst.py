"""What the operations of one burst look up once: the exposure of the allocation behind a tensor.

A burst (the posts of a :class:`~aiomooncake.Batch` or a ``batch_isend_irecv`` in one loop turn, or
the messages of one socket read) mostly moves views of a few large tensors (an EPLB layer's
``[experts, ...]`` weights). Each operation looked up the allocation behind its tensor in the plane
(the storage's liveness, the plane's lock and cache: in a cProfile of the 64-expert exchange on the
H200, a fifth of a pull-offering send's post and two fifths of a receive's CTS); a :class:`Shared`
looks up each storage once.
"""

from __future__ import annotations

import torch

from ..core.regions import Region
from ..planes.base import DataPlane


class Shared:
    """The lookups the operations of one burst share (see the module docstring), for as long as
    the burst is being posted or its frames handled. The tensors it looked up stay alive (it holds
    them), so their storages keep their addresses; a region the plane dropped meanwhile (trimmed
    by another thread) is looked up again."""

    __slots__ = ("regions",)

    def __init__(self) -> None:
        # (id(plane), storage address) -> the region, and a tensor that keeps the storage alive
        # meanwhile (so that its address cannot come back as another allocation's)
        self.regions: dict[tuple[int, int], tuple[Region, torch.Tensor]] = {}

    def acquire(self, plane: DataPlane, t: torch.Tensor) -> Region:
        """``plane.acquire(t)``, or one more user of the region an earlier tensor of the same
        storage acquired, if that region covers ``t`` (a per-tensor region need not)."""
        if not plane.exposes:
            return plane.acquire(t)
        key = (id(plane), t.untyped_storage().data_ptr())
        hit = self.regions.get(key)
        if hit is not None and hit[0].covers(t.data_ptr(), t.nbytes) and plane.retain(hit[0]):
            return hit[0]
        r = plane.acquire(t)
        self.regions[key] = (r, t)
        return r
