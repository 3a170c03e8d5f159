"""The public ``Peer``: awaitable tensor send and receive over one connection.

The peer glues the pure :class:`~aiomooncake.core.session.Session` to I/O: it feeds control frames
in, writes the frames the session emits, and acts on its events: exposing memory and driving copies
through the data plane of each link (:mod:`aiomooncake.planes`), copying eager payloads, resolving
the posted operations (:mod:`.pending`). Which link a message takes and who copies on it were
decided in the handshake (:mod:`aiomooncake.core.negotiation`); the peer only asks its links.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import os
from collections.abc import Callable
from typing import Any

import torch

from .. import _trace, gcpause, tuning
from ..batch import Batch
from ..core.chunks import plan_copies
from ..core.messages import Eager, Message, Rts
from ..core.negotiation import link_for
from ..core.session import (
    MessageArrived,
    RecvComplete,
    RecvFailed,
    RecvMatched,
    RecvOp,
    RecvReleased,
    RecvSpec,
    RecvState,
    SendComplete,
    SendFailed,
    SendOp,
    SendState,
    Session,
    StopWriting,
    WriteRequested,
)
from ..errors import (
    AiomooncakeError,
    ConfigurationError,
    MessageMismatch,
    PeerClosed,
    Timeout,
    TransferCancelled,
    TransferFailed,
)
from ..options import Options
from ..planes.base import NOTHING, Announcement, DataPlane, Job
from ..planes.negotiate import Agreement, Link
from ..planes.poller import poller
from ..tensors import (
    ReadyMark,
    current_stream,
    dtype_from_name,
    dtype_name,
    fill_from_bytes,
    record_ready,
    recycle,
    to_bytes,
    wait_event,
)
from ..transport.busypoll import BusyPoller
from ..transport.connection import Connection, Policy
from . import quarantine
from .burst import Shared
from .gather import Copy, Gather, PullCopy, WriteCopy
from .pending import PendingRecv, PendingSend
from .staging import Staging, fill_device
from .writable import unwritable

log = logging.getLogger(__name__)

_ANY = RecvSpec()
# Attempts after a failed engine write while the peer answers (one per pooled engine connection).
_WRITE_RETRIES = max(4, int(os.environ.get("MC_TCP_LANES_PER_PEER", "4") or 4))


class Peer:
    """One connected remote process. Create with :func:`aiomooncake.connect` or
    :meth:`Listener.accept`; use ``async with peer:`` to close it."""

    quarantine_s = 60.0  # how long memory a dead peer may still write into is held (see quarantine)

    def __init__(self, conn: Connection, agreement: Agreement, options: Options) -> None:
        self._conn = conn
        self.options = options
        self._links: dict[str, Link] = agreement.links
        self.remote_info: dict[str, Any] = agreement.remote
        # Never send an eager frame larger than the peer accepts.
        remote_cap = agreement.remote.get("max_frame")
        eager = options.eager_threshold
        if isinstance(remote_cap, int) and remote_cap > 1024:
            eager = min(eager, remote_cap - 1024)
        # A link whose receiver pulls host memory (the same-host CPU plane: RTS, ACK instead of RTS,
        # CTS, write, DONE): above shm_eager_threshold that one copy beats the eager frame's several.
        cpu = self._links.get("cpu")
        if cpu is not None and cpu.pulls:
            eager = min(eager, options.shm_eager_threshold)
        self._session = Session(eager_threshold=eager)
        self._loop = asyncio.get_running_loop()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._arrivals: dict[int, list[asyncio.Future[None]]] = {}
        self._staging = Staging(eager)
        self._closing = False
        self._flush_due = False
        # The exposure lookups that the operations of a burst share (see .burst): those of a
        # burst's posts (until the end of the loop turn) or of one socket read's messages,
        # whichever set it up first.
        self._shared: Shared | None = None
        self._read_shared: Shared | None = None  # the one a socket read set up (see _read_begin)
        self._jobs: set[Job] = set()  # copies to or from the remote in flight from this peer
        self._gather = Gather(self._loop, self._jobs, self._gathered_done)
        self._planes = {id(link.plane): link for link in self._links.values()}
        for link in self._planes.values():
            link.plane.attach(link.remote_segment)
        self._detached = False
        quarantine.prune()
        # Small CUDA tensors whose producer is done travel in the frame (see post_send), unless the
        # two peers share a GPU (one of them copies for both: see core.negotiation.roles), where the
        # host copies that costs in both processes measured slower than the one copier's copy
        # (H200, over the engine: 4 KiB round trip 776 against 599 us, EPLB 93 against 124 GB/s;
        # over CUDA IPC, 2026-12-03, experiments/cuda_latency.py, three alternating rounds: 618 /
        # 669 / 511 us inline against 323 / 397 / 409 us, even for lone sends).
        cuda = self._links.get("cuda")
        shared_gpu = cuda is not None and cuda.offers != cuda.pulls  # one of the two copies for both
        self._inline_cuda = options.inline_cuda if options.inline_cuda is not None else not shared_gpu
        self._busy = BusyPoller.for_loop(options.busy_poll)
        remote_busy = agreement.remote.get("busy_poll")  # absent from older peers: assume sleeping
        # A burst's frames travel as BATCH frames no larger than either side accepts.
        batch_bytes = options.max_frame
        if isinstance(remote_cap, int) and remote_cap > 1024:
            batch_bytes = min(batch_bytes, remote_cap)
        self._poller_hooks = None
        if any(link.plane.in_order for link in self._planes.values()):
            # The copies that the RTS and CTS frames of one socket read start go to their plane in
            # batches: on the NVLink transport about half the cost per request of lone submits.
            p = poller()
            self._poller_hooks = (p.hold, p.release)
        hooks = (self._read_begin, self._read_end)
        conn.start(self._on_message, self._on_lost, options.heartbeat_interval, options.heartbeat_timeout,
                   Policy(busy=self._busy,
                          ack_now=not options.hold_acks or (isinstance(remote_busy, (int, float))
                                                            and remote_busy > 0),
                          burst_hooks=hooks, batch_replies=options.batch_replies,
                          batch_bytes=batch_bytes if options.batch_frames else 0))
        log.info("connected to %s: data plane %s", conn.peername,
                 ", ".join(f"{k} tensors {v}" for k, v in self.data_paths.items()))

    # ================================================================ public
    @property
    def address(self) -> str:
        """The remote control address, ``host:port``."""
        return self._conn.peername

    @property
    def transports(self) -> dict[str, str]:
        """The transport of each data-plane link, e.g. ``{"cpu": "tcp", "cuda": "nvlink"}``."""
        return {name: link.transport for name, link in self._links.items()}

    @property
    def data_paths(self) -> dict[str, str]:
        """The data plane of each kind of memory, e.g. ``{"cpu": "shm", "cuda": "te:nvlink"}``:
        ``"shm"`` (same-host kernel copy), ``"te:tcp"``, ``"te:rdma"``, ``"te:nvlink"`` (the Transfer
        Engine and its transport)."""
        return {name: link.plane.name for name, link in self._links.items()}

    @property
    def data_path(self) -> str:
        """The data plane this peer's tensors take: that of CUDA tensors when both sides can
        exchange them directly, else that of CPU tensors (see :attr:`data_paths`)."""
        cuda = self._links.get("cuda")
        if cuda is not None and cuda.transport in ("nvlink", "cuda-ipc"):
            return cuda.plane.name
        return self._links["cpu"].plane.name

    @property
    def closed(self) -> bool:
        return self._conn.closed is not None

    async def send(self, tensor: torch.Tensor, tag: int = 0, *, timeout: float | None = None) -> None:
        """Send ``tensor``; return once its bytes are in the receiver's tensor.

        A non-contiguous tensor is sent as its contiguous copy. For CUDA tensors the bytes are read
        only after the work already queued on the caller's current stream is done."""
        if timeout is None:
            return await self._send(tensor, tag)
        try:
            return await asyncio.wait_for(self._send(tensor, tag), timeout)
        except asyncio.TimeoutError:
            raise Timeout(f"send (tag {tag}) to {self.address} did not finish within {timeout:g} s") from None

    async def recv(self, tensor: torch.Tensor, tag: int = 0, *, timeout: float | None = None) -> torch.Tensor:
        """Receive the next message with ``tag`` into ``tensor`` (same dtype and number of elements as
        the sent one) and return it. A non-contiguous ``tensor`` is filled through a contiguous
        temporary. For CUDA, work the caller queues on its current stream afterwards sees the data."""
        self._check_recv_dest(tensor)
        return await self._with_timeout(self._recv(tensor, None, tag), timeout, "recv", tag)

    async def recv_tensor(self, tag: int = 0, device: torch.device | str | None = None, *,
                          timeout: float | None = None) -> torch.Tensor:
        """Receive the next message with ``tag`` into a new tensor of the sender's shape and dtype.

        ``device=None`` allocates on CUDA (the current device) when the sender's tensor was on CUDA
        and this process has CUDA, else on the CPU."""
        dev = torch.device(device) if device is not None else None
        return await self._with_timeout(self._recv(None, dev, tag), timeout, "recv_tensor", tag)

    def post_send(self, tensor: torch.Tensor, tag: int = 0, *, burst: bool = False,
                  stream: torch.cuda.Stream | None = None,
                  on_end: Callable[[PendingSend], object] | None = None) -> PendingSend:
        """Post a send now, without a task or an await; await the handle for its completion (as
        :meth:`send` returns), or withdraw it. ``burst``: more posts follow in this loop turn, so
        their control frames leave together, in one write (what :meth:`batch` does). ``stream``
        (CUDA): read the bytes after the work queued on it so far, not on the current stream (an
        adapter posting for another thread, without switching this thread's current stream).
        ``on_end(handle)``: called once, on the loop, as soon as the operation is over (its future
        is done then, unless the caller cancelled it): an adapter that waits for hundreds of
        operations counts them there instead of paying a future callback, a loop-turn hop, for
        each (what :class:`~aiomooncake.Batch` and the torch backend do). It may run before
        ``post_send`` returns; it must not raise."""
        if burst:
            self._hold_frames(tensor.nbytes if isinstance(tensor, torch.Tensor) else 0)
            self._lookups()  # the burst's sends look up each allocation once
        return self._post_send(tensor, tag, stream, on_end)

    def post_recv(self, tensor: torch.Tensor, tag: int = 0, *, burst: bool = False,
                  stream: torch.cuda.Stream | None = None,
                  on_end: Callable[[PendingRecv], object] | None = None) -> PendingRecv:
        """Post a receive into ``tensor`` now (as :meth:`recv`); await the handle for the tensor.
        ``stream`` (CUDA): the stream to order against instead of the current one (as for
        :meth:`post_send`; the copies that finish a staged receive go on it too). ``on_end``: as
        for :meth:`post_send` (a withdrawn receive is over once no byte can land in it)."""
        self._check_recv_dest(tensor)
        if burst:
            self._hold_frames(tensor.nbytes)
        return self._post_recv(tensor, None, tag, stream, on_end)

    def post_recv_tensor(self, tag: int = 0, device: torch.device | str | None = None, *,
                         burst: bool = False,
                         on_end: Callable[[PendingRecv], object] | None = None) -> PendingRecv:
        """Post a receive into a new tensor of the sender's shape and dtype (as :meth:`recv_tensor`)."""
        if burst:
            self._hold_frames(0)
        return self._post_recv(None, torch.device(device) if device is not None else None, tag,
                               on_end=on_end)

    def batch(self, *, timeout: float | None = None) -> Batch:
        """Post many sends and receives together and wait for them together (``async with
        peer.batch() as b: b.send(t, tag); b.recv(u, tag)``): no task per operation, and the
        control frames of one loop turn leave in one write. See :class:`aiomooncake.batch.Batch`."""
        return Batch(self, timeout)

    def probe(self, tag: int = 0) -> bool:
        """True if a message with ``tag`` has arrived and no receive has claimed it yet."""
        return self._session.has_unexpected(tag)

    async def wait_incoming(self, tag: int = 0) -> None:
        """Wait until :meth:`probe` would return True (for any-source receives)."""
        while not self._session.has_unexpected(tag):
            if self._conn.closed is not None:
                raise _own_copy(self._conn.closed)
            fut = self._loop.create_future()
            self._arrivals.setdefault(tag, []).append(fut)
            try:
                await fut
            finally:
                waiters = self._arrivals.get(tag)
                if waiters and fut in waiters:
                    waiters.remove(fut)

    @property
    def pending(self) -> int:
        """Operations posted on this peer and not finished yet (diagnostics)."""
        return self._session.pending

    async def close(self) -> None:
        """Close the connection; pending operations fail with PeerClosed. Idempotent."""
        if not self._closing:
            self._closing = True
            await self._stop_writing()
            self._conn.close(None, reason="the peer closed the connection")
        elif self._jobs:
            await self._stop_writing()  # a concurrent close() waits for the writes as well
        if self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
        if self._busy is not None:
            self._busy.stop()
            await asyncio.sleep(0)
        self._detach()

    async def _stop_writing(self) -> None:
        """Before the BYE: fail every pending operation here and let our copies settle, so the
        remote's receives fail only once no byte of ours can land in them any more. Also when the
        connection is already lost: the plane may still be finishing copies into the dead peer, and
        returning before they settle would leave their memory registered as in use."""
        if self._gather:
            self._gather.start()  # copies queued for this turn start (or end) now, not after close
            self._flush()
        if not self._jobs:
            return
        if self._conn.closed is None:
            self._session.close(PeerClosed(f"the connection to {self.address} was closed locally"))
            self._flush()  # StopWriting: nothing more is submitted
        futs = [j.future for j in self._jobs]
        _, pending = await asyncio.wait(futs, timeout=self.options.cancel_timeout)
        if pending:
            log.warning("closing %s with %d copies still in flight after %g s", self.address,
                        len(pending), self.options.cancel_timeout)

    def _detach(self) -> None:
        quarantine.prune()
        if not self._detached:
            self._detached = True
            for link in self._planes.values():
                link.plane.detach(link.remote_segment)

    async def __aenter__(self) -> Peer:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"<Peer {self.address} {state} {self.data_paths}>"

    # ================================================================== send
    async def _send(self, tensor: torch.Tensor, tag: int) -> None:
        if self._conn.paused:
            try:
                await self._conn.drain()
            except AiomooncakeError as e:
                raise _own_copy(e) from None
        p = self._post_send(tensor, tag)
        try:
            await p.future
        except asyncio.CancelledError:
            # Task.cancel() cancelled the future itself: a cancelled future still needs withdrawing.
            if not p.future.done() or p.future.cancelled():
                self._withdraw_send(p)
            raise

    def _post_send(self, tensor: torch.Tensor, tag: int, stream: Any = None,
                   on_end: Callable[[PendingSend], object] | None = None) -> PendingSend:
        dev = self._check_tensor(tensor, "send")
        src = tensor if tensor.is_contiguous() else tensor.contiguous()
        ready = record_ready(src, stream) if dev == "cuda" else None
        nbytes = src.nbytes
        s = self._session
        link = self._links.get(dev)
        # A small CUDA tensor goes inline only if the work queued on the caller's stream before the
        # send is already done: its bytes then come to the host at once (one small copy on a side
        # stream) and travel in the frame, with no rendezvous and no plane operation. If that work
        # still runs, the send takes the rendezvous path, whose copy waits for it in order: waiting
        # here would hold the post back, and a later send on the same tag could overtake it. The
        # same holds for offering the source to a receiver that pulls: only once it is ready.
        payload = None
        pull_src = 0
        offered = NOTHING
        held = None
        if nbytes <= s.eager_threshold and (ready is None or nbytes == 0):
            payload = to_bytes(src) if ready is None else b""
            recycle(ready)
            ready = None
        elif (ready is not None and nbytes <= s.eager_threshold and self._inline_cuda
              and _settled(ready)):
            ready = None
            payload = self._staging.device_bytes(src)
        elif link is not None and link.offers and (ready is None or _settled(ready)):
            ready = None
            plane = link.plane
            shared = self._shared
            try:
                region = plane.acquire(src) if shared is None else shared.acquire(plane, src)
            except AiomooncakeError as e:  # memory the plane cannot expose: the receiver asks us to write
                log.debug("not offering a source to %s: %s", self.address, e)
            else:
                held = (plane, region)
                pull_src, offered = src.data_ptr(), plane.announce(region)
        fut: asyncio.Future[None] = self._loop.create_future()
        if _trace.on:
            _trace.mark("send:post")
        if self._busy is not None:
            self._busy.kick()
        try:
            op = s.post_send(tag, dtype_name(src.dtype), tuple(src.shape), nbytes, dev, payload, pull_src,
                             offered.epoch, offered.gen, offered.desc or b"")
        except BaseException:
            if held is not None:
                held[0].release(held[1])
            recycle(ready)
            raise
        gcpause.begin()  # counted once posted: _ended ends it, whatever happens next
        p = PendingSend(self, fut, src, ready, held, on_end)
        op.context = p
        p.op = op
        self._flush()
        return p

    def _hold_frames(self, nbytes: int) -> None:
        """Before posting one operation of a burst (``Peer.batch``, a ``batch_isend_irecv``): its
        frames wait for the end of this loop turn and leave with the rest of the burst, in one
        write; the remote then handles them in one read and submits their copies together. A
        message above ``tuning.HOLD_BYTES`` is announced at once, with what is queued: its copy
        outlasts the burst's parsing, and holding its RTS only idles the device."""
        if nbytes <= tuning.HOLD_BYTES:
            self._conn.cork_turn()
        else:
            self._conn.uncork_turn()

    def _withdraw_send(self, p: PendingSend) -> None:
        """The caller gave up on a send: abort it, or stop its copies (idempotent)."""
        if p.op is None:  # it is over
            return
        if self._session.cancel_send(p.op):
            p.stop = True
            if p.job is not None:
                p.job.stop()
        elif p.op.state is SendState.FAILED:  # withdrawn before any copy: over now
            _set_exc(p.future, TransferCancelled(f"the send (tag {p.op.tag}) was withdrawn"))
            self._ended(p)
        self._flush()

    def _start_write(self, op: SendOp) -> None:
        """The receiver's CTS arrived: submit the copies now (no task on the common path)."""
        if _trace.on:
            _trace.mark("send:cts-in")
        p: PendingSend = op.context  # type: ignore[assignment]
        link = self._links.get(op.link)
        if link is not None and link.name == "cpu" and p.src.device.type == "cuda":
            self._spawn(self._stage_then_write(op, p, link))
            return
        if not _ready_now(p):
            self._spawn(self._wait_then_write(op, p))
            return
        self._submit(op, p, link)

    async def _wait_then_write(self, op: SendOp, p: PendingSend) -> None:
        await _ready(p)
        self._submit(op, p, self._links.get(op.link))

    async def _stage_then_write(self, op: SendOp, p: PendingSend, link: Link) -> None:
        await _ready(p)
        p.src = self._staging.to_host(p.src)  # the host link cannot read device memory: stage once
        self._submit(op, p, link)

    def _submit(self, op: SendOp, p: PendingSend, link: Link | None) -> None:
        region = None
        pieces: list[tuple[int, int, int]] = []
        try:
            if link is None:
                raise TransferFailed(f"the receiver asked for link {op.link!r}, which this peer lacks")
            if p.stop:
                raise TransferCancelled("cancelled before any byte was written")
            src = p.src
            plane = link.plane
            region = plane.prepare_local(src)
            pieces = plan_copies(src.data_ptr(), op.addr, op.nbytes, self.options.chunk_for(link.transport),
                                 op.capacity)
            target = plane.target(link.remote_segment, Announcement(op.epoch, op.gen, op.desc))
            if _trace.on:
                _trace.mark("send:submit")
            if plane.gathers(op.nbytes):
                self._gather.add(plane, src.get_device(), plane.route(target, pieces, False),
                                 WriteCopy(op, p, region, len(pieces)))
                return
            job = p.job = plane.write(target, pieces, self.options.window, src.get_device())
            self._jobs.add(job)
        except Exception as e:
            if region is not None and link is not None:
                link.plane.release(region)
            self._write_done(op, None, len(pieces), _as_error(e))
            return
        job.then(lambda: self._write_finished_cb(op, link.plane, region, len(pieces), job.future))

    # ---------------------------------------------------------- gathered copies
    def _gathered_done(self, job: Job | None, plane: DataPlane, copies: list[Copy],
                       error: BaseException | None) -> None:
        """A shared job settled (or never started: ``error``; a write stopped while queued, or a
        group the plane refused): end each of its messages."""
        if job is not None:
            error = job.future.exception()
        for c in copies:
            if isinstance(c, PullCopy):
                c.p.pull = None
                if c.op.state is RecvState.MATCHED:  # else whoever failed it reports that
                    self._pulled(c.op, c.p, error)
                elif c.p.withdrawn:  # withdrawn while its copy ran: over once it settled
                    self._ended(c.p)
            elif job is None:
                plane.release(c.region)
                c.p.job = None
                self._write_done(c.op, None, c.pieces, _as_error(error) if error is not None else None)
            else:
                self._write_finished_cb(c.op, plane, c.region, c.pieces, job.future)
        self._flush_soon()

    def _write_finished_cb(self, op: SendOp, plane: DataPlane, region: Any, n: int,
                           fut: asyncio.Future[None]) -> None:
        plane.release(region)
        p: PendingSend = op.context  # type: ignore[assignment]
        job = p.job
        if job is not None:
            self._jobs.discard(job)
        exc = fut.exception()
        if exc is not None and self._conn.closed is None and not self._closing:
            # A failed copy usually means the receiving process died, and its control connection
            # says so a moment later. Ask the peer for a sign of life before blaming the data
            # plane: the send then fails with PeerClosed if the peer is gone (at the latest after
            # the heartbeat timeout), with TransferFailed only if it answers.
            self._spawn(self._write_failed(op, job, n, _as_error(exc)))
            return
        self._write_done(op, job, n, _as_error(exc) if exc is not None else None)

    async def _write_failed(self, op: SendOp, job: Job | None, n: int, error: AiomooncakeError) -> None:
        alive = await self._conn.probe()
        p: PendingSend = op.context  # type: ignore[assignment]
        if alive and p.retries < _WRITE_RETRIES and not p.stop and op.state is SendState.WRITING:
            # The peer is alive, so the data plane failed: typically the engine reused a pooled
            # connection to a process that died, whose port a restarted peer now holds. The engine
            # closes a connection that failed, and pools at most MC_TCP_LANES_PER_PEER (4) per
            # address, so a few more attempts reach a fresh one. Writing every piece again is
            # harmless (same bytes, same place, and the receiver waits for DONE).
            p.retries += 1
            log.warning("write to %s failed (%s) while the peer is alive; retry %d of %d",
                        self.address, error, p.retries, _WRITE_RETRIES)
            self._submit(op, p, self._links.get(op.link))
            return
        self._write_done(op, job, n, error)

    def _write_done(self, op: SendOp, job: Job | None, n: int, error: AiomooncakeError | None) -> None:
        if error is None and job is not None and job.stopped and job.next < n:
            error = TransferCancelled("stopped before every byte was written")
        if _trace.on:
            _trace.mark("send:written")
        self._session.write_finished(op, error)
        self._flush_soon()

    # ================================================================== recv
    async def _recv(self, dest: torch.Tensor | None, device: torch.device | None, tag: int) -> torch.Tensor:
        return await self._post_recv(dest, device, tag).wait()

    def _post_recv(self, dest: torch.Tensor | None, device: torch.device | None, tag: int,
                   stream: Any = None, on_end: Callable[[PendingRecv], object] | None = None) -> PendingRecv:
        """Post a receive now (no task, no await); ``dest`` was checked by the caller."""
        if dest is None:
            spec, ready, stream = _ANY, None, None
        elif dest.is_cpu:
            spec, ready, stream = RecvSpec(dtype_name(dest.dtype), dest.numel()), None, None
        else:
            spec = RecvSpec(dtype_name(dest.dtype), dest.numel())
            if stream is None:
                stream = current_stream(dest.get_device())
            ready = record_ready(dest, stream)
        p = PendingRecv(self, self._loop.create_future(), dest, device, ready, stream, on_end)
        if _trace.on:
            _trace.mark("recv:post")
        if self._busy is not None:
            self._busy.kick()
        # post_recv may match at once; its events are only handled in _flush, after the handle is
        # attached.
        try:
            op = self._session.post_recv(tag, spec)
        except BaseException:
            recycle(ready)
            raise
        op.context = p
        p.op = op
        gcpause.begin()  # counted once posted (see _post_send)
        self._flush()
        return p

    def _withdraw_recv(self, p: PendingRecv) -> None:
        """Withdraw a receive (no await, idempotent): see :meth:`PendingRecv.withdraw`."""
        if p.withdrawn or p.op is None or (p.future.done() and not p.future.cancelled()):
            return
        p.withdrawn = True
        p.future.cancel()
        must_wait = self._session.cancel_recv(p.op)
        p.released = self._loop.create_future() if must_wait else None
        self._flush()
        if p.pull is not None:  # our own pull: stop it (cancel waits for the copies in flight)
            p.pull.stop()
        elif not must_wait and p.op is not None and p.op.state is RecvState.FAILED:
            self._ended(p)  # withdrawn before any byte could land in it

    async def _cancel_recv(self, p: PendingRecv) -> None:
        if p.future.done() and not p.future.cancelled():
            return  # it completed (or failed) before the cancellation reached it
        self._withdraw_recv(p)
        if p.pull is not None:  # let our own copies in flight land now
            await self._after_pull(p)
        if p.released is None:
            self._release(p)
            return
        try:
            await asyncio.wait_for(asyncio.shield(p.released), self.options.cancel_timeout)
        except asyncio.TimeoutError:
            log.error("%s did not confirm it stopped writing into a cancelled recv within %g s; "
                      "closing the connection", self.address, self.options.cancel_timeout)
            self._conn.close(PeerClosed("the peer did not answer a cancellation"))

    def _matched(self, op: RecvOp) -> None:
        if _trace.on:
            _trace.mark("recv:matched")
        p: PendingRecv = op.context  # type: ignore[assignment]
        msg = op.msg
        assert msg is not None
        try:
            if p.dest is None:
                dev = p.device
                if dev is None:
                    on_gpu = getattr(msg, "device", "cpu") == "cuda" and torch.cuda.is_available()
                    dev = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
                p.work = torch.empty(msg.shape, dtype=dtype_from_name(msg.dtype), device=dev)
                if dev.type == "cuda":
                    p.stream = current_stream(p.work.get_device())
                    # the allocator may hand out a block whose last user's kernels are still queued
                    # on this stream (safe for stream work, not for a remote writer): wait for them
                    p.ready = record_ready(p.work)
            else:
                p.work = p.dest if p.dest.is_contiguous() else torch.empty(
                    p.dest.shape, dtype=p.dest.dtype, device=p.dest.device)
        except AiomooncakeError as e:
            self._session.refuse(op, e)
            return
        except Exception as e:
            self._session.refuse(op, TransferFailed(f"could not allocate the destination: {e}"))
            return
        sent = len(msg.data) if isinstance(msg, Eager) else msg.nbytes
        if sent != p.work.nbytes:
            self._session.refuse(op, MessageMismatch(
                f"the sender announced {sent} B for {msg.shape} of {msg.dtype}, which needs "
                f"{p.work.nbytes} B; nothing was written"))
            return
        if isinstance(msg, Eager):
            if p.work.is_cpu:
                fill_from_bytes(p.work, msg.data)
            else:
                try:
                    recycle(p.ready)  # ordered on the caller's stream: nothing to wait for here
                    p.ready = None
                    fill_device(p.work, p.stream, msg.data)
                except Exception as e:
                    self._session.refuse(op, TransferFailed(f"could not copy into the destination: {e}"))
                    return
            self._session.delivered(op)
            return
        local = "cpu" if p.work.is_cpu else "cuda"
        link = self._links[link_for(local, msg.device, self._links)]
        # The sender offered its source and this side copies on that link: pull it (else CTS).
        if msg.src and link.pulls and msg.device == link.name:
            if _ready_now(p):
                self._pull(op, p, link)
            else:
                self._spawn(self._when_ready(op, p, lambda: self._pull(op, p, link)))
        elif _ready_now(p):
            self._accept(op, p)
        else:
            self._spawn(self._when_ready(op, p, lambda: self._accept(op, p)))

    async def _when_ready(self, op: RecvOp, p: PendingRecv, then: Callable[[], None]) -> None:
        """Run ``then`` (accept or pull) once earlier work on the caller's stream, which may still
        use the buffer, is done, if the receive is still matched."""
        try:
            await _ready(p)
        finally:
            if op.state is RecvState.MATCHED:
                then()
            self._flush()

    def _pull(self, op: RecvOp, p: PendingRecv, link: Link) -> None:
        """Copy the source the sender offered (on ``link``) straight into the destination (sizes
        were checked on match); if the plane fails, fall back to the CTS, so the sender writes."""
        if _trace.on:
            _trace.mark("pull:start")
        msg = op.msg
        work = p.work
        assert isinstance(msg, Rts) and work is not None
        plane = link.plane
        try:
            p.region = (plane, plane.prepare_local(work))
            target = plane.target(link.remote_segment, Announcement(msg.epoch, msg.gen, msg.desc))
            n = msg.nbytes  # (== work.nbytes: checked on match)
            pieces = plan_copies(work.data_ptr(), msg.src, n, self.options.chunk_for(link.transport))
            if plane.gathers(n):
                self._gather.add(plane, work.get_device(), plane.route(target, pieces, True), PullCopy(op, p))
                return
            job = plane.pull(target, pieces, self.options.window, work.get_device())
        except Exception as e:
            self._pulled(op, p, e)
            return
        if job.future.done():  # copied on the spot (a small same-host pull): no loop turn
            self._pulled(op, p, job.future.exception())
            return
        p.pull = job
        job.then(lambda: self._pull_settled(op, p, job.future))

    def _pull_settled(self, op: RecvOp, p: PendingRecv, fut: asyncio.Future[None]) -> None:
        """A pull settled. If the receive failed or was cancelled meanwhile, whoever stopped the
        pull reports that (once it settled: nothing lands after the failure)."""
        p.pull = None
        error = fut.exception() if not fut.cancelled() else TransferFailed("the pull was cancelled")
        if op.state is RecvState.MATCHED:
            self._pulled(op, p, error)
            self._flush_soon()
        elif p.withdrawn:  # withdrawn while it copied: over once it settled
            self._ended(p)

    def _pulled(self, op: RecvOp, p: PendingRecv, error: BaseException | None) -> None:
        """Complete a matched receive whose pull ended; if the copy failed, fall back to the CTS,
        so the sender writes instead."""
        if error is None:
            if _trace.on:
                _trace.mark("recv:pulled")
            self._session.pulled(op)
        else:
            log.debug("pull from %s failed (%s); asking the sender to write", self.address, error)
            self._release(p)
            self._accept(op, p)

    async def _after_pull(self, p: PendingRecv) -> None:
        """Stop a pull still copying into a receive that just failed, and wait until it settled."""
        job = p.pull
        if job is not None:
            job.stop()
            await asyncio.wait([job.future])

    def _accept(self, op: RecvOp, p: PendingRecv) -> None:
        assert p.work is not None and op.msg is not None
        work = p.work
        link_name = link_for(work.device.type, getattr(op.msg, "device", "cpu"), self._links)
        if link_name == "cpu" and work.device.type == "cuda":
            p.device_work = work
            work = p.work = torch.empty(work.shape, dtype=work.dtype)  # staged through host memory
        link = self._links[link_name]
        plane = link.plane
        shared = self._shared
        try:
            region = plane.acquire(work) if shared is None else shared.acquire(plane, work)
        except AiomooncakeError as e:
            self._session.refuse(op, e)
            return
        except Exception as e:
            self._session.refuse(op, TransferFailed(f"could not register the destination: {e}"))
            return
        p.region = (plane, region)
        if _trace.on:
            _trace.mark("recv:cts")
        ann = plane.announce(region)
        self._session.accept(op, link_name, work.data_ptr(), work.nbytes, ann.epoch, ann.gen, ann.desc or b"")
        if link_name == "cuda" and self._busy is not None:
            # The DONE follows the sender's device write (~90 us per 100 MB, queued behind its other
            # writes): stay awake for it. Not on host links, whose planes need the CPU we would spin.
            self._busy.expect(0.001 + work.nbytes / 50e9)

    def _completed(self, op: RecvOp) -> None:
        if _trace.on:
            _trace.mark("recv:done")
        p: PendingRecv = op.context  # type: ignore[assignment]
        self._release(p)
        work = p.work
        assert work is not None
        try:
            staged = p.device_work
            if staged is not None:
                with torch.cuda.stream(p.stream):
                    staged.copy_(work, non_blocking=False)
                work = staged
            result = work
            if p.dest is not None and work is not p.dest:
                if p.dest.device.type == "cuda":
                    with torch.cuda.stream(p.stream):
                        p.dest.copy_(work)
                else:
                    p.dest.copy_(work)
                result = p.dest
        except Exception as e:
            _set_exc(p.future, TransferFailed(f"could not copy into the destination: {e}"))
            return
        if not p.future.done():
            p.future.set_result(result)

    def _release_or_quarantine(self, p: PendingRecv) -> None:
        """Release a failed receive's memory, unless the connection died while the sender may still
        be writing into it (its CTS went out): then it is quarantined (see :mod:`.quarantine`)."""
        if p.region is None or self._session.closed is None or p.op is None or not p.op.link:
            self._release(p)  # also a pull's: our own copies, stopped and settled, wrote the bytes
            return
        quarantine.hold(self.quarantine_s, p.region, (p.work, p.dest, p.device_work))
        p.region = None
        p.device_work = None
        log.info("the connection to %s died during a receive of %d B: its memory stays registered "
                 "for %g s in case the remote's writes still land", self.address,
                 p.work.nbytes if p.work is not None else 0, self.quarantine_s)

    def _release(self, p: PendingRecv) -> None:
        if p.region is not None:
            plane, region = p.region
            p.region = None
            plane.release(region)

    # ============================================================ plumbing
    def _lookups(self) -> None:
        """Share exposure lookups until the end of this loop turn (a burst is being posted)."""
        if self._shared is None:
            shared = self._shared = Shared()
            self._loop.call_soon(self._drop_lookups, shared)

    def _drop_lookups(self, shared: Shared) -> None:
        if self._shared is shared:
            self._shared = None

    def _read_begin(self) -> None:
        """A socket read brought several messages (a burst's frames): the receives they match look
        up each allocation once (see :mod:`.burst`), and the plane takes their copies together."""
        if self._poller_hooks is not None:
            self._poller_hooks[0]()
        if self._shared is None:
            self._shared = self._read_shared = Shared()

    def _read_end(self) -> None:
        if self._read_shared is not None and self._shared is self._read_shared:
            self._shared = None
        self._read_shared = None
        if self._poller_hooks is not None:
            self._poller_hooks[1]()

    def _on_message(self, msg: Message) -> None:
        self._session.receive(msg)
        self._flush()

    def _on_lost(self, error: AiomooncakeError) -> None:
        self._session.close(error if isinstance(error, PeerClosed) else PeerClosed(str(error)))
        self._flush()
        for waiters in self._arrivals.values():
            for f in waiters:
                if not f.done():
                    f.set_result(None)

    def _flush_soon(self) -> None:
        """Flush at the end of this loop turn: the copies of one burst complete together (one
        event, one poller round), and their ACKs and DONEs then leave in one write."""
        if not self._flush_due:
            self._flush_due = True
            self._loop.call_soon(self._flush_later)

    def _flush_later(self) -> None:
        self._flush_due = False
        self._flush()

    def _flush(self) -> None:
        s = self._session
        while s.outbox or s.events:
            if s.outbox:
                out, s.outbox = s.outbox, []
                self._conn.send_many(out)
            if s.events:
                events, s.events = s.events, []
                for ev in events:
                    self._dispatch(ev)

    def _dispatch(self, ev: object) -> None:
        t = type(ev)
        if t is SendComplete:
            sp: PendingSend = ev.op.context  # type: ignore[attr-defined]
            _drop_held(sp)
            if not sp.future.done():
                sp.future.set_result(None)
            self._ended(sp)
        elif t is RecvMatched:
            self._matched(ev.op)  # type: ignore[attr-defined]
        elif t is RecvComplete:
            self._completed(ev.op)  # type: ignore[attr-defined]
            self._ended(ev.op.context)  # type: ignore[attr-defined]
        elif t is WriteRequested:
            self._start_write(ev.op)  # type: ignore[attr-defined]
        elif isinstance(ev, SendFailed):
            fp: PendingSend = ev.op.context  # type: ignore[assignment]
            _drop_held(fp)
            _set_exc(fp.future, ev.error)
            self._ended(fp)
        elif isinstance(ev, StopWriting):
            wp: PendingSend = ev.op.context  # type: ignore[assignment]
            wp.stop = True
            if wp.job is not None:
                wp.job.stop()
        elif isinstance(ev, RecvFailed):
            rp: PendingRecv = ev.op.context  # type: ignore[assignment]
            if rp.pull is not None:  # our own copies still land in it: fail once they stopped
                self._spawn(self._fail_after_pull(rp, ev.error))
                return
            self._release_or_quarantine(rp)
            _set_exc(rp.future, ev.error)
            self._ended(rp)
        elif isinstance(ev, RecvReleased):
            rp = ev.op.context  # type: ignore[assignment]
            self._release_or_quarantine(rp)
            if rp.released is not None and not rp.released.done():
                rp.released.set_result(None)
            self._ended(rp)
        elif isinstance(ev, MessageArrived):
            for f in self._arrivals.pop(ev.tag, []):
                if not f.done():
                    f.set_result(None)

    async def _fail_after_pull(self, p: PendingRecv, error: AiomooncakeError) -> None:
        await self._after_pull(p)
        self._release_or_quarantine(p)
        _set_exc(p.future, error)
        self._ended(p)

    def _ended(self, p: PendingSend | PendingRecv) -> None:
        """``p``'s operation is over (once): no cycle (op.context <-> p.op) keeps its tensor alive
        any more, the collector's pause no longer counts it, and its ``on_end`` runs."""
        if p.op is None:
            return
        p.op = None
        gcpause.end()
        cb = p.on_end
        if cb is not None:
            p.on_end = None
            cb(p)  # type: ignore[arg-type]

    def _spawn(self, coro: Any) -> None:
        task = self._loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _check_recv_dest(self, tensor: torch.Tensor) -> None:
        self._check_tensor(tensor, "recv into")
        why = unwritable(tensor)
        if why is not None:
            raise ConfigurationError(f"cannot recv into this tensor: {why}; receive into a writable "
                                     "tensor (e.g. torch.empty) or use recv_tensor()")

    def _check_tensor(self, t: Any, what: str) -> str:
        """Validate a tensor argument; return its device kind ("cpu" or "cuda")."""
        if not isinstance(t, torch.Tensor):
            raise ConfigurationError(f"cannot {what} a {type(t).__name__}: pass a torch.Tensor")
        if t.layout is not torch.strided:
            raise ConfigurationError(f"cannot {what} a {t.layout} tensor: only dense (strided) tensors")
        if t.is_quantized:
            raise ConfigurationError(f"cannot {what} a quantized tensor ({t.dtype}): its quantizer (scale, "
                                     "zero point) does not travel; send t.int_repr() and the quantizer "
                                     "parameters instead")
        if t.is_cpu:  # flags; t.device builds a torch.device object (0.3 us)
            return "cpu"
        if not t.is_cuda:
            raise ConfigurationError(f"cannot {what} a tensor on {t.device}: use a cpu or cuda tensor")
        if "cuda" not in self._links:
            raise ConfigurationError("this peer has no CUDA link")
        return "cuda"

    async def _with_timeout(self, coro: Any, timeout: float | None, what: str, tag: int) -> torch.Tensor:
        if timeout is None:
            return await coro  # type: ignore[no-any-return]
        try:
            return await asyncio.wait_for(coro, timeout)
        except asyncio.TimeoutError:
            raise Timeout(
                f"{what} (tag {tag}) from {self.address} did not finish within {timeout:g} s") from None


def _settled(ev: ReadyMark) -> bool:
    """Whether the caller's stream passed ``ev``; if so the event goes back to the pool (the
    caller drops its reference)."""
    if not ev.query():
        return False
    recycle(ev)
    return True


def _ready_now(p: PendingSend | PendingRecv) -> bool:
    """Whether the work queued on the caller's stream before the operation is done; if so the
    event goes back to the pool (once: ``p.ready`` is cleared)."""
    ev = p.ready
    if ev is not None:
        if not _settled(ev):
            return False
        p.ready = None
    return True


async def _ready(p: PendingSend | PendingRecv) -> None:
    """Wait (without blocking the loop) until :func:`_ready_now` holds."""
    ev = p.ready
    await wait_event(ev)
    p.ready = None
    recycle(ev)


def _drop_held(p: PendingSend) -> None:
    """Release the exposure a pull offer held (once: the send is over)."""
    held, p.held = p.held, None
    if held is not None:
        held[0].release(held[1])


def _as_error(e: BaseException) -> AiomooncakeError:
    if isinstance(e, AiomooncakeError):
        return e
    log.error("copy failed: %s: %s", type(e).__name__, e)
    return TransferFailed(f"{type(e).__name__}: {e}")


def _own_copy(exc: BaseException) -> BaseException:
    """A copy of an error shared by many operations (the connection's), for one of them to raise.
    Raising attaches the raiser's frames to the exception; raising one shared instance would keep
    every failed call's frames, and the tensors in them, alive as long as the peer object."""
    dup = copy.copy(exc)
    dup.__cause__ = exc.__cause__
    return dup


def _set_exc(fut: asyncio.Future[Any], exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(_own_copy(exc))
        fut.exception()  # mark retrieved: a cancelled caller must not cause "never retrieved" noise


__all__ = ["MessageMismatch", "Peer"]
