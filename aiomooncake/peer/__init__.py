"""The peer: one connected remote process, and the handles of operations posted on it.

* :mod:`.peer` -- :class:`Peer`, the public API and the glue between the protocol core and the data
  planes;
* :mod:`.pending` -- :class:`PendingSend` / :class:`PendingRecv`, what posting returns;
* :mod:`.staging` -- CUDA copies the peer queues itself (inline sends, host staging);
* :mod:`.writable` -- whether a receive's memory may be written at all;
* :mod:`.quarantine` -- memory a dead peer may still write into, held instead of freed.
"""

from __future__ import annotations

from .peer import Peer
from .pending import PendingRecv, PendingSend
from .quarantine import quarantined_bytes

__all__ = ["Peer", "PendingRecv", "PendingSend", "quarantined_bytes"]
