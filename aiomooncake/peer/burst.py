"""What the operations of one burst look up once: the state of a stream, the exposure of an
allocation.

A burst (the posts of a :class:`~aiomooncake.Batch` or a ``batch_isend_irecv`` in one loop turn,
queued and posted together at the end of it) mostly moves views of a few large tensors (an EPLB
layer's ``[experts, ...]`` weights) from one stream. Posted one by one, each operation asked the
device whether its stream was idle (~1 us) and looked up the allocation behind its tensor (~3 us:
the storage's liveness, the plane's lock and cache); 512 of them per exchange, on both sides, were
a quarter of the host time of a 64-expert exchange on the H200. A :class:`Shared` asks once per
stream and once per storage.
"""

from __future__ import annotations

from typing import Any

import torch

from ..core.regions import Region
from ..planes.base import DataPlane
from ..tensors import SETTLED, ReadyMark, current_stream, record_ready


class Shared:
    """The lookups the operations of one burst share (see the module docstring), for as long as
    the burst is being posted or its frames handled, in one go on the loop: nothing of the
    caller's runs in between, and the tensors it looked up stay alive (it holds them)."""

    __slots__ = ("idle", "regions")

    def __init__(self) -> None:
        self.idle: dict[int, Any] = {}  # id(stream) -> the stream, found idle
        # (id(plane), storage address) -> the region, and a tensor that keeps the storage alive
        # meanwhile (so that its address cannot come back as another allocation's)
        self.regions: dict[tuple[int, int], tuple[Region, torch.Tensor]] = {}

    def mark(self, t: torch.Tensor, stream: Any = None) -> ReadyMark | None:
        """:func:`~aiomooncake.tensors.record_ready`, asking the device only once per idle stream:
        once found idle, a stream stays so while the burst is posted."""
        idx = t.get_device()
        if idx < 0:
            return None
        st = current_stream(idx) if stream is None else stream
        if id(st) in self.idle:
            return SETTLED
        ev = record_ready(t, st)
        if ev is SETTLED:
            self.idle[id(st)] = st  # (the reference keeps the id from being reused meanwhile)
        return ev

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
