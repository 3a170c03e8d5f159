"""Quarantine: receive memory a dead peer may still write into is held, not freed.

When the control connection dies while the remote may still be writing into a receive's buffer (its
CTS went out, no DONE or ABORT came back), bytes its engine already had in flight, or that a frozen
process sends when it wakes, may still land. That memory (its registration and tensors) is kept for
``Peer.quarantine_s`` so they land in memory nobody reuses, never in memory freed and handed out
again. Entries are pruned when a receive is quarantined and when a peer is created or closed, so
nothing outlives its expiry by more than the time to the next of those (no timer that would hold
tensors past its loop).
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any

from ..core.regions import Region
from ..planes.base import DataPlane

# (expiry, (engine, region), tensors): memory a dead peer may still write into. Pruned when a
# receive is quarantined and when a peer is created or closed, so nothing here outlives its expiry
# by more than the time to the next of those (no timer that would hold tensors past its loop).
_held: deque[tuple[float, tuple[DataPlane, Region], tuple[Any, ...]]] = deque()


def prune() -> None:
    if not _held:
        return
    now = time.monotonic()
    for entry in [e for e in _held if e[0] <= now]:  # expiries differ if quarantine_s changed
        _held.remove(entry)
        eng, region = entry[1]
        eng.release(region)


def quarantined_bytes() -> int:
    """Bytes of receive memory currently held because a dead peer may still write into it."""
    return sum(t[0].nbytes for _, _, t in _held if t[0] is not None)




def hold(seconds: float, region: tuple[DataPlane, Region], tensors: tuple[Any, ...]) -> None:
    """Keep ``region`` registered and ``tensors`` alive for ``seconds``."""
    prune()
    _held.append((time.monotonic() + seconds, region, tensors))
