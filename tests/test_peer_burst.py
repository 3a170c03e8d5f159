"""The lookups a burst's operations share (``aiomooncake.peer.burst.Shared``): one exposure per
storage while it covers the tensor and the plane still caches it. CPU tensors, a counting plane."""

from __future__ import annotations

import torch

from aiomooncake.core.regions import Region
from aiomooncake.peer.burst import Shared
from aiomooncake.planes.base import DataPlane


class Counting(DataPlane):
    """Exposes a storage whole (``per_tensor``: just the tensor's bytes), counting the calls."""

    exposes = True

    def __init__(self, per_tensor: bool = False) -> None:
        super().__init__()
        self.per_tensor = per_tensor
        self.acquired: list[Region] = []
        self.retained: list[Region] = []
        self.dropped: list[Region] = []  # trimmed meanwhile: retain() refuses them

    def acquire(self, t: torch.Tensor, pin: bool = False) -> Region:
        if self.per_tensor:
            r = Region(t.data_ptr(), t.nbytes, None)
        else:
            s = t.untyped_storage()
            r = Region(s.data_ptr(), s.nbytes(), None)
        self.acquired.append(r)
        return r

    def retain(self, r: Region) -> bool:
        if r in self.dropped:
            return False
        self.retained.append(r)
        return True


def test_views_of_one_storage_acquire_it_once() -> None:
    weights = torch.zeros(8, 1024)
    other = torch.zeros(16)
    plane, shared = Counting(), Shared()
    got = [shared.acquire(plane, weights[i]) for i in range(8)]
    assert len(plane.acquired) == 1 and got == [plane.acquired[0]] * 8
    assert plane.retained == [plane.acquired[0]] * 7, "each further user must be counted"
    assert shared.acquire(plane, other) is plane.acquired[1], "another storage is looked up anew"
    assert shared.acquire(Counting(), weights[0]) is not got[0], "planes do not share lookups"


def test_a_region_that_does_not_cover_the_tensor_is_looked_up_anew() -> None:
    weights = torch.zeros(4, 256)
    plane, shared = Counting(per_tensor=True), Shared()
    first = shared.acquire(plane, weights[0])
    assert shared.acquire(plane, weights[0]) is first and plane.retained == [first]
    second = shared.acquire(plane, weights[1])  # outside the first tensor's region
    assert second is not first and len(plane.acquired) == 2


def test_a_region_dropped_meanwhile_is_acquired_again() -> None:
    weights = torch.zeros(4, 256)
    plane, shared = Counting(), Shared()
    first = shared.acquire(plane, weights[0])
    plane.dropped.append(first)  # e.g. trimmed by another thread while the burst was handled
    again = shared.acquire(plane, weights[1])
    assert again is not first and len(plane.acquired) == 2 and plane.retained == []
    assert shared.acquire(plane, weights[2]) is again and plane.retained == [again]
