"""The public ``Peer``: awaitable tensor send and receive over one connection.

The peer glues the pure :class:`~aiomooncake.core.session.Session` to I/O: it feeds control frames
in, writes the frames the session emits, and acts on its events (registering memory, driving the
engine's writes, copying eager payloads, resolving the callers' futures).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import ctypes
import errno
import logging
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from . import _trace, gcpause
from .batch import Batch
from .core.chunks import check_write, plan_chunks
from .core.messages import Eager, Message, Rts
from .core.regions import Region
from .core.session import (
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
from .engine import HOLD_BYTES, Engine, WriteJob
from .engine import poller as engine_poller
from .errors import (
    AiomooncakeError,
    ConfigurationError,
    MessageMismatch,
    PeerClosed,
    Timeout,
    TransferCancelled,
    TransferFailed,
)
from .options import Options
from .shm import ShmEngine, ShmJob
from .tensors import (
    ReadyMark,
    byte_view,
    current_stream,
    dtype_from_name,
    dtype_name,
    fill_from_bytes,
    record_ready,
    recycle,
    to_bytes,
    wait_event,
)
from .transport.busypoll import BusyPoller
from .transport.connection import Connection
from .transport.handshake import Agreement, Link

log = logging.getLogger(__name__)

_ANY = RecvSpec()


@dataclass(eq=False, slots=True)
class _SendCtx:
    fut: asyncio.Future[None]
    src: torch.Tensor
    ready: ReadyMark | None
    stop: bool = False
    job: WriteJob | None = None
    retries: int = 0
    held: tuple[Engine, Region] | None = None  # our source's registration, offered for a pull


@dataclass(eq=False, slots=True)
class _RecvCtx:
    fut: asyncio.Future[torch.Tensor]
    dest: torch.Tensor | None  # what the caller gave (None for recv_tensor)
    device: torch.device | None  # recv_tensor's requested device
    ready: ReadyMark | None
    stream: Any = None  # the caller's current CUDA stream at post time
    work: torch.Tensor | None = None  # contiguous tensor the bytes land in
    region: tuple[Engine, Region] | None = None
    released: asyncio.Future[None] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    pull: ShmJob | WriteJob | None = None  # a pull into ``work`` still copying


class Peer:
    """One connected remote process. Create with :func:`aiomooncake.connect` or
    :meth:`Listener.accept`; use ``async with peer:`` to close it."""

    quarantine_s = 60.0  # how long memory a dead peer may still write into is held (see below)
    one_copier = True  # peers sharing one GPU let one of them run every copy (see __init__)
    # Small CUDA tensors whose producer is done travel in the frame (see _post_send); None: unless
    # the two peers share a GPU, where the host copies that costs in both processes measured slower
    # than the one copier's engine copy (H200, scripts/gpu_ab.py: 4 KiB round trip 776 against
    # 599 us, EPLB 93 against 124 GB/s).
    inline_cuda: bool | None = None

    def __init__(self, conn: Connection, agreement: Agreement, options: Options) -> None:
        self._conn = conn
        self._opts = options
        self._links: dict[str, Link] = agreement.links
        self.remote_info: dict[str, Any] = agreement.remote
        # Never send an eager frame larger than the peer accepts.
        remote_cap = agreement.remote.get("max_frame")
        eager = options.eager_threshold
        if isinstance(remote_cap, int) and remote_cap > 1024:
            eager = min(eager, remote_cap - 1024)
        # Same-host CPU link: a rendezvous offers its source's address and the receiver pulls it
        # (RTS, ACK instead of RTS, CTS, write, DONE); no other process writes into our memory.
        # Above shm_eager_threshold that one copy beats the eager frame's several.
        cpu = self._links.get("cpu")
        self._pull: Link | None = cpu if cpu is not None and isinstance(cpu.engine, ShmEngine) else None
        if self._pull is not None:
            eager = min(eager, options.shm_eager_threshold)
        self._session = Session(eager_threshold=eager)
        # Two processes on one GPU: every copy the GPU runs for another process's context costs a
        # context switch when both issue copies (measured on an H100: te-raw's EPLB exchange at
        # 0.07x of a device copy). So one of the two (the lower engine segment) runs every copy
        # between them: its sends write, its receives pull the source the other offers in its RTS.
        cuda = self._links.get("cuda")
        remote_gpu = agreement.remote.get("gpu")
        self._copier = self._offer_gpu = False
        if (self.one_copier and cuda is not None and cuda.transport == "nvlink"
                and isinstance(remote_gpu, str) and remote_gpu == agreement.local.get("gpu")):
            self._copier = cuda.engine.segment < cuda.remote_segment
            self._offer_gpu = not self._copier
        self._loop = asyncio.get_running_loop()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._arrivals: dict[int, list[asyncio.Future[None]]] = {}
        self._side_streams: dict[int, Any] = {}
        self._staging: dict[int, torch.Tensor] = {}  # pinned buffer per device for inline CUDA sends
        self._closing = False
        self._jobs: set[WriteJob] = set()  # engine writes in flight from this peer
        self._engines = {id(link.engine): link.engine for link in self._links.values()}
        for eng in self._engines.values():
            eng.attach()
        self._detached = False
        _prune_quarantine()
        self._busy = conn.busy = BusyPoller.for_loop(options.busy_poll)
        remote_busy = agreement.remote.get("busy_poll")  # absent from older peers: assume sleeping
        conn.ack_now = not options.hold_acks or (isinstance(remote_busy, (int, float)) and remote_busy > 0)
        if any(e.in_order for e in self._engines.values()):
            # The copies that the RTS and CTS frames of one socket read start go to the engine in
            # batches: on the NVLink transport about half the cost per request of lone submits.
            p = engine_poller()
            conn.burst_hooks = (p.hold, p.release)
        conn.start(self._on_message, self._on_lost, options.heartbeat_interval, options.heartbeat_timeout)
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
        return {name: _plane_name(link.transport) for name, link in self._links.items()}

    @property
    def data_path(self) -> str:
        """The data plane this peer's tensors take: that of CUDA tensors when both sides can
        exchange them directly, else that of CPU tensors (see :attr:`data_paths`)."""
        paths = self.data_paths
        cuda = self._links.get("cuda")
        if cuda is not None and cuda.transport == "nvlink":
            return paths["cuda"]
        return paths["cpu"]

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
        if timeout is None:
            return await self._recv(tensor, None, tag)
        return await self._with_timeout(self._recv(tensor, None, tag), timeout, "recv", tag)

    async def recv_tensor(self, tag: int = 0, device: torch.device | str | None = None, *,
                          timeout: float | None = None) -> torch.Tensor:
        """Receive the next message with ``tag`` into a new tensor of the sender's shape and dtype.

        ``device=None`` allocates on CUDA (the current device) when the sender's tensor was on CUDA
        and this process has CUDA, else on the CPU."""
        dev = torch.device(device) if device is not None else None
        return await self._with_timeout(self._recv(None, dev, tag), timeout, "recv_tensor", tag)

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
        """Before the BYE: fail every pending operation here and let our engine writes settle, so
        the remote's receives fail only once no byte of ours can land in them any more. Also when
        the connection is already lost: the engine may still be finishing writes into the dead
        peer, and returning before they settle would leave their memory registered as in use."""
        if not self._jobs:
            return
        if self._conn.closed is None:
            self._session.close(PeerClosed(f"the connection to {self.address} was closed locally"))
            self._flush()  # StopWriting: nothing more is submitted
        futs = [j.future for j in self._jobs]
        _, pending = await asyncio.wait(futs, timeout=self._opts.cancel_timeout)
        if pending:
            log.warning("closing %s with %d engine writes still in flight after %g s", self.address,
                        len(pending), self._opts.cancel_timeout)

    def _detach(self) -> None:
        _prune_quarantine()
        if not self._detached:
            self._detached = True
            for eng in self._engines.values():
                eng.detach()

    async def __aenter__(self) -> Peer:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"<Peer {self.address} {state} {self.transports}>"

    # ================================================================== send
    async def _send(self, tensor: torch.Tensor, tag: int) -> None:
        if self._conn._paused is not None:
            try:
                await self._conn.drain()
            except AiomooncakeError as e:
                raise _own_copy(e) from None
        fut, op, ctx = self._post_send(tensor, tag)
        try:
            await fut
        except asyncio.CancelledError:
            # Task.cancel() cancelled fut itself: a cancelled fut still needs withdrawing.
            if not fut.done() or fut.cancelled():
                self._withdraw_send(op, ctx)
            raise

    def _post_send(self, tensor: torch.Tensor, tag: int) -> tuple[asyncio.Future[None], SendOp, _SendCtx]:
        """Post a send now (no task, no await): the future completes once the bytes are in the
        receiver's tensor. Withdraw it with :meth:`_withdraw_send`."""
        dev = self._check_tensor(tensor, "send")
        src = tensor if tensor.is_contiguous() else tensor.contiguous()
        ready = record_ready(src) if dev == "cuda" else None
        nbytes = src.nbytes
        s = self._session
        # A small CUDA tensor goes inline only if the work queued on the caller's stream before the
        # send is already done: its bytes then come to the host at once (one small copy on a side
        # stream) and travel in the frame, with no rendezvous and no engine operation. If that work
        # still runs, the send takes the rendezvous path, whose engine copy waits for it in order:
        # waiting here would hold the post back, and a later send on the same tag could overtake it.
        payload = None
        pull_src = epoch = gen = 0
        held = None
        if nbytes <= s.eager_threshold and (ready is None or nbytes == 0):
            payload = to_bytes(src) if ready is None else b""
            recycle(ready)
            ready = None
        elif (ready is not None and nbytes <= s.eager_threshold and self._inline_cuda()
              and _settled(ready)):
            ready = None
            payload = self._device_bytes(src)
        elif ready is None and self._pull is not None:
            pull_src = src.data_ptr()
        elif self._offer_gpu and ready is not None and _settled(ready):
            # the producer is done: offer the source for the remote copier to pull
            ready = None
            eng = self._links["cuda"].engine
            held = (eng, eng.acquire(src))
            pull_src, epoch, gen = src.data_ptr(), eng.epoch, eng.gen
        fut: asyncio.Future[None] = self._loop.create_future()
        if _trace.on:
            _trace.mark("send:post")
        if self._busy is not None:
            self._busy.kick()
        try:
            op = s.post_send(tag, dtype_name(src.dtype), tuple(src.shape), nbytes, dev, payload, pull_src,
                             epoch, gen)
        except BaseException:
            if held is not None:
                held[0].release(held[1])
            recycle(ready)
            raise
        gcpause.track(fut)  # counted once posted: fut completes, and so ends it, whatever happens next
        op.context = ctx = _SendCtx(fut, src, ready, held=held)
        self._flush()
        return fut, op, ctx

    def _inline_cuda(self) -> bool:
        return self.inline_cuda if self.inline_cuda is not None else not (self._copier or self._offer_gpu)

    def _device_bytes(self, src: torch.Tensor) -> bytes:
        """The bytes of a small CUDA tensor whose producer is done: copied on our side stream (it
        waits for nothing else) through a pinned buffer of this peer's."""
        n = src.nbytes
        idx = src.get_device()
        host = self._staging.get(idx)
        if host is None or host.numel() < n:
            host = self._staging[idx] = torch.empty(max(n, self._session.eager_threshold),
                                                    dtype=torch.uint8, pin_memory=True)
        side = self._side_stream(src.device)
        with torch.cuda.stream(side):
            host[:n].copy_(byte_view(src), non_blocking=True)
        side.synchronize()
        return ctypes.string_at(host.data_ptr(), n)

    def _batch_frames(self, nbytes: int) -> None:
        """Before posting one operation of a burst (``Peer.batch``, a ``batch_isend_irecv``): its
        frames wait for the end of this loop turn and leave with the rest of the burst, in one
        write; the remote then handles them in one read and submits their copies in shared engine
        batches. A message above ``HOLD_BYTES`` is announced at once, with what is queued: its
        copy outlasts the burst's parsing, and holding its RTS only idles the GPU."""
        if nbytes <= HOLD_BYTES:
            self._conn.cork_turn()
        else:
            self._conn.uncork_turn()

    def _withdraw_send(self, op: SendOp, ctx: _SendCtx) -> None:
        """The caller gave up on a send: abort it, or stop its writes (idempotent)."""
        if self._session.cancel_send(op):
            ctx.stop = True
            if ctx.job is not None:
                ctx.job.stop()
        self._flush()

    def _start_write(self, op: SendOp) -> None:
        """The receiver's CTS arrived: submit the engine writes now (no task on the common path)."""
        if _trace.on:
            _trace.mark("send:cts-in")
        ctx: _SendCtx = op.context  # type: ignore[assignment]
        link = self._links.get(op.link)
        if link is not None and link.name == "cpu" and ctx.src.device.type == "cuda":
            self._spawn(self._stage_then_write(op, ctx, link))
            return
        if not _ready_now(ctx):
            self._spawn(self._wait_then_write(op, ctx))
            return
        self._submit(op, ctx, link)

    async def _wait_then_write(self, op: SendOp, ctx: _SendCtx) -> None:
        await _ready(ctx)
        self._submit(op, ctx, self._links.get(op.link))

    async def _stage_then_write(self, op: SendOp, ctx: _SendCtx, link: Link) -> None:
        await _ready(ctx)
        with torch.cuda.stream(self._side_stream(ctx.src.device)):
            ctx.src = ctx.src.cpu()  # the host link cannot read device memory: stage once
        self._submit(op, ctx, link)

    def _submit(self, op: SendOp, ctx: _SendCtx, link: Link | None) -> None:
        region = None
        pieces: list[tuple[int, int, int]] = []
        try:
            if link is None:
                raise TransferFailed(f"the receiver asked for link {op.link!r}, which this peer lacks")
            if ctx.stop:
                raise TransferCancelled("cancelled before any byte was written")
            src = ctx.src
            region = link.engine.acquire(src)
            base = src.data_ptr()
            pieces = [(base + c.offset, check_write(op.addr, op.capacity, c), c.length)
                      for c in plan_chunks(op.nbytes, self._opts.chunk_for(link.transport))]
            target = link.engine.target(link.remote_segment, op.epoch, op.gen)
            if _trace.on:
                _trace.mark("send:submit")
            job = ctx.job = link.engine.write(target, pieces, self._opts.window, src.get_device())
            self._jobs.add(job)
        except Exception as e:
            if region is not None and link is not None:
                link.engine.release(region)
            self._write_done(op, None, len(pieces), _as_error(e))
            return
        job.future.add_done_callback(
            lambda f: self._write_finished_cb(op, link, region, len(pieces), f))

    def _write_finished_cb(self, op: SendOp, link: Link, region: Region, n: int,
                           fut: asyncio.Future[None]) -> None:
        link.engine.release(region)
        job: WriteJob | None = op.context.job  # type: ignore[attr-defined]
        self._jobs.discard(job)
        exc = fut.exception()
        if exc is not None and self._conn.closed is None and not self._closing:
            # A failed engine write usually means the receiving process died, and its control
            # connection says so a moment later. Ask the peer for a sign of life before blaming the
            # data plane: the send then fails with PeerClosed if the peer is gone (at the latest
            # after the heartbeat timeout), with TransferFailed only if it answers.
            self._spawn(self._write_failed(op, job, n, _as_error(exc)))
            return
        self._write_done(op, job, n, _as_error(exc) if exc is not None else None)

    async def _write_failed(self, op: SendOp, job: WriteJob | None, n: int, error: AiomooncakeError) -> None:
        alive = await self._conn.probe()
        ctx: _SendCtx = op.context  # type: ignore[assignment]
        if alive and ctx.retries < _WRITE_RETRIES and not ctx.stop and op.state is SendState.WRITING:
            # The peer is alive, so the data plane failed: typically the engine reused a pooled
            # connection to a process that died, whose port a restarted peer now holds. The engine
            # closes a connection that failed, and pools at most MC_TCP_LANES_PER_PEER (4) per
            # address, so a few more attempts reach a fresh one. Writing every piece again is
            # harmless (same bytes, same place, and the receiver waits for DONE).
            ctx.retries += 1
            log.warning("engine write to %s failed (%s) while the peer is alive; retry %d of %d",
                        self.address, error, ctx.retries, _WRITE_RETRIES)
            self._submit(op, ctx, self._links.get(op.link))
            return
        self._write_done(op, job, n, error)

    def _write_done(self, op: SendOp, job: WriteJob | None, n: int, error: AiomooncakeError | None) -> None:
        if error is None and job is not None and job.stopped and job.next < n:
            error = TransferCancelled("stopped before every byte was written")
        if _trace.on:
            _trace.mark("send:written")
        self._session.write_finished(op, error)
        self._flush()

    # ================================================================== recv
    async def _recv(self, dest: torch.Tensor | None, device: torch.device | None, tag: int) -> torch.Tensor:
        fut, op, ctx = self._post_recv(dest, device, tag)
        return await self._recv_posted(fut, op, ctx)

    async def _recv_posted(self, fut: asyncio.Future[torch.Tensor], op: RecvOp,
                           ctx: _RecvCtx) -> torch.Tensor:
        """Await a posted receive; cancelled, withdraw it and return only once its buffer is safe."""
        try:
            return await fut
        except asyncio.CancelledError:
            await self._cancel_recv(op, ctx)
            raise

    def _post_recv(self, dest: torch.Tensor | None, device: torch.device | None,
                   tag: int) -> tuple[asyncio.Future[torch.Tensor], RecvOp, _RecvCtx]:
        """Post a receive now (no task, no await); ``dest`` was checked by the caller."""
        if dest is None:
            spec, ready, stream = _ANY, None, None
        elif dest.is_cpu:
            spec, ready, stream = RecvSpec(dtype_name(dest.dtype), dest.numel()), None, None
        else:
            spec = RecvSpec(dtype_name(dest.dtype), dest.numel())
            ready = record_ready(dest)
            stream = current_stream(dest.get_device())
        ctx = _RecvCtx(self._loop.create_future(), dest, device, ready, stream)
        if self._busy is not None:
            self._busy.kick()
        # post_recv may match at once; its events are only handled in _flush, after the context
        # is attached.
        try:
            op = self._session.post_recv(tag, spec)
        except BaseException:
            recycle(ready)
            raise
        op.context = ctx
        gcpause.track(ctx.fut)  # counted once posted (see _post_send)
        self._flush()
        return ctx.fut, op, ctx

    async def _cancel_recv(self, op: RecvOp, ctx: _RecvCtx) -> None:
        if ctx.fut.done() and not ctx.fut.cancelled():
            return  # it completed (or failed) before the cancellation reached it
        must_wait = self._session.cancel_recv(op)
        ctx.released = self._loop.create_future() if must_wait else None
        self._flush()
        if ctx.pull is not None:  # our own pull: stop it and let the copies in flight land now
            await self._after_pull(ctx)
        if ctx.released is None:
            self._release(ctx)
            return
        try:
            await asyncio.wait_for(asyncio.shield(ctx.released), self._opts.cancel_timeout)
        except asyncio.TimeoutError:
            log.error("%s did not confirm it stopped writing into a cancelled recv (tag %s) within "
                      "%g s; closing the connection", self.address, op.tag, self._opts.cancel_timeout)
            self._conn.close(PeerClosed("the peer did not answer a cancellation"))

    def _matched(self, op: RecvOp) -> None:
        if _trace.on:
            _trace.mark("recv:matched")
        ctx: _RecvCtx = op.context  # type: ignore[assignment]
        msg = op.msg
        assert msg is not None
        try:
            if ctx.dest is None:
                dev = ctx.device
                if dev is None:
                    on_gpu = getattr(msg, "device", "cpu") == "cuda" and torch.cuda.is_available()
                    dev = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
                ctx.work = torch.empty(msg.shape, dtype=dtype_from_name(msg.dtype), device=dev)
                if dev.type == "cuda":
                    ctx.stream = current_stream(ctx.work.get_device())
                    # the allocator may hand out a block whose last user's kernels are still queued
                    # on this stream (safe for stream work, not for a remote writer): wait for them
                    ctx.ready = record_ready(ctx.work)
            else:
                ctx.work = ctx.dest if ctx.dest.is_contiguous() else torch.empty(
                    ctx.dest.shape, dtype=ctx.dest.dtype, device=ctx.dest.device)
        except AiomooncakeError as e:
            self._session.refuse(op, e)
            return
        except Exception as e:
            self._session.refuse(op, TransferFailed(f"could not allocate the destination: {e}"))
            return
        sent = len(msg.data) if isinstance(msg, Eager) else msg.nbytes
        if sent != ctx.work.nbytes:
            self._session.refuse(op, MessageMismatch(
                f"the sender announced {sent} B for {msg.shape} of {msg.dtype}, which needs "
                f"{ctx.work.nbytes} B; nothing was written"))
            return
        if isinstance(msg, Eager):
            if ctx.work.is_cpu:
                fill_from_bytes(ctx.work, msg.data)
            else:
                try:
                    self._fill_device(ctx, msg.data)
                except Exception as e:
                    self._session.refuse(op, TransferFailed(f"could not copy into the destination: {e}"))
                    return
            self._session.delivered(op)
        elif msg.src and self._pull is not None and ctx.work.is_cpu and msg.device == "cpu":
            self._pull_from(op, ctx, msg.src)
        elif msg.src and self._copier and msg.device == "cuda" and not ctx.work.is_cpu:
            if _ready_now(ctx):
                self._pull_gpu(op, ctx, msg)
            else:
                self._spawn(self._when_ready(op, ctx, lambda: self._pull_gpu(op, ctx, msg)))
        elif _ready_now(ctx):
            self._accept(op, ctx)
        else:
            self._spawn(self._when_ready(op, ctx, lambda: self._accept(op, ctx)))

    @staticmethod
    def _fill_device(ctx: _RecvCtx, data: bytes) -> None:
        """Copy an inline payload into a CUDA destination on the caller's stream: ordered after its
        earlier work there (so no wait for ``ctx.ready``) and before what it queues later. The
        host bytes are staged by the driver before the call returns."""
        assert ctx.work is not None
        recycle(ctx.ready)  # a later record of the pooled event does not disturb this one's waiters
        ctx.ready = None
        if data:
            with torch.cuda.stream(ctx.stream):
                fill_from_bytes(ctx.work, data)

    async def _when_ready(self, op: RecvOp, ctx: _RecvCtx, then: Callable[[], None]) -> None:
        """Run ``then`` (accept or pull) once earlier work on the caller's stream, which may still
        use the buffer, is done, if the receive is still matched."""
        try:
            await _ready(ctx)
        finally:
            if op.state is RecvState.MATCHED:
                then()
            self._flush()

    def _pull_from(self, op: RecvOp, ctx: _RecvCtx, src: int) -> None:
        """Copy the offered source straight into the destination (sizes were checked on match):
        on the loop up to the engine's inline size, else by its threads."""
        assert ctx.work is not None and self._pull is not None
        link = self._pull
        eng = link.engine
        assert isinstance(eng, ShmEngine)
        n = ctx.work.nbytes
        if n <= eng.inline_bytes:
            error: BaseException | None = None
            try:
                eng.read_sync(link.remote_segment, src, ctx.work.data_ptr(), n)
            except AiomooncakeError as e:
                error = e
            self._pulled(op, ctx, error)
            return
        job = ctx.pull = eng.read(link.remote_segment, src, ctx.work.data_ptr(), n)
        job.future.add_done_callback(lambda f: self._pull_settled(op, ctx, f))

    def _pull_gpu(self, op: RecvOp, ctx: _RecvCtx, msg: Rts) -> None:
        """We run the copies for a peer on our GPU: read the offered source into the destination
        (sizes were checked on match) through the engine; if that fails, fall back to the CTS."""
        if _trace.on:
            _trace.mark("pull:start")
        work = ctx.work
        assert work is not None
        link = self._links["cuda"]
        eng = link.engine
        try:
            ctx.region = (eng, eng.acquire(work))
            target = eng.target(link.remote_segment, msg.epoch, msg.gen)
            base = work.data_ptr()
            pieces = [(base + c.offset, msg.src + c.offset, c.length)
                      for c in plan_chunks(work.nbytes, self._opts.chunk_for(link.transport))]
            job = ctx.pull = eng.pull(target, pieces, self._opts.window, work.get_device())
        except Exception as e:
            self._pulled(op, ctx, e)
            return
        job.future.add_done_callback(lambda f: self._pull_settled(op, ctx, f))

    def _pull_settled(self, op: RecvOp, ctx: _RecvCtx, fut: asyncio.Future[None]) -> None:
        """A threaded pull settled. If the receive failed or was cancelled meanwhile, whoever
        stopped the pull reports that (once it settled: nothing lands after the failure)."""
        ctx.pull = None
        error = fut.exception() if not fut.cancelled() else TransferFailed("the pull was cancelled")
        if op.state is RecvState.MATCHED:
            self._pulled(op, ctx, error)
            self._flush()

    def _pulled(self, op: RecvOp, ctx: _RecvCtx, error: BaseException | None) -> None:
        """Complete a matched receive whose pull ended; if the kernel refused the copy, fall back
        to the CTS, so the sender writes instead."""
        if error is None:
            self._session.pulled(op)
        else:
            log.debug("pull from %s failed (%s); asking the sender to write", self.address, error)
            self._release(ctx)
            self._accept(op, ctx)

    async def _after_pull(self, ctx: _RecvCtx) -> None:
        """Stop a pull still copying into a receive that just failed, and wait until it settled."""
        job = ctx.pull
        if job is not None:
            job.stop()
            await asyncio.wait([job.future])

    def _accept(self, op: RecvOp, ctx: _RecvCtx) -> None:
        assert ctx.work is not None and op.msg is not None
        work = ctx.work
        sender_dev = getattr(op.msg, "device", "cpu")
        both_gpu = work.device.type == "cuda" and sender_dev == "cuda" and "cuda" in self._links
        link_name = "cuda" if both_gpu else "cpu"
        if link_name == "cpu" and work.device.type == "cuda":
            ctx.extra["device_work"] = work
            work = ctx.work = torch.empty(work.shape, dtype=work.dtype)  # staged through host memory
        link = self._links[link_name]
        try:
            region = link.engine.acquire(work)
        except AiomooncakeError as e:
            self._session.refuse(op, e)
            return
        except Exception as e:
            self._session.refuse(op, TransferFailed(f"could not register the destination: {e}"))
            return
        ctx.region = (link.engine, region)
        if _trace.on:
            _trace.mark("recv:cts")
        self._session.accept(op, link_name, work.data_ptr(), work.nbytes, link.engine.epoch, link.engine.gen)
        if both_gpu and self._busy is not None:
            # The DONE follows the sender's device write (~90 us per 100 MB, queued behind its other
            # writes): stay awake for it. Not on host links, whose engines need the CPU we would spin.
            self._busy.expect(0.001 + work.nbytes / 50e9)

    def _completed(self, op: RecvOp) -> None:
        if _trace.on:
            _trace.mark("recv:done")
        ctx: _RecvCtx = op.context  # type: ignore[assignment]
        self._release(ctx)
        work = ctx.work
        assert work is not None
        try:
            staged = ctx.extra.get("device_work")
            if staged is not None:
                with torch.cuda.stream(ctx.stream):
                    staged.copy_(work, non_blocking=False)
                work = staged
            result = work
            if ctx.dest is not None and work is not ctx.dest:
                if ctx.dest.device.type == "cuda":
                    with torch.cuda.stream(ctx.stream):
                        ctx.dest.copy_(work)
                else:
                    ctx.dest.copy_(work)
                result = ctx.dest
        except Exception as e:
            _set_exc(ctx.fut, TransferFailed(f"could not copy into the destination: {e}"))
            return
        if not ctx.fut.done():
            ctx.fut.set_result(result)

    def _release_or_quarantine(self, ctx: _RecvCtx) -> None:
        """Release a failed receive's memory, unless the connection died while the sender may still
        be writing into it (its CTS went out, no DONE/ABORT came back): bytes its engine already
        had in flight, or that a frozen process sends when it wakes, may still land. That memory
        (registration and tensors) is then kept for ``quarantine_s`` so they land in memory nobody
        reuses, never in memory freed and handed out again."""
        if ctx.region is None or self._session.closed is None:
            self._release(ctx)
            return
        _prune_quarantine()
        _quarantine.append((time.monotonic() + self.quarantine_s, ctx.region,
                            (ctx.work, ctx.dest, ctx.extra.pop("device_work", None))))
        ctx.region = None
        log.info("the connection to %s died during a receive of %d B: its memory stays registered "
                 "for %g s in case the remote's writes still land", self.address,
                 ctx.work.nbytes if ctx.work is not None else 0, self.quarantine_s)

    def _release(self, ctx: _RecvCtx) -> None:
        if ctx.region is not None:
            eng, region = ctx.region
            ctx.region = None
            eng.release(region)

    # ============================================================ plumbing
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
            sctx: _SendCtx = ev.op.context  # type: ignore[attr-defined]
            _drop_held(sctx)
            if not sctx.fut.done():
                sctx.fut.set_result(None)
        elif t is RecvMatched:
            self._matched(ev.op)  # type: ignore[attr-defined]
        elif t is RecvComplete:
            self._completed(ev.op)  # type: ignore[attr-defined]
        elif isinstance(ev, SendFailed):
            fctx: _SendCtx = ev.op.context  # type: ignore[assignment]
            _drop_held(fctx)
            _set_exc(fctx.fut, ev.error)
        elif isinstance(ev, WriteRequested):
            self._start_write(ev.op)
        elif isinstance(ev, StopWriting):
            ctx: _SendCtx = ev.op.context  # type: ignore[assignment]
            ctx.stop = True
            if ctx.job is not None:
                ctx.job.stop()
        elif isinstance(ev, RecvFailed):
            rctx: _RecvCtx = ev.op.context  # type: ignore[assignment]
            if rctx.pull is not None:  # our own threads still copy into it: fail once they stopped
                self._spawn(self._fail_after_pull(rctx, ev.error))
                return
            self._release_or_quarantine(rctx)
            _set_exc(rctx.fut, ev.error)
        elif isinstance(ev, RecvReleased):
            rctx = ev.op.context  # type: ignore[assignment]
            self._release_or_quarantine(rctx)
            if rctx.released is not None and not rctx.released.done():
                rctx.released.set_result(None)
        elif isinstance(ev, MessageArrived):
            for f in self._arrivals.pop(ev.tag, []):
                if not f.done():
                    f.set_result(None)

    async def _fail_after_pull(self, ctx: _RecvCtx, error: AiomooncakeError) -> None:
        await self._after_pull(ctx)
        self._release_or_quarantine(ctx)
        _set_exc(ctx.fut, error)

    def _spawn(self, coro: Any) -> None:
        task = self._loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _side_stream(self, device: torch.device) -> Any:
        idx = device.index if device.index is not None else torch.cuda.current_device()
        st = self._side_streams.get(idx)
        if st is None:
            st = self._side_streams[idx] = torch.cuda.Stream(device=idx)
        return st

    def _check_recv_dest(self, tensor: torch.Tensor) -> None:
        self._check_tensor(tensor, "recv into")
        why = _unwritable(tensor)
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
        if t.is_cpu:  # a flag; t.device builds a torch.device object (0.3 us)
            return "cpu"
        dev = t.device.type
        if dev != "cuda":
            raise ConfigurationError(f"cannot {what} a tensor on {t.device}: use a cpu or cuda tensor")
        if "cuda" not in self._links:
            raise ConfigurationError("this peer has no CUDA link")
        return dev

    async def _with_timeout(self, coro: Any, timeout: float | None, what: str, tag: int) -> torch.Tensor:
        if timeout is None:
            return await coro  # type: ignore[no-any-return]
        try:
            return await asyncio.wait_for(coro, timeout)
        except asyncio.TimeoutError:
            raise Timeout(
                f"{what} (tag {tag}) from {self.address} did not finish within {timeout:g} s") from None


# Attempts after a failed engine write while the peer answers (one per pooled engine connection).
_WRITE_RETRIES = max(4, int(os.environ.get("MC_TCP_LANES_PER_PEER", "4") or 4))

_probe_lock = threading.Lock()
_probe_pipe: tuple[int, int] | None = None
_probe_pid = 0  # the process that made _probe_pipe (a forked child must not share its parent's)
_libc_read: Any = None
_libc_write: Any = None
_BYTES_TYPE = id(bytes).to_bytes(8, sys.byteorder)


def _unwritable(t: torch.Tensor) -> str | None:
    """Why the engine must not write into ``t``, or None. Torch does not record whether memory may
    be written (``torch.frombuffer`` over ``bytes`` or a read-only ``mmap`` only warns), so look:
    elements that share memory (expanded tensors), pages the kernel maps read-only (writing there
    would crash the process), and the payload of an immutable Python ``bytes`` object (writing there
    would silently change a value Python assumes constant). Storage torch's allocator owns is
    skipped; for outside memory about 3 us per call."""
    if t.numel() == 0:
        return None
    if not t.is_contiguous() and torch._debug_has_internal_overlap(t) == 1:
        return "several of its elements share memory (an expanded or stride-0 tensor)"
    if not t.is_cpu:
        return None
    st = t.untyped_storage()
    if st.resizable():  # torch's own allocator made it: writable, and never a bytes object
        return None
    base, size = st.data_ptr(), st.nbytes()
    if size == 0 or base == 0:
        return None
    seen = _writable_seen.get(base)
    if seen is not None:  # a live storage found writable stays writable: skip the syscalls
        if not torch.UntypedStorage._expired(seen):
            return None
        torch.UntypedStorage._free_weak_ref(seen)
        del _writable_seen[base]
    for addr in {base, base + size - 1}:
        if not _page_writable(addr):
            return "its memory is mapped read-only (e.g. torch.frombuffer over a read-only mmap)"
    if _inside_bytes_object(base, size):
        return "its memory is an immutable Python bytes object (torch.frombuffer over bytes)"
    if len(_writable_seen) > 4096:
        for key, ref in list(_writable_seen.items()):
            if torch.UntypedStorage._expired(ref):
                torch.UntypedStorage._free_weak_ref(ref)
                del _writable_seen[key]
    _writable_seen[base] = st._weak_ref()  # type: ignore[assignment]
    return None


_writable_seen: dict[int, int] = {}  # storage address -> weak reference of a storage found writable


def _probe_setup() -> tuple[int, int]:
    """The pipe and libc calls the probes use (call with _probe_lock held)."""
    global _probe_pipe, _probe_pid, _libc_read, _libc_write
    if _probe_pipe is None or _probe_pid != os.getpid():
        lib = ctypes.CDLL(None, use_errno=True)
        _libc_read, _libc_write = lib.read, lib.write
        for fn in (_libc_read, _libc_write):
            fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t]
            fn.restype = ctypes.c_ssize_t
        r, w = os.pipe()
        os.set_blocking(r, False)  # a probe never waits, even if the pipe were somehow empty
        _probe_pipe, _probe_pid = (r, w), os.getpid()
    return _probe_pipe


def _drain(r: int) -> None:
    """Empty the probe pipe: a byte left behind would be read into the next probed memory."""
    with contextlib.suppress(BlockingIOError):
        while os.read(r, 64):
            pass


def _page_writable(addr: int) -> bool:
    """Whether the kernel lets this process write the byte at ``addr``: read() one byte from a pipe
    into it (the byte it already holds, so nothing changes); a read-only page gives EFAULT."""
    with _probe_lock:
        r, w = _probe_setup()
        _drain(r)
        os.write(w, ctypes.string_at(addr, 1))
        while _libc_read(r, addr, 1) != 1:
            err = ctypes.get_errno()
            if err != errno.EINTR:
                _drain(r)  # the byte is still in the pipe
                return err != errno.EFAULT  # only EFAULT says the page refuses writes
        return True


def _inside_bytes_object(base: int, size: int) -> bool:
    """Whether ``[base, base + size)`` lies in the payload of a live ``bytes`` object whose header
    (refcount, type, size, hash: 32 bytes on 64-bit CPython) is within the page of ``base`` or the
    one before (a small object can straddle a page boundary; the earlier page is read only if the
    kernel says it is readable). Stale memory can hold the type's address too, so the header must
    also look alive: 16-byte aligned (every CPython allocator aligns so), a plausible reference
    count (a freed object's first word is an allocator's free-list pointer) and a size that covers
    the tensor, and the NUL byte CPython keeps after every payload. Not seen: views starting more
    than a page into a bytes object."""
    if sys.implementation.name != "cpython" or ctypes.sizeof(ctypes.c_void_p) != 8:
        return False
    if _starts_malloc_chunk(base, size):
        return False
    start = (base & ~4095) - 4096
    if start <= 0 or not _page_readable(start):
        start = base & ~4095
    off = base - start
    if off < 32:
        return False
    page = ctypes.string_at(start, off)
    i = page.rfind(_BYTES_TYPE)
    while i >= 8:
        obj = start + i - 8
        if obj % 16 == 0 and i + 16 <= off:
            refcnt = int.from_bytes(page[i - 8:i], sys.byteorder)
            length = int.from_bytes(page[i + 8:i + 16], sys.byteorder, signed=True)
            if (0 < refcnt < 1 << 32 and 0 <= length < 1 << 48 and obj + 32 <= base
                    and base + size <= obj + 32 + length
                    and _nul_at(obj + 32 + length)):
                return True
        i = page.rfind(_BYTES_TYPE, 0, i)
    return False


def _starts_malloc_chunk(base: int, size: int) -> bool:
    """Whether ``base`` is the start of a malloc chunk of its own that holds the tensor: the word
    before it is then the chunk's size field (a multiple of 16 covering the tensor), where a bytes
    payload's start has the object's hash (-1 until hashed). Stale memory can hold a whole bytes
    header (a copy left behind when a growing bytes object was moved, refcount 1), and memory
    malloc hands out next to it then looked like that object's payload (seen once in a full test
    run: a bytearray's buffer)."""
    if base % 16 or (base % 4096 < 8 and not _page_readable(base - 8)):
        return False
    chunk = int.from_bytes(ctypes.string_at(base - 8, 8), sys.byteorder) & ~7
    return chunk % 16 == 0 and size + 8 <= chunk < 1 << 40


def _nul_at(addr: int) -> bool:
    """Whether ``addr`` holds the NUL CPython keeps after a bytes payload. A stale header's length
    can point anywhere: ask the kernel before reading (a bad read would crash the process)."""
    return _page_readable(addr) and ctypes.string_at(addr, 1) == b"\0"


def _page_readable(addr: int) -> bool:
    """Whether the byte at ``addr`` may be read: write() it to a pipe (EFAULT if not mapped)."""
    with _probe_lock:
        r, w = _probe_setup()
        if _libc_write(w, addr, 1) != 1:
            return False
        _drain(r)
        return True


# (expiry, (engine, region), tensors): memory a dead peer may still write into. Pruned when a
# receive is quarantined and when a peer is created or closed, so nothing here outlives its expiry
# by more than the time to the next of those (no timer that would hold tensors past its loop).
_quarantine: deque[tuple[float, tuple[Engine, Region], tuple[Any, ...]]] = deque()


def _prune_quarantine() -> None:
    if not _quarantine:
        return
    now = time.monotonic()
    for entry in [e for e in _quarantine if e[0] <= now]:  # expiries differ if quarantine_s changed
        _quarantine.remove(entry)
        eng, region = entry[1]
        eng.release(region)


def _plane_name(transport: str) -> str:
    return transport if transport == "shm" else f"te:{transport}"


def quarantined_bytes() -> int:
    """Bytes of receive memory currently held because a dead peer may still write into it."""
    return sum(t[0].nbytes for _, _, t in _quarantine if t[0] is not None)


def _settled(ev: ReadyMark) -> bool:
    """Whether the caller's stream passed ``ev``; if so the event goes back to the pool (the
    caller drops its reference)."""
    if not ev.query():
        return False
    recycle(ev)
    return True


def _ready_now(ctx: _SendCtx | _RecvCtx) -> bool:
    """Whether the work queued on the caller's stream before the operation is done; if so the
    event goes back to the pool (once: ``ctx.ready`` is cleared)."""
    ev = ctx.ready
    if ev is not None:
        if not _settled(ev):
            return False
        ctx.ready = None
    return True


async def _ready(ctx: _SendCtx | _RecvCtx) -> None:
    """Wait (without blocking the loop) until :func:`_ready_now` holds."""
    ev = ctx.ready
    await wait_event(ev)
    ctx.ready = None
    recycle(ev)


def _drop_held(ctx: _SendCtx) -> None:
    """Release the registration a pull offer held (once: the send is over)."""
    held, ctx.held = ctx.held, None
    if held is not None:
        held[0].release(held[1])


def _as_error(e: BaseException) -> AiomooncakeError:
    if isinstance(e, AiomooncakeError):
        return e
    log.error("engine write failed: %s: %s", type(e).__name__, e)
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
