"""Data planes: what moves a rendezvous message's bytes, behind one interface (:mod:`.base`).

* :mod:`.te` -- the Mooncake Transfer Engine (TCP, RDMA, intra-node NVLink); the only module that
  imports ``mooncake``;
* :mod:`.shm` -- same-host CPU tensors, one kernel copy (``process_vm_readv``);
* :mod:`.poller` -- completion by polling, one driver per event loop;
* :mod:`.negotiate` -- which plane each link takes, set up during the handshake.
"""

from __future__ import annotations

import torch

from .base import Announcement, DataPlane, Job, Stats, existing, register, unregister


def empty_cache() -> int:
    """Unregister cached GPU memory (nothing in flight, nothing pinned), then
    ``torch.cuda.empty_cache()``. Use it instead of torch's: once torch gives a segment back to the
    driver, a new allocation may reuse its addresses at another base, and the Transfer Engine can
    then no longer remove the old registration. Returns how many registrations were dropped."""
    n = sum(p.trim() for p in existing())
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return n


__all__ = ["Announcement", "DataPlane", "Job", "Stats", "empty_cache", "existing", "register", "unregister"]
