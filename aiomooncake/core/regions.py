"""Bookkeeping of memory regions registered with the engine (pure; the engine adapter does the I/O).

The engine refuses a registration that overlaps one it already holds, and registering costs
milliseconds for GPU memory, so registrations are cached per *allocation* (a CPU tensor's storage,
a segment of torch's CUDA caching allocator), never per tensor. A cached region whose allocation
died and whose addresses were reused by a new allocation is stale: it is evicted before the new one
is registered. Regions in use by in-flight transfers are never evicted.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(eq=False, slots=True)
class Region:
    base: int
    size: int
    ident: object  # identity of the allocation (e.g. a CUDA buffer id); equal idents = same memory
    alive: Callable[[], bool] = field(default=lambda: True)
    pinned: int = 0  # user registrations holding it
    inflight: int = 0  # transfers using it right now
    handle: object = None  # the adapter's own data (e.g. what keeps the allocation identifiable)

    @property
    def end(self) -> int:
        return self.base + self.size

    def covers(self, base: int, size: int) -> bool:
        return self.base <= base and base + size <= self.end


class RegionCache:
    __slots__ = ("_bases", "_regions")

    def __init__(self) -> None:
        self._bases: list[int] = []  # sorted bases; regions never overlap
        self._regions: dict[int, Region] = {}

    def find(self, base: int, size: int, ident: object) -> Region | None:
        """The live cached region for exactly this allocation, if any."""
        r = self._regions.get(base)
        if r is not None and r.size == size and r.ident == ident and r.alive():
            return r
        return None

    def holds(self, region: Region) -> bool:
        """Whether ``region`` itself is cached (not evicted or trimmed since it was found)."""
        return self._regions.get(region.base) is region

    def overlapping(self, base: int, size: int) -> list[Region]:
        """Cached regions that overlap ``[base, base + size)``."""
        end = base + max(size, 1)
        i = bisect.bisect_right(self._bases, base) - 1
        out: list[Region] = []
        i = max(i, 0)
        while i < len(self._bases) and self._bases[i] < end:
            r = self._regions[self._bases[i]]
            if r.end > base or r.base >= base:  # a zero-size region still occupies its base
                out.append(r)
            i += 1
        return out

    def add(self, region: Region) -> None:
        if self.overlapping(region.base, region.size):
            raise ValueError("regions in the cache must not overlap; evict the stale ones first")
        bisect.insort(self._bases, region.base)
        self._regions[region.base] = region

    def remove(self, region: Region) -> None:
        if self._regions.get(region.base) is region:
            del self._regions[region.base]
            self._bases.remove(region.base)

    def __len__(self) -> int:
        return len(self._regions)

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(list(self._regions.values()))
