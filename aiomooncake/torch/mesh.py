"""The asyncio side of one process group: a mesh of :class:`~aiomooncake.Peer` connections, one per
pair of ranks, and MPI-style matching (tags, any-source receives, barrier) on top of them.

Everything here runs under the loop's core lock (:mod:`aiomooncake.torch.loop`), on whichever thread
holds it: the process group calls :meth:`Mesh.submit` on the caller's thread, through
:meth:`LoopThread.submit`; completions happen on the thread that runs the loop's turn (a waiter, or
the background thread).

Connections. Each rank listens on one port (published in the c10d store by the process group) and
dials every higher rank and itself; it accepts the lower ranks' dials. The dialer's first message,
on the internal tag ``HELLO_TAG``, names its rank, so the acceptor knows who called. Dials start
as soon as the group exists and run in the background; an operation on a pair that is not connected
yet waits in that pair's :class:`_Lane` and starts the moment it is.

Ordering. The core matches messages per peer and tag in posting order. Every operation is posted
on its peer synchronously (``Peer.post_send`` / ``post_recv``: no task per operation), in
submission order: at once when its lane is open and empty, or when the lane opens, in the order
they queued. A lone operation's frames are written at once; those of a batch leave together at
the end of the loop turn that follows its last post.

Timeouts. One timer per mesh, at the earliest deadline of the operations in flight, sweeps them
(the group's timeout makes deadlines nearly monotone, so it rarely moves): no timer per operation.

Any-source receives. MPI semantics: a message goes to the earliest posted matching receive. An
any-source receive waits until some peer holds an unexpected message with its tag and claims it by
posting a receive on that peer in the same loop step as the probe. Receives with the same tag
posted after it (any-source or not) wait behind it in the tag's sequence, so they cannot take a
message it was entitled to; receives posted before it already matched first.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
from collections import deque
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

import torch

import aiomooncake
from aiomooncake import MessageMismatch, Options, Peer, PeerClosed, _trace
from aiomooncake.tensors import recycle, stream_mark

from .errors import BackendError, InvalidArgument, OpTimeout
from .ops import BARRIER, RECV, RECV_ANY, SEND, Op, Posted

if TYPE_CHECKING:
    from .loop import LoopThread

log = logging.getLogger(__name__)

HELLO_TAG = -1  # the dialer's first message: int64 [rank, generation, group size]
BARRIER_TAG = -16  # dissemination barrier round k uses BARRIER_TAG - k
_DIAL_ATTEMPTS = 3

Starter = Callable[[Op, Peer], None]


class _Lane:
    """Operations in one direction with one rank, started in submission order once connected."""

    def __init__(self, loop: asyncio.AbstractEventLoop, rank: int) -> None:
        self.rank = rank
        self.peer: Peer | None = None
        self.error: BaseException | None = None
        self.backlog: deque[tuple[Op, Starter]] = deque()
        self.ready: asyncio.Future[Peer] = loop.create_future()

    def start(self, op: Op, starter: Starter) -> None:
        if self.peer is not None and not self.backlog:
            starter(op, self.peer)
        elif self.error is not None:
            raise self.error
        else:
            self.backlog.append((op, starter))

    def open(self, peer: Peer) -> None:
        self.peer = peer
        while self.backlog:
            op, starter = self.backlog.popleft()
            starter(op, peer)
        if not self.ready.done():
            self.ready.set_result(peer)

    def fail(self, err: BaseException) -> list[Op]:
        """Mark the lane broken (before it opened); return the operations that waited in it."""
        if self.peer is not None or self.error is not None:
            return []
        self.error = err
        if not self.ready.done():
            self.ready.set_exception(err)
            self.ready.exception()  # retrieved: nobody may be waiting
        ops = [op for op, _ in self.backlog]
        self.backlog.clear()
        return ops

    def withdraw(self, op: Op) -> bool:
        for i, (queued, _) in enumerate(self.backlog):
            if queued is op:
                del self.backlog[i]
                return True
        return False


_cuda_streams: dict[int, Any] = {}  # device index -> aiomooncake's own stream (made under the lock)


def loop_stream(device: torch.device) -> Any:
    """aiomooncake's own CUDA stream on ``device``, on which the core orders our operations, so
    its copies never queue behind (or in front of) the user's work."""
    idx = device.index if device.index is not None else torch.cuda.current_device()
    s = _cuda_streams.get(idx)
    if s is None:
        s = _cuda_streams[idx] = torch.cuda.Stream(device=idx)
    return s


class Mesh:
    """The connections and matching state of one process group (under the loop's core lock)."""

    def __init__(self, rank: int, size: int, generation: int, options: Options,
                 owner: LoopThread | None = None) -> None:
        self.loop = asyncio.get_running_loop()
        self._owner = owner  # told when an op completes away from the thread driving the loop
        self.rank = rank
        self.size = size
        self.generation = generation
        self.options = options
        self.port = 0
        self._send = [_Lane(self.loop, r) for r in range(size)]
        self._recv = [_Lane(self.loop, r) for r in range(size)]
        self._seq: dict[int, deque[Op]] = {}  # tag -> receives waiting behind an any-source one
        self._inflight: dict[Op, None] = {}  # in posting order (see settle)
        self._background: set[asyncio.Task[Any]] = set()
        self._peers: list[Peer] = []
        self._listener: aiomooncake.Listener | None = None
        self._closed: BackendError | None = None
        self._barrier_seq = 0
        self._sweeper: asyncio.TimerHandle | None = None  # at the earliest deadline in flight
        self._sweep_at = math.inf

    # ================================================================ set-up
    async def listen(self, host: str) -> int:
        self._listener = await aiomooncake.listen(host, 0, options=self.options)
        self.port = self._listener.port
        self._spawn_background(self._accept_loop())
        return self.port

    def connect(self, addresses: list[tuple[str, int]]) -> None:
        """Dial every higher rank and this rank itself (in the background)."""
        for j in range(self.rank, self.size):
            host, port = addresses[j]
            self._spawn_background(self._dial(j, host, port))

    async def _dial(self, j: int, host: str, port: int) -> None:
        peer: Peer | None = None
        for attempt in range(_DIAL_ATTEMPTS):
            try:
                peer = await aiomooncake.connect(host, port, options=self.options)
                break
            except PeerClosed as e:  # refused: retry briefly, the listener exists before its address
                if attempt == _DIAL_ATTEMPTS - 1:
                    self._lane_failed(j, BackendError(f"could not connect to rank {j} at {host}:{port}: {e}"))
                    return
                await asyncio.sleep(0.05 * (attempt + 1))
            except Exception as e:
                self._lane_failed(j, BackendError(f"could not connect to rank {j} at {host}:{port}: "
                                                  f"{type(e).__name__}: {e}"))
                return
        assert peer is not None
        if self._closed is not None:
            await peer.close()
            return
        hello = torch.tensor([self.rank, self.generation, self.size], dtype=torch.int64)
        greeting = self.loop.create_task(peer.send(hello, HELLO_TAG))  # posted before any user op
        self._peers.append(peer)
        self._send[j].open(peer)
        if j != self.rank:
            self._recv[j].open(peer)
        try:
            await greeting
        except Exception as e:  # the operations on this peer fail on their own; say why here too
            log.warning("rank %d: greeting rank %d failed: %s", self.rank, j, e)

    def _lane_failed(self, j: int, err: BackendError) -> None:
        log.warning("rank %d: %s", self.rank, err)
        for op in self._send[j].fail(err) + self._recv[j].fail(err):
            self._finish(op, error=err)

    async def _accept_loop(self) -> None:
        assert self._listener is not None
        while True:
            try:
                peer = await self._listener.accept()
            except PeerClosed:
                return
            self._spawn_background(self._greet(peer))

    async def _greet(self, peer: Peer) -> None:
        try:
            hello = await asyncio.wait_for(peer.recv_tensor(HELLO_TAG, device="cpu"),
                                           self.options.handshake_timeout)
            rank, generation, size = (int(x) for x in hello.tolist())
        except Exception as e:
            log.warning("rank %d: a connection from %s did not introduce itself: %s", self.rank,
                        peer.address, e)
            await peer.close()
            return
        problem = None
        if generation != self.generation or size != self.size:
            problem = f"it belongs to another group (generation {generation}, size {size})"
        elif not 0 <= rank <= self.rank:
            problem = f"rank {rank} should not dial rank {self.rank}"
        elif self._recv[rank].peer is not None:
            problem = f"rank {rank} is already connected"
        if problem is not None or self._closed is not None:
            if problem is not None:
                log.warning("rank %d: refusing a connection from %s: %s", self.rank, peer.address, problem)
            await peer.close()
            return
        self._peers.append(peer)
        if rank != self.rank:
            self._send[rank].open(peer)
        self._recv[rank].open(peer)

    def _spawn_background(self, coro: Coroutine[Any, Any, None]) -> None:
        task = self.loop.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # ============================================================ operations
    def submit(self, op: Op) -> None:
        """Start ``op`` (lock held; called in submission order)."""
        if _trace.on:
            _trace.mark("mesh:submit")
        if self._closed is not None:
            self._finish(op, error=self._closed)
            return
        self._inflight[op] = None
        if op.timeout is not None:
            op.deadline = self.loop.time() + op.timeout
            if op.deadline < self._sweep_at:
                self._arm(op.deadline)
        try:
            if op.kind == SEND:
                self._send[op.peer].start(op, self._start_transfer)
            elif op.kind == RECV:
                waiting = self._seq.get(op.tag)
                if waiting:
                    waiting.append(op)
                else:
                    self._recv[op.peer].start(op, self._start_transfer)
            elif op.kind == RECV_ANY:
                waiting = self._seq.setdefault(op.tag, deque())
                waiting.append(op)
                if len(waiting) == 1:
                    self._start(op, self._claim(op))
            elif op.kind == BARRIER:
                self._barrier_seq += 1
                self._start(op, self._barrier(op))
            else:
                raise InvalidArgument(f"unknown operation {op.kind!r}")
        except BaseException as e:
            self._finish(op, error=e)

    def _start(self, op: Op, coro: Coroutine[Any, Any, int]) -> None:
        task = self.loop.create_task(coro)
        op.task = task
        task.add_done_callback(lambda t: self._task_done(op, t))

    def _start_transfer(self, op: Op, peer: Peer) -> None:
        """Post ``op`` on its peer now: no task per operation; the peer's future finishes it. A lone
        op's frames leave at once; a batch's wait for the end of the loop turn (burst)."""
        assert op.wire is not None
        if _trace.on:
            _trace.mark("mesh:transfer")
        try:
            posted: Posted
            s = self._order_after_caller(op) if op.tensor is not None and op.tensor.is_cuda else None
            posted = self._post(op, peer, s, functools.partial(self._posted_done, op))
        except BaseException as e:
            self._finish(op, error=e)
            return
        op.posted = posted

    @staticmethod
    def _post(op: Op, peer: Peer, stream: Any, on_end: Callable[[Any], None]) -> Posted:
        """Post on ``peer``, ordered on ``stream`` (CUDA: ours, after the caller's mark) without
        making it this thread's current stream (two ``set_stream`` calls an op); the peer calls
        ``on_end`` as the transfer ends (no future callback, a loop-turn hop, per operation)."""
        assert op.wire is not None
        if op.kind == SEND:
            return peer.post_send(op.wire, op.tag, burst=op.burst, stream=stream, on_end=on_end)
        return peer.post_recv(op.wire, op.tag, burst=op.burst, stream=stream, on_end=on_end)

    def _posted_done(self, op: Op, posted: Posted) -> None:
        """The peer's word (``on_end``, lock held) that ``op``'s transfer is over: finish it, in
        the order the core completed its operations."""
        fut = posted.future
        if op.done or op.expired is not None:
            return  # settled already, or being withdrawn: _withdraw finishes it once its buffer is safe
        if fut.cancelled():
            self._finish(op, error=self._closed or BackendError(f"{op.describe()} was cancelled"))
        elif fut.exception() is not None:
            self._finish(op, error=fut.exception())
        else:
            self._finish(op, result=op.peer)

    async def _withdraw(self, op: Op, posted: Posted) -> None:
        """Withdraw a posted receive and finish it only once no byte can land in its buffer."""
        await posted.cancel()
        self._finish(op, error=op.expired)

    def _order_after_caller(self, op: Op) -> Any:
        """CUDA: the bytes may be read (send) or overwritten (recv) only after the work the caller
        had queued on its stream when it submitted; the core orders its copies after the current
        stream of the thread that posts, which is then our stream, made to wait for the caller's
        event. Returns that stream."""
        assert op.tensor is not None
        s = loop_stream(op.tensor.device)
        ev = op.ready_event
        if ev is None:
            return s
        if not ev.query():  # an idle caller stream adds no dependency (and no latency)
            s.wait_event(ev)
        recycle(ev)  # the wait is queued; the event may be recorded again
        op.ready_event = True  # still the mark of a CUDA op whose caller had work queued
        if op.kind != SEND:
            op.tensor.record_stream(s)
        return s

    # ------------------------------------------------------------- any-source
    async def _claim(self, op: Op) -> int:
        assert op.wire is not None
        for lane in self._recv:
            if lane.peer is None:
                await lane.ready
        while True:
            for lane in self._recv:
                peer = lane.peer
                assert peer is not None
                if peer.probe(op.tag):
                    # Post ours (which claims the message) before releasing the receives queued
                    # behind this one: they post at once.
                    cuda = op.tensor is not None and op.tensor.is_cuda
                    pending = peer.post_recv(op.wire, op.tag,
                                             stream=self._order_after_caller(op) if cuda else None)
                    self._seq_remove(op)
                    await pending.wait()
                    return lane.rank
            await self._wait_arrival(op.tag)

    async def _wait_arrival(self, tag: int) -> None:
        waiters = [self.loop.create_task(lane.peer.wait_incoming(tag)) for lane in self._recv
                   if lane.peer is not None]
        try:
            done, _ = await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            for t in done:
                exc = t.exception()
                if exc is not None:
                    raise exc
        finally:
            for t in waiters:
                t.cancel()

    def _seq_remove(self, op: Op) -> None:
        """Take ``op`` out of its tag's sequence; if it headed it, start what waited behind it."""
        waiting = self._seq.get(op.tag)
        if not waiting or op not in waiting:
            return
        was_head = waiting[0] is op
        waiting.remove(op)
        if not was_head:
            return
        while waiting and waiting[0].kind == RECV:
            nxt = waiting.popleft()
            try:
                self._recv[nxt.peer].start(nxt, self._start_transfer)
            except BaseException as e:
                self._finish(nxt, error=e)
        if waiting:
            self._start(waiting[0], self._claim(waiting[0]))
        else:
            del self._seq[op.tag]

    # ---------------------------------------------------------------- barrier
    async def _barrier(self, op: Op) -> int:
        """Dissemination barrier: ceil(log2(size)) rounds of 1-byte messages."""
        round_, dist = 0, 1
        while dist < self.size:
            to, frm = (self.rank + dist) % self.size, (self.rank - dist) % self.size
            tag = BARRIER_TAG - round_
            ops = [Op(SEND, tag, to, wire=torch.zeros(1, dtype=torch.uint8)),
                   Op(RECV, tag, frm, wire=torch.empty(1, dtype=torch.uint8))]
            for o in ops:
                o.finished = self.loop.create_future()
                self.submit(o)
            try:
                await asyncio.gather(*(o.finished for o in ops if o.finished is not None))
            except asyncio.CancelledError:
                for o in ops:
                    self._cancel(o, op.expired or BackendError(f"{op.describe()} was cancelled"))
                raise
            round_, dist = round_ + 1, dist * 2
        return -1

    # ------------------------------------------------------------ completion
    def _task_done(self, op: Op, task: asyncio.Task[int]) -> None:
        if op.kind == RECV_ANY:
            self._seq_remove(op)  # failed or timed out before it claimed a message
        if task.cancelled():
            why = op.expired or self._closed or BackendError(f"{op.describe()} was cancelled")
            self._finish(op, error=why)
            return
        exc = task.exception()
        if exc is not None:
            self._finish(op, error=exc)
        else:
            self._finish(op, result=task.result())

    def _finish(self, op: Op, result: int = -1, error: BaseException | None = None) -> None:
        """Complete ``op`` once (lock held): its outcome, its callbacks, and its waiters."""
        if op.done:
            return
        self._inflight.pop(op, None)
        op.task = None
        fin = op.finished
        if error is not None:
            error = self._torch_error(op, error)
            op.error = error
            if fin is not None and not fin.done():
                fin.set_exception(error)
                fin.exception()  # retrieved: internal operations may have nobody awaiting them
        else:
            if op.ready_event is not None and op.kind != SEND and op.tensor is not None:
                try:
                    dev = op.tensor.device
                    # None if our stream is idle: the bytes are in, nothing of ours is left to order
                    op.done_event = stream_mark(loop_stream(dev), dev.index if dev.index is not None
                                                else torch.cuda.current_device())  # pooled: see Op.__del__
                except Exception as e:  # pragma: no cover - CUDA runtime failure
                    self._finish(op, error=e)
                    return
            if _trace.on:
                _trace.mark("mesh:finish")
            op.result = result
            if fin is not None and not fin.done():
                fin.set_result(result)
        op.done = True
        callbacks, op.callbacks = op.callbacks, None
        if callbacks:
            for fn in callbacks:
                try:
                    fn(op)
                except Exception:  # ours only (get_future's): never let one stop a completion
                    log.exception("a completion callback failed")
        if self._owner is not None:
            self._owner.completed_elsewhere()

    def _torch_error(self, op: Op, exc: BaseException) -> BaseException:
        if isinstance(exc, (BackendError, InvalidArgument)):
            return exc
        if self._closed is not None:
            err = BackendError(f"{op.describe()} failed: the process group was shut down")
        elif isinstance(exc, PeerClosed):
            who = f"rank {op.peer}" if op.peer >= 0 else "a peer"
            err = BackendError(f"{op.describe()} failed: {who} is gone: {exc}")
        elif isinstance(exc, MessageMismatch):
            err = BackendError(f"{op.describe()} failed: the send and the recv differ in size: {exc}")
        else:
            err = BackendError(f"{op.describe()} failed: {type(exc).__name__}: {exc}")
        err.__cause__ = exc
        return err

    def _arm(self, deadline: float) -> None:
        """Sweep the operations in flight for expired ones at ``deadline`` (earlier than armed)."""
        if self._sweeper is not None:
            self._sweeper.cancel()
        self._sweep_at = deadline
        self._sweeper = self.loop.call_at(deadline, self._sweep)

    def _sweep(self) -> None:
        """Cancel the operations whose group timeout has passed; re-arm for the next deadline."""
        self._sweeper, self._sweep_at = None, math.inf
        now = self.loop.time()
        nxt = math.inf
        for op in list(self._inflight):
            if op.timeout is None or op.expired is not None or op.done:
                continue
            if op.deadline <= now:
                self._expire(op)
            elif op.deadline < nxt:
                nxt = op.deadline
        if nxt < math.inf and not self._closed:
            self._arm(nxt)

    def _expire(self, op: Op) -> None:
        hint = ""
        lane = self._send[op.peer] if op.kind == SEND else self._recv[op.peer] if op.kind == RECV else None
        if lane is not None and lane.peer is None:
            hint = f"; rank {op.peer} never connected (is it running, in the same group?)"
        self._cancel(op, OpTimeout(f"{op.describe()} did not complete within the process group's "
                                   f"timeout of {op.timeout:g} s{hint}"))

    def _cancel(self, op: Op, err: BaseException) -> None:
        if op.done:
            return
        if op.task is not None:
            op.expired = err
            op.task.cancel()
            return
        posted = op.posted
        if posted is not None:
            if posted.future.done():
                return  # it completed; its callback finishes it
            op.expired = err
            posted.future.cancel()
            if op.kind == SEND:
                posted.withdraw()
                self._finish(op, error=err)
            else:
                self._spawn_background(self._withdraw(op, posted))
            return
        if op.kind == SEND:
            self._send[op.peer].withdraw(op)
        elif op.kind == RECV:
            self._recv[op.peer].withdraw(op)
        self._seq_remove(op)
        self._finish(op, error=err)

    # ================================================================ shutdown
    async def close(self) -> None:
        """Fail every pending operation, close every connection and the listener. Idempotent."""
        if self._closed is not None:
            return
        self._closed = BackendError("the process group was shut down")
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper, self._sweep_at = None, math.inf
        if self._listener is not None:
            await self._listener.close()
        for task in list(self._background):
            task.cancel()
        for lane in self._send + self._recv:
            for op in lane.fail(self._closed):
                self._finish(op, error=self._closed)
        for waiting in list(self._seq.values()):
            for op in list(waiting):
                if op.task is None:
                    self._finish(op, error=self._closed)
        self._seq.clear()
        await asyncio.gather(*(p.close() for p in self._peers), return_exceptions=True)
        tasks = []
        for op in list(self._inflight):
            if op.task is not None:
                op.task.cancel()
                tasks.append(op.task)
            else:
                self._finish(op, error=self._closed)
        pending = tasks + list(self._background)
        if pending:
            with contextlib.suppress(Exception):
                await asyncio.wait(pending, timeout=self.options.cancel_timeout)

    @property
    def closed(self) -> bool:
        return self._closed is not None

    def connected_ranks(self) -> list[int]:
        return [r for r in range(self.size)
                if self._send[r].peer is not None and self._recv[r].peer is not None]


__all__ = ["BARRIER_TAG", "HELLO_TAG", "Mesh", "loop_stream"]
