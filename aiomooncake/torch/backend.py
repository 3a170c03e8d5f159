"""``ProcessGroupAiomooncake``: the ``torch.distributed`` process group behind the backend name
``"aiomooncake"``.

torch cannot subclass its C++ ``Backend`` from Python, so this is a Python ``ProcessGroup`` subclass
(torch's extension point for Python groups), returned by the creator registered with
``Backend.register_backend(..., extended_api=True)``. torch then uses it as the whole group: it
serves point-to-point operations and ``barrier`` for every device, whatever the backend string.
Collectives go to the other backend named in a per-device string such as
``"cpu:gloo,cuda:aiomooncake"`` (created lazily on the first collective, which every rank calls);
with ``"aiomooncake"`` alone they raise ``NotImplementedError`` saying so.

Calls made by torch (``isend``, ``irecv``, ``batch_isend_irecv``...) validate their arguments on the
caller's thread, raising like gloo does, then post the operation on its peer from that same thread
(under the loop's core lock, see :mod:`aiomooncake.torch.loop`) and return a
:class:`~aiomooncake.torch.work.Work` at once: they never block, so any order of operations in a
batch is deadlock-free.
"""

from __future__ import annotations

import datetime
import inspect
import logging
import os
import sys
import threading
from collections.abc import Callable, Sequence
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist
from torch._C._distributed_c10d import PrefixStore, ProcessGroupGloo, Store

from aiomooncake import Options, _trace
from aiomooncake.hostid import host_id
from aiomooncake.tensors import SETTLED, record_ready

from . import rendezvous
from .errors import BackendError, InvalidArgument
from .loop import LoopThread, register_closable, unregister_closable
from .mesh import Mesh
from .ops import BARRIER, RECV, RECV_ANY, SEND, Op
from .work import Work, completed_work

log = logging.getLogger(__name__)

BACKEND_NAME = "aiomooncake"
DEFAULT_TIMEOUT = datetime.timedelta(minutes=30)  # torch's default for non-NCCL groups
_TAG_MAX = 2**31 - 1  # c10d passes tags as C int

# Heartbeats only catch hung hosts (a dead process closes its sockets at once); a training step that
# keeps the GIL for seconds must not get a healthy peer declared dead. No busy-polling by the core:
# it would also spin the background loop thread, which shares the GIL with callers that compute;
# waiters poll by themselves instead (loop.WAITER_SPIN_S). ACKs leave at once: held to ride with the
# reply, the 8 B round trip measured 0.45-0.48x of the core's against 0.59-0.66x (2-core VM,
# experiments/torch_latency.py with hold_acks on and off, two launches each, 2026-12-03).
DEFAULT_OPTIONS = Options(heartbeat_interval=2.0, heartbeat_timeout=60.0, busy_poll=0.0, hold_acks=False)


def resolve_options(backend_options: Any) -> tuple[Options, str | None]:
    """``pg_options`` of ``init_process_group``: None, an :class:`aiomooncake.Options`, or a dict of
    its fields plus ``host`` (the address to listen on)."""
    if backend_options is None:
        return DEFAULT_OPTIONS, None
    if isinstance(backend_options, Options):
        return backend_options, None
    if isinstance(backend_options, dict):
        fields = dict(backend_options)
        host = fields.pop("host", None)
        return Options.build(DEFAULT_OPTIONS, **fields), host
    raise InvalidArgument(f"pg_options for the aiomooncake backend must be None, aiomooncake.Options or a "
                          f"dict of its fields (plus 'host'), not {type(backend_options).__name__}")


def _batch_code() -> Any:
    try:
        return inspect.unwrap(dist.batch_isend_irecv).__code__
    except Exception:  # another torch: then every op wakes the loop, as for lone isend/irecv
        return None


_BATCH_CODE = _batch_code()


class _Batching(threading.local):
    """Per thread: ``left``, set by callers that know their batch (the facade's
    ``batch_isend_irecv``): how many of its operations follow the one being posted, None when
    unknown (torch's own batch is then read from its frame); and that frame's two lists, read once
    per batch (reading ``f_locals`` builds a dict of every local: ~10 us a time on the 2-core VM)."""

    left: int | None = None
    frame: FrameType | None = None
    lists: tuple[list[Any], list[Any]] | None = None
    idle: int = -1  # the device whose current stream a batch's earlier op found idle


_batching = _Batching()


def post_batch(calls: Sequence[Callable[[], Work]]) -> list[Work]:
    """Make the calls (each posts one operation of this group) as one batch: their frames leave
    together after the last one, as for torch's ``batch_isend_irecv``."""
    works = []
    _batching.idle = -1
    try:
        for i, call in enumerate(calls):
            _batching.left = len(calls) - 1 - i
            works.append(call())
    finally:
        _batching.left = None
        _batching.idle = -1
    return works


def _batch_ops_left() -> int:
    """How many operations of the batch that called us come after this one: -1 when not called
    from a batch. torch hands a Python group a ``batch_isend_irecv`` one op at a time and says
    nothing of its end; its own frame does: the op list and the works it collected so far. Every op
    but the last is then posted without a loop turn, its frames held, and the last one's turn sends
    them all (see docs/torch.md); tests/test_torch_p2p.py fails if torch changes that frame."""
    b = _batching
    left = b.left
    if left is not None:
        return left
    code = _BATCH_CODE
    if code is None:
        return -1
    f: FrameType | None = sys._getframe(2)
    for _ in range(12):
        if f is None:
            return -1
        if f.f_code is code:
            lists = b.lists
            if b.frame is not f or lists is None:  # a new batch: nothing is known of its streams
                b.idle = -1
                loc = f.f_locals
                ops, reqs = loc.get("p2p_op_list"), loc.get("reqs")
                if not (isinstance(ops, list) and isinstance(reqs, list)):
                    return -1
                lists = (ops, reqs)
                b.frame, b.lists = f, lists
            left = max(0, len(lists[0]) - len(lists[1]) - 1)
            if left == 0:  # the batch's last op: hold no frame (nor its tensors) beyond it
                b.frame = b.lists = None
            return left
        f = f.f_back
    return -1


class BackendInfo:
    """What ``ProcessGroup._get_backend(device)`` returns for devices this group serves itself.

    torch asks it about capabilities (``supports_splitting`` when ``init_process_group`` got a
    ``device_id``); a Python group has no C++ backend to return."""

    supports_splitting = False
    supports_coalescing = True
    supports_time_estimate = False
    supports_tensor_alloc = False
    supports_shrinking = False

    def __init__(self, group: ProcessGroupAiomooncake) -> None:
        self._group = group

    def name(self) -> str:
        return BACKEND_NAME

    def rank(self) -> int:
        return self._group.rank()

    def size(self) -> int:
        return self._group.size()

    def shutdown(self) -> None:
        self._group.shutdown()

    def abort(self) -> None:
        self._group.abort()

    def __repr__(self) -> str:
        return f"<aiomooncake backend of {self._group!r}>"


def _not_implemented(name: str) -> NotImplementedError:
    return NotImplementedError(
        f"{name}: the aiomooncake backend implements point-to-point operations (send, recv, isend, "
        "irecv, batch_isend_irecv) and barrier, not collectives. Give collectives to another backend "
        "with a per-device backend string, e.g. dist.init_process_group('cpu:gloo,cuda:aiomooncake') "
        "(or 'cpu:gloo,cuda:nccl' style for a subgroup via dist.new_group(backend=...)); aiomooncake "
        "then still carries every send/recv.")


def _first_tensor(obj: Any) -> torch.Tensor | None:
    if isinstance(obj, torch.Tensor):
        return obj
    if isinstance(obj, (list, tuple)):
        for x in obj:
            t = _first_tensor(x)
            if t is not None:
                return t
    return None


def _collective(name: str, backend_method: str) -> Callable[..., Any]:
    def method(self: ProcessGroupAiomooncake, *args: Any, **kwargs: Any) -> Any:
        delegate = self._delegate(name, args)
        fn = getattr(delegate, backend_method, None)
        if fn is None:
            raise NotImplementedError(f"{name}: the collective backend {delegate.name()!r} has no "
                                      f"{backend_method}")
        return fn(*args, **kwargs)

    method.__name__ = name
    method.__doc__ = f"``{name}``, run by the group's collective backend (see the module docstring)."
    return method


class ProcessGroupAiomooncake(dist.ProcessGroup):
    """A process group whose point-to-point operations travel over aiomooncake.

    Made by ``init_process_group("aiomooncake")`` / ``new_group(backend="aiomooncake")``; or directly,
    ``ProcessGroupAiomooncake(store, rank, size, timeout)`` (see :mod:`aiomooncake.torch.facade`)."""

    def __init__(self, store: Store, rank: int, size: int,
                 timeout: datetime.timedelta | None = None, options: Any = None, *,
                 host: str | None = None, group_name: str | None = None) -> None:
        super().__init__(rank, size)  # type: ignore[call-arg]  # the (store, rank, size) constructor cannot build a Python subclass
        if not 0 <= rank < size:
            raise InvalidArgument(f"rank {rank} is out of range for a group of size {size}")
        self._store = store
        self._nranks = size  # size() and rank() are C++ calls (~1 us each): the hot path reads these
        self._timeout = timeout if timeout is not None else DEFAULT_TIMEOUT
        self._op_timeout = self._seconds(self._timeout)
        self._options, configured_host = resolve_options(options)
        self._label = group_name or ""
        self._delegates: dict[str, Any] = {}
        self._delegate_lock = threading.Lock()
        self._coalesced: list[Op] | None = None
        self._shut = False
        self._loop = LoopThread.acquire()
        self._mesh: Mesh | None = None
        try:
            self._generation = rendezvous.generation(store, size)
            self.host = rendezvous.choose_host(store, host or configured_host)
            self._mesh = self._loop.run(self._make_mesh(), self._options.handshake_timeout)
            self.port = self._mesh.port
            rendezvous.publish(store, self._generation, rank, self.host, self.port,
                               {"pid": os.getpid(), "host_id": host_id()})
            records = rendezvous.gather(store, self._generation, size, self._timeout)
            self._loop.submit(self._mesh.connect, [(r["host"], int(r["port"])) for r in records])
        except BaseException:
            self._shut = True
            self._close_mesh()
            self._loop.release()
            raise
        register_closable(self)
        log.info("aiomooncake group %r: rank %d of %d listening on %s:%d", self._label, rank, size,
                 self.host, self.port)

    async def _make_mesh(self) -> Mesh:
        mesh = Mesh(self.rank(), self.size(), self._generation, self._options, self._loop)
        try:
            await mesh.listen(self.host)
        except BaseException:
            await mesh.close()
            raise
        return mesh

    # ================================================================ naming
    def getBackendName(self) -> str:
        return BACKEND_NAME

    def _get_backend_name(self) -> str:
        return BACKEND_NAME

    def __repr__(self) -> str:
        return (f"<ProcessGroupAiomooncake {self._label!r} rank {self.rank()}/{self.size()} "
                f"{'shut down' if self._shut else 'open'}>")

    @property
    def timeout(self) -> datetime.timedelta:
        return self._timeout

    def set_timeout(self, timeout: datetime.timedelta) -> None:
        """Bound every operation started from now on by ``timeout``."""
        self._timeout = timeout
        self._op_timeout = self._seconds(timeout)

    # ======================================================= point-to-point
    def send(self, tensors: list[torch.Tensor], dstRank: int, tag: int) -> Work:
        """Start sending ``tensors[0]`` to ``dstRank``; never blocks."""
        return self._p2p(SEND, tensors, dstRank, tag)

    def recv(self, tensors: list[torch.Tensor], srcRank: int, tag: int) -> Work:
        """Start receiving into ``tensors[0]`` from ``srcRank``; never blocks."""
        return self._p2p(RECV, tensors, srcRank, tag)

    def recv_anysource(self, tensors: list[torch.Tensor], tag: int) -> Work:
        """Start receiving the next message with ``tag`` from whichever rank sends one;
        ``Work.source_rank()`` says which."""
        return self._p2p(RECV_ANY, tensors, -1, tag)

    def _p2p(self, kind: str, tensors: list[torch.Tensor], rank: int, tag: int) -> Work:
        """Check, post and return the Work: the hot path of every operation, kept to a few
        attribute reads before the post (on the 2-core VM each microsecond here is one of a round
        trip's ~80)."""
        t = tensors[0] if type(tensors) is list and len(tensors) == 1 else None
        if (not isinstance(t, torch.Tensor) or t.layout != torch.strided or not t.is_contiguous()
                or type(tag) is not int or not 0 <= tag <= _TAG_MAX or self._shut
                or (kind != RECV_ANY and (type(rank) is not int or not 0 <= rank < self._nranks))
                or not (t.is_cpu or t.is_cuda)):
            try:  # something is unusual: the full checks say what (or let it through)
                t = self._check_tensors(tensors, "send" if kind == SEND else "recv")
                if kind != RECV_ANY:
                    self._check_rank(rank, "destination" if kind == SEND else "source")
                self._check_tag(tag)
                self._check_open()
            except BaseException:
                self._loop.flush()  # what earlier ops of a batch left held goes now
                raise
        if _trace.on:
            _trace.mark("torch:op")
        left = _batch_ops_left()
        ready = self._caller_mark(t, left) if t.is_cuda else None
        # bytes, as gloo: dtypes may differ, sizes may not (one view, not reshape + view: ~1 us)
        wire = t if t.dtype is torch.uint8 and t.dim() else (
            t.view(torch.uint8) if t.dim() else t.reshape(-1).view(torch.uint8))
        op = Op(kind, tag, rank, t, wire, self._op_timeout, ready)
        self._dispatch(op, left=left)
        if self._coalesced is not None:
            self._coalesced.append(op)
        return Work([op], [t], self._loop)

    def barrier(self, opts: Any = None) -> Work:
        """Every rank of the group reaches the barrier before any ``wait()`` on it returns."""
        self._check_open()
        timeout = self._seconds(self._timeout)
        t = getattr(opts, "timeout", None)
        if isinstance(t, datetime.timedelta) and t.total_seconds() > 0:
            timeout = t.total_seconds()
        op = Op(BARRIER, 0, -1, timeout=timeout)
        self._dispatch(op, barrier=True)
        return Work([op], [], self._loop)

    # ----------------------------------------------------------- coalescing
    def start_coalescing(self, device: torch.device | None = None) -> None:
        """Collect the following operations so that :meth:`end_coalescing` returns one Work for them
        (they still start at once; their frames leave together at the end)."""
        if self._coalesced is not None:
            raise RuntimeError("aiomooncake: coalescing already started on this group")
        self._coalesced = []

    def end_coalescing(self, device: torch.device | None = None) -> Work:
        ops, self._coalesced = self._coalesced, None
        if ops is None:
            raise RuntimeError("aiomooncake: end_coalescing without start_coalescing")
        self._loop.flush()
        return Work(ops, loop=self._loop) if ops else completed_work()

    def _start_coalescing(self, device: torch.device) -> None:
        self.start_coalescing(device)

    def _end_coalescing(self, device: torch.device) -> Work:
        return self.end_coalescing(device)

    # ============================================================ internals
    @staticmethod
    def _caller_mark(t: torch.Tensor, left: int) -> Any:
        """CUDA: a pooled event marking the caller's stream (creating one costs ~13 us on its first
        record; the poster returns it once our stream waits on it), or SETTLED if the stream is
        idle. Within one batch (nothing of the caller's runs between its ops) a stream found idle
        stays so: its later ops skip the query (~2 us each)."""
        b = _batching
        dev = t.get_device()
        ready = SETTLED if left >= 0 and b.idle == dev else record_ready(t)
        b.idle = dev if left > 0 and ready is SETTLED else -1
        return ready

    def _dispatch(self, op: Op, barrier: bool = False, left: int | None = None) -> None:
        """Post ``op`` now, on this thread. In a batch (torch's ``batch_isend_irecv``, the facade's,
        a coalescing block) every op but the last is posted without a loop turn and its frames are
        held; the last one's turn sends them together."""
        mesh = self._mesh
        assert mesh is not None
        if left is None:
            left = -1 if barrier else _batch_ops_left()
        later = left > 0 or self._coalesced is not None
        op.burst = later or left == 0
        try:
            if later:
                self._loop.submit_later(mesh.submit, op)
            else:
                self._loop.submit(mesh.submit, op)
        except RuntimeError as e:
            raise BackendError(f"{op.describe()}: the aiomooncake loop is not running: {e}") from e

    @staticmethod
    def _seconds(td: datetime.timedelta) -> float | None:
        secs = td.total_seconds()
        return secs if secs > 0 else None

    def _check_open(self) -> None:
        if self._shut:
            raise BackendError("the aiomooncake process group was shut down (destroy_process_group)")

    def _check_tensors(self, tensors: Any, what: str) -> torch.Tensor:
        if isinstance(tensors, torch.Tensor):
            tensors = [tensors]
        if not isinstance(tensors, Sequence) or len(tensors) != 1:
            n = len(tensors) if isinstance(tensors, Sequence) else type(tensors).__name__
            raise InvalidArgument(f"ProcessGroupAiomooncake::{what} takes a single tensor (got {n})")
        t = tensors[0]
        if not isinstance(t, torch.Tensor):
            raise InvalidArgument(f"ProcessGroupAiomooncake::{what} needs a torch.Tensor, got "
                                  f"{type(t).__name__}")
        if t.layout != torch.strided:
            raise InvalidArgument(f"input tensor has to be dense (got a {t.layout} tensor)")
        if t.device.type not in ("cpu", "cuda"):
            raise InvalidArgument(f"aiomooncake moves cpu and cuda tensors, not {t.device}")
        if not t.is_contiguous():
            raise InvalidArgument("input tensor has to be contiguous")
        return t

    def _check_rank(self, rank: Any, what: str) -> None:
        if isinstance(rank, bool) or not isinstance(rank, int):
            raise InvalidArgument(f"the {what} rank must be an int, got {type(rank).__name__}")
        if not 0 <= rank < self.size():
            raise InvalidArgument(f"invalid {what} rank {rank}: the group has ranks 0..{self.size() - 1}")

    @staticmethod
    def _check_tag(tag: Any) -> None:
        if isinstance(tag, bool) or not isinstance(tag, int):
            raise InvalidArgument(f"the tag must be an int, got {type(tag).__name__}")
        if tag < 0:
            raise InvalidArgument("Tag must be nonnegative")
        if tag > _TAG_MAX:
            raise InvalidArgument(f"the tag must fit a C int (at most {_TAG_MAX}), got {tag}")

    # ================================================= collectives (delegated)
    def _delegate(self, name: str, args: Sequence[Any]) -> Any:
        self._check_open()
        config = dist.distributed_c10d._world.pg_backend_config.get(self, BACKEND_NAME)
        per_device: dict[str, str] = {}
        for part in str(config).split(","):
            dev, sep, backend = part.partition(":")
            if sep:
                per_device[dev.strip()] = backend.strip().lower()
        others = {d: b for d, b in per_device.items() if b != BACKEND_NAME}
        if not others:
            raise _not_implemented(name)
        t = _first_tensor(list(args))
        device = t.device.type if t is not None else "cpu"
        backend = others.get(device) or others.get("cpu") or next(iter(others.values()))
        with self._delegate_lock:
            delegate = self._delegates.get(backend)
            if delegate is None:
                delegate = self._delegates[backend] = self._make_delegate(backend)
        return delegate

    def _make_delegate(self, backend: str) -> Any:
        store = PrefixStore(f"aiomooncake/{self._generation}/{backend}/", self._store)
        if backend == "gloo":
            return ProcessGroupGloo(store, self.rank(), self.size(), timeout=self._timeout)
        if backend == "nccl" and dist.is_nccl_available():
            opts = dist.ProcessGroupNCCL.Options()
            opts._timeout = self._timeout
            return dist.ProcessGroupNCCL(store, self.rank(), self.size(), opts)
        raise NotImplementedError(f"aiomooncake can hand collectives to gloo or nccl, not {backend!r}")

    allreduce = _collective("allreduce", "allreduce")
    allreduce_coalesced = _collective("allreduce_coalesced", "allreduce_coalesced")
    broadcast = _collective("broadcast", "broadcast")
    allgather = _collective("allgather", "allgather")
    allgather_coalesced = _collective("allgather_coalesced", "allgather_coalesced")
    all_gather_single = _collective("all_gather_single", "_allgather_base")
    _allgather_base = _collective("_allgather_base", "_allgather_base")
    all_gather_single_coalesced = _collective("all_gather_single_coalesced",
                                              "allgather_into_tensor_coalesced")
    allgather_into_tensor_coalesced = _collective("allgather_into_tensor_coalesced",
                                                  "allgather_into_tensor_coalesced")
    gather = _collective("gather", "gather")
    scatter = _collective("scatter", "scatter")
    reduce = _collective("reduce", "reduce")
    reduce_scatter = _collective("reduce_scatter", "reduce_scatter")
    reduce_scatter_single = _collective("reduce_scatter_single", "_reduce_scatter_base")
    _reduce_scatter_base = _collective("_reduce_scatter_base", "_reduce_scatter_base")
    reduce_scatter_single_coalesced = _collective("reduce_scatter_single_coalesced",
                                                  "reduce_scatter_tensor_coalesced")
    reduce_scatter_tensor_coalesced = _collective("reduce_scatter_tensor_coalesced",
                                                  "reduce_scatter_tensor_coalesced")
    alltoall = _collective("alltoall", "alltoall")
    all_to_all_single = _collective("all_to_all_single", "alltoall_base")
    alltoall_base = _collective("alltoall_base", "alltoall_base")
    monitored_barrier = _collective("monitored_barrier", "monitored_barrier")

    def _get_backend(self, device: torch.device) -> Any:
        """The backend serving ``device``: a delegate already made for collectives, else this group."""
        config = dist.distributed_c10d._world.pg_backend_config.get(self, BACKEND_NAME)
        for part in str(config).split(","):
            dev, sep, backend = part.partition(":")
            if sep and dev.strip() == torch.device(device).type:
                delegate = self._delegates.get(backend.strip().lower())
                if delegate is not None:
                    return delegate
        return BackendInfo(self)

    # ============================================================== shutdown
    def shutdown(self) -> None:
        """Fail pending operations, close every connection and stop using the event loop.

        Called by ``destroy_process_group()`` and at interpreter exit. Idempotent."""
        if self._shut:
            return
        self._shut = True
        unregister_closable(self)
        try:
            self._close_mesh()
        finally:
            for d in self._delegates.values():
                try:
                    d.shutdown()
                except Exception:
                    log.debug("shutting down a collective delegate failed", exc_info=True)
            self._delegates.clear()
            self._loop.release()

    def abort(self) -> None:
        self.shutdown()

    def _close_mesh(self) -> None:
        mesh = self._mesh
        if mesh is None or not self._loop.alive:
            return
        if self._loop.in_loop_thread():
            self._loop.loop.create_task(mesh.close())
            return
        try:
            self._loop.run(mesh.close(), self._options.cancel_timeout + 5.0)
        except Exception as e:
            log.warning("aiomooncake group %r: closing did not finish cleanly: %s", self._label, e)


def create_process_group(dist_backend_opts: Any, backend_options: Any) -> ProcessGroupAiomooncake:
    """The creator registered with torch (``extended_api=True``)."""
    return ProcessGroupAiomooncake(
        dist_backend_opts.store, dist_backend_opts.group_rank, dist_backend_opts.group_size,
        dist_backend_opts.timeout, backend_options, group_name=str(dist_backend_opts.group_id))


__all__ = ["BACKEND_NAME", "BackendInfo", "ProcessGroupAiomooncake", "create_process_group"]
