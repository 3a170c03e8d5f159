"""A small sync facade for scripts that do not call ``init_process_group``.

:func:`init_group` builds the same :class:`~aiomooncake.torch.backend.ProcessGroupAiomooncake` that
``init_process_group("aiomooncake")`` would (rendezvous through a TCPStore on the master, or a store
you pass), and :class:`P2PGroup` gives it plain-Python calls: tensors instead of lists, keyword tags,
``recv`` returning the sender. It does not touch torch.distributed's global state, so it can live
beside a default group (e.g. NCCL for collectives) or in a process that has none.
"""

from __future__ import annotations

import datetime
import functools
import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch._C._distributed_c10d import PrefixStore, Store, TCPStore

from .backend import DEFAULT_TIMEOUT, ProcessGroupAiomooncake, post_batch
from .errors import InvalidArgument
from .work import Work

_OP_NAMES = {"isend": "isend", "send": "isend", "irecv": "irecv", "recv": "irecv"}


def _env_int(name: str) -> int | None:
    v = os.environ.get(name)
    return int(v) if v not in (None, "") else None


class P2PGroup:
    """Point-to-point operations among ``size`` processes; create with :func:`init_group`.

    Blocking calls (``send``, ``recv``, ``barrier``) raise on failure; ``isend``/``irecv`` return a
    :class:`~aiomooncake.torch.work.Work` at once. Use as a context manager, or call :meth:`close`."""

    def __init__(self, process_group: ProcessGroupAiomooncake, store: Store | None = None) -> None:
        self.process_group = process_group
        self._store = store  # rank 0 serves the TCPStore: keep it alive as long as the group

    @property
    def rank(self) -> int:
        return self.process_group.rank()

    @property
    def size(self) -> int:
        return self.process_group.size()

    # ------------------------------------------------------------------ async
    def isend(self, tensor: torch.Tensor, dst: int, tag: int = 0) -> Work:
        """Start sending ``tensor`` to ``dst``; don't modify it before the Work completes."""
        return self.process_group.send([_real(tensor)], dst, tag)

    def irecv(self, tensor: torch.Tensor, src: int | None = None, tag: int = 0) -> Work:
        """Start receiving into ``tensor`` from ``src`` (None: any source, see ``Work.source_rank()``)."""
        if src is None:
            return self.process_group.recv_anysource([_real(tensor)], tag)
        return self.process_group.recv([_real(tensor)], src, tag)

    # ----------------------------------------------------------------- blocking
    def send(self, tensor: torch.Tensor, dst: int, tag: int = 0, *,
             timeout: datetime.timedelta | float | None = None) -> None:
        """Send and return once the bytes are in the receiver's tensor."""
        if dst == self.rank:
            raise InvalidArgument("Invalid destination rank: destination rank should not be the same as "
                                  "the rank of the current process (a blocking send to oneself never "
                                  "completes; use isend)")
        self.isend(tensor, dst, tag).wait(timeout)

    def recv(self, tensor: torch.Tensor, src: int | None = None, tag: int = 0, *,
             timeout: datetime.timedelta | float | None = None) -> int:
        """Receive into ``tensor``; return the sender's rank."""
        if src is not None and src == self.rank:
            raise InvalidArgument("Invalid source rank: source rank should not be the same as the rank "
                                  "of the current process (use irecv)")
        work = self.irecv(tensor, src, tag)
        work.wait(timeout)
        return work.source_rank()

    def barrier(self, timeout: datetime.timedelta | float | None = None) -> None:
        self.process_group.barrier().wait(timeout)

    def batch_isend_irecv(self, ops: Iterable[Any]) -> list[Work]:
        """Start a batch of operations in any order (no deadlock) and return their Works.

        Each op is a tuple ``(op, tensor, peer)`` or ``(op, tensor, peer, tag)`` where ``op`` is
        ``"isend"``/``"irecv"`` (or this group's ``isend``/``irecv``, or ``torch.distributed``'s), or an
        object with ``op``, ``tensor``, ``peer`` and ``tag`` attributes such as ``dist.P2POp``. All ops
        are checked before any starts."""
        parsed = [self._parse(op) for op in ops]
        return post_batch([functools.partial(fn, t, peer, tag) for fn, t, peer, tag in parsed])

    def _parse(self, spec: Any) -> tuple[Callable[[torch.Tensor, int, int], Work], torch.Tensor, int, int]:
        if isinstance(spec, Sequence) and not isinstance(spec, (str, bytes)):
            if len(spec) not in (3, 4):
                raise InvalidArgument(f"a batch op is (op, tensor, peer[, tag]), got {len(spec)} items")
            op, tensor, peer = spec[0], spec[1], spec[2]
            tag = spec[3] if len(spec) == 4 else 0
        elif all(hasattr(spec, a) for a in ("op", "tensor", "peer")):
            op, tensor, peer, tag = spec.op, spec.tensor, spec.peer, getattr(spec, "tag", 0)
        else:
            raise InvalidArgument(f"cannot read a batch op from {type(spec).__name__}")
        name = op if isinstance(op, str) else getattr(op, "__name__", "")
        kind = _OP_NAMES.get(name)
        if kind is None or (not isinstance(op, str) and op not in (dist.isend, dist.irecv, self.isend,
                                                                      self.irecv)):
            raise InvalidArgument(f"Invalid ``op``: expected 'isend' or 'irecv' (or torch.distributed's "
                                  f"isend/irecv), got {op!r}")
        if not isinstance(tensor, torch.Tensor):
            raise InvalidArgument(f"a batch op needs a torch.Tensor, got {type(tensor).__name__}")
        pg = self.process_group
        pg._check_rank(peer, "peer")
        pg._check_tag(tag)
        pg._check_tensors([_real(tensor)], "send" if kind == "isend" else "recv")
        if kind == "isend":
            return (lambda t, p, g: self.isend(t, p, g)), tensor, peer, tag
        return (lambda t, p, g: self.irecv(t, p, g)), tensor, peer, tag

    # ------------------------------------------------------------------ lifetime
    def close(self) -> None:
        """Fail pending operations and close every connection. Idempotent."""
        self.process_group.shutdown()
        self._store = None

    def __enter__(self) -> P2PGroup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<P2PGroup rank {self.rank}/{self.size} {self.process_group!r}>"


def _real(t: torch.Tensor) -> torch.Tensor:
    return torch.view_as_real(t) if isinstance(t, torch.Tensor) and t.is_complex() else t


def init_group(rank: int | None = None, world_size: int | None = None, *,
               master_addr: str | None = None, master_port: int | None = None,
               store: Store | None = None,
               timeout: datetime.timedelta = DEFAULT_TIMEOUT,
               host: str | None = None, options: Any = None) -> P2PGroup:
    """Join a group of ``world_size`` processes; blocks until all of them joined.

    ``rank``/``world_size``/``master_addr``/``master_port`` default to torchrun's environment
    (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT). Rank 0 serves a TCPStore on the master address
    unless you pass ``store``. ``host`` is the address to listen on; ``options`` an
    :class:`aiomooncake.Options` (or a dict of its fields). ``timeout`` bounds the rendezvous and every
    operation."""
    rank = rank if rank is not None else _env_int("RANK")
    world_size = world_size if world_size is not None else _env_int("WORLD_SIZE")
    if rank is None or world_size is None:
        raise InvalidArgument("init_group needs rank and world_size (or RANK and WORLD_SIZE in the "
                              "environment)")
    if world_size < 1 or not 0 <= rank < world_size:
        raise InvalidArgument(f"rank {rank} is out of range for world_size {world_size}")
    owned: Store | None = None
    if store is None:
        addr = master_addr or os.environ.get("MASTER_ADDR")
        port = master_port if master_port is not None else _env_int("MASTER_PORT")
        if not addr or port is None:
            raise InvalidArgument("init_group needs a store, or master_addr and master_port (or MASTER_ADDR "
                                  "and MASTER_PORT in the environment)")
        owned = TCPStore(addr, port, world_size, is_master=rank == 0, timeout=timeout,
                              wait_for_workers=False)
        store = owned
    prefixed = PrefixStore("aiomooncake-facade/", store)
    pg = ProcessGroupAiomooncake(prefixed, rank, world_size, timeout, options, host=host, group_name="facade")
    return P2PGroup(pg, owned)


__all__ = ["P2PGroup", "init_group"]
