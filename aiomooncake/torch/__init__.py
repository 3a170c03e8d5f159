"""torch integration: the ``torch.distributed`` backend ``"aiomooncake"`` and a small sync facade.

Importing this module registers the backend for cpu and cuda tensors::

    import aiomooncake.torch
    dist.init_process_group("aiomooncake")                 # torchrun / env:// / tcp:// / store=...
    dist.init_process_group("cpu:gloo,cuda:aiomooncake")   # collectives on gloo, P2P on aiomooncake
    reqs = dist.batch_isend_irecv([dist.P2POp(dist.isend, w, dst), dist.P2POp(dist.irecv, buf, src)])
    for r in reqs:
        r.wait()

The group serves ``send``/``recv``/``isend``/``irecv`` (also from any source), ``batch_isend_irecv`` and
``barrier`` with gloo's semantics (byte-level messages, non-negative tags, contiguous dense tensors),
bounded by ``init_process_group(timeout=...)``. ``pg_options`` may be an :class:`aiomooncake.Options`
or a dict of its fields plus ``"host"`` (the address to listen on; default ``$AIOMOONCAKE_HOST`` or
the interface that reaches the store's master).

Without ``init_process_group`` (scripts, tests), the sync facade does the same with plain calls::

    from aiomooncake.torch import init_group
    with init_group(rank, world_size, master_addr="10.0.0.1", master_port=29500) as g:
        g.send(tensor, dst=1, tag=7)          # blocks until the bytes are in rank 1's tensor
        src = g.recv(buf, src=None)           # any source; returns the sender's rank
        works = g.batch_isend_irecv([("isend", w, 1), ("irecv", buf, 0)])
        for w in works:
            w.wait()

One asyncio event loop per process runs the async core for every group: ``isend``/``irecv`` post on
the calling thread, ``wait()`` runs the loop on the waiting thread, and a background thread runs it
while nobody waits, so no operation costs a thread hand-off. See docs/torch.md, "Threading".
"""

from __future__ import annotations

import torch.distributed as dist

from .backend import BACKEND_NAME, ProcessGroupAiomooncake, create_process_group
from .errors import BackendError, InvalidArgument, OpTimeout
from .facade import P2PGroup, init_group
from .loop import LoopThread
from .work import Work


def register() -> None:
    """Register the backend name with torch (done on import; idempotent)."""
    if BACKEND_NAME.upper() in dist.Backend._plugins:
        return
    dist.Backend.register_backend(BACKEND_NAME, create_process_group, extended_api=True,
                                  devices=["cpu", "cuda"])


register()

__all__ = [
    "BACKEND_NAME",
    "BackendError",
    "InvalidArgument",
    "LoopThread",
    "OpTimeout",
    "P2PGroup",
    "ProcessGroupAiomooncake",
    "Work",
    "create_process_group",
    "init_group",
    "register",
]
