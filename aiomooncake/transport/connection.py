"""One control connection: an asyncio Protocol that frames messages and watches liveness.

Until the handshake is over, frames queue for the handshake coroutine; afterwards each frame goes
straight to the handler (the peer's session), with no task switch on the hot path. Heartbeats go
out every ``interval`` seconds; if nothing at all arrives for ``timeout`` seconds the peer is
declared dead and the connection is closed with PeerClosed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from .. import _trace, tuning
from ..core.messages import Ack, Bye, Done, Message, Ping, Pong
from ..errors import AiomooncakeError, PeerClosed, ProtocolError, Timeout
from .busypoll import BusyPoller
from .framing import FrameDecoder, pack_batch_into, pack_into

log = logging.getLogger(__name__)

Handler = Callable[[Message], None]
_CONTROL = (Ping, Pong, Bye)
LostHandler = Callable[[AiomooncakeError], None]


@dataclass(frozen=True)
class Policy:
    """How a connection batches its writes once the handshake is over (given to :meth:`start`).

    busy: the loop's busy poller, kicked by traffic (None: the loop sleeps between frames).
    ack_now: ACKs alone leave at once instead of waiting up to two loop turns for a reply to ride
        with (the remote busy-polls, or ``Options.hold_acks`` is off).
    burst_hooks: called before and after the frames of one read are handled, when there are several
        (the peer holds the copies they start, to submit them together).
    batch_replies: the replies to the frames of one read leave in one syscall.
    batch_bytes: several messages written together travel as BATCH frames of at most this many
        bytes (0: one frame per message); at most what the remote accepts in a frame.
    """

    busy: BusyPoller | None = None
    ack_now: bool = False
    burst_hooks: tuple[Callable[[], None], Callable[[], None]] | None = None
    batch_replies: bool = True
    batch_bytes: int = 0


class Connection(asyncio.Protocol):
    def __init__(self, max_frame: int, policy: Policy | None = None) -> None:
        self._decoder = FrameDecoder(max_frame)
        self._transport: asyncio.Transport | None = None
        self._handshake: asyncio.Queue[Message | AiomooncakeError] = asyncio.Queue()
        self._handler: Handler | None = None
        self._on_lost: LostHandler | None = None
        self._closed: AiomooncakeError | None = None
        self._last_rx = time.monotonic()
        self._heartbeat: asyncio.Task[None] | None = None
        self._paused: asyncio.Future[None] | None = None
        self._rules = policy if policy is not None else Policy()
        self._wbuf: list[Message] = []
        self._turn_corked = False
        self._write_scheduled = False
        self._corks = 0  # while > 0 frames only queue: one read's replies, or a batch's posts
        self._loop = asyncio.get_event_loop()
        self.peername: str = "?"
        self.sockname: tuple[str, int] = ("", 0)
        # Frames a peer may queue before the handshake reads them; None lifts the bound. A stranger
        # flooding a listener before it authenticated must not make it buffer without limit.
        self.handshake_backlog: int | None = 8
        self._probes: dict[float, asyncio.Future[bool]] = {}  # ping stamp -> is the peer alive?

    # ---------------------------------------------------------- asyncio API
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self.peername = f"{peer[0]}:{peer[1]}" if peer else "?"
        sock = transport.get_extra_info("sockname")
        if sock:
            self.sockname = (sock[0], sock[1])

    def data_received(self, data: bytes) -> None:
        if _trace.on:
            _trace.mark("rx")
        self._last_rx = time.monotonic()
        try:
            msgs = self._decoder.feed(data)
        except ProtocolError as e:
            self._protocol_error(e)
            return
        if len(msgs) > 1 and self._rules.batch_replies:  # replies to one read leave together
            self._corks += 1
            hooks = self._rules.burst_hooks
            if hooks is not None:
                hooks[0]()
            try:
                self._dispatch(msgs)
            finally:
                if hooks is not None:
                    hooks[1]()  # the engine starts on the burst's copies before its replies go
                self._uncork()
        else:
            self._dispatch(msgs)

    def _dispatch(self, msgs: list[Message]) -> None:
        busy = self._rules.busy
        for m in msgs:
            if self._handler is not None and type(m) not in _CONTROL:
                if busy is not None:  # traffic (not a heartbeat): keep the loop hot a moment
                    busy.kick()
                    busy = None  # once per read
                try:
                    self._handler(m)
                except ProtocolError as e:
                    self._protocol_error(e)
                    return
            elif isinstance(m, Ping):
                self.send(Pong(m.stamp))
            elif isinstance(m, Pong):
                if self._probes:
                    probe = self._probes.pop(m.stamp, None)
                    if probe is not None and not probe.done():
                        probe.set_result(True)
            elif isinstance(m, Bye):
                self.close(PeerClosed(f"the peer at {self.peername} closed the connection: {m.reason}"))
                return
            elif self._handler is None:
                if self.handshake_backlog is not None and self._handshake.qsize() >= self.handshake_backlog:
                    self._protocol_error(ProtocolError(
                        f"more than {self.handshake_backlog} frames before the handshake ended"))
                    return
                self._handshake.put_nowait(m)
            else:
                try:
                    self._handler(m)
                except ProtocolError as e:
                    self._protocol_error(e)
                    return
            if self._closed is not None:
                return

    def connection_lost(self, exc: Exception | None) -> None:
        partial = len(self._decoder._buf)
        if partial and self._closed is None:
            log.warning("protocol error from %s, closing the connection: it ended in the middle of a "
                        "frame (%d B of it received)", self.peername, partial)
        why = f": {exc}" if exc else ""
        self._lost(PeerClosed(f"the connection to {self.peername} was lost{why}"))

    def pause_writing(self) -> None:
        if self._paused is None:
            self._paused = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        if self._paused is not None:
            if not self._paused.done():
                self._paused.set_result(None)
            self._paused = None

    # ------------------------------------------------------------ our API
    def send(self, msg: Message) -> None:
        self.send_many([msg])

    def send_many(self, msgs: list[Message]) -> None:
        """Send frames in order. Without busy-polling, ACKs alone are held back two loop turns, so
        an ACK produced while handling input leaves in the same syscall and segment as the reply
        the woken caller sends next: a sleeping remote then wakes once per round trip instead of
        twice. A busy-polling remote (``ack_now``) pays nothing to wake, so ACKs leave at once and
        its sender completes (and posts its next receive) while we still work on our reply: 8 B
        ping-pong 79 -> 69 us (medians of 5 runs, a probe now in git history). Anything else goes out
        at once, with whatever was held."""
        if self._closed is not None or self._transport is None:
            return
        self._wbuf.extend(msgs)
        if not self._corks:
            self._policy(msgs)
        elif len(self._wbuf) >= tuning.CORK_FRAMES:  # a long burst: its head leaves now
            self._write_out()

    def cork_turn(self) -> None:
        """Queue the frames sent from now until the end of this loop turn, then write them in one
        go (a batch's posts: the remote then handles them in one read)."""
        if self._turn_corked or self._closed is not None:
            return
        self._turn_corked = True
        self._corks += 1
        self._loop.call_soon(self.uncork_turn)

    def uncork_turn(self) -> None:
        """End :meth:`cork_turn` early: what is queued leaves now, and so does what follows."""
        if self._turn_corked:
            self._turn_corked = False
            self._uncork()

    def _uncork(self) -> None:
        self._corks -= 1
        if not self._corks and self._wbuf and self._closed is None:
            self._policy(self._wbuf)

    def _policy(self, msgs: list[Message]) -> None:
        """Write the buffer now, or after a loop turn or two if ``msgs`` (the frames just added)
        can wait: ACKs as said above; DONEs, since writes finish in bursts (the NVLink transport
        reports a whole stream at once) and one polling round's DONEs then leave in one syscall.
        (Holding a CUDA send's RTS for a turn, to send a gathered batch in one syscall, measured
        slower: 16 x 100 MB streamed at 699-728 GB/s against 752-794 on the H100.)"""
        if not self._rules.ack_now and all(type(m) is Ack for m in msgs):
            self._write_later(2)
        elif all(type(m) is Done for m in msgs):
            self._write_later(1)
        else:
            self._write_out()

    def _write_later(self, turns: int) -> None:
        """Write the buffer after ``turns`` (1 or 2) loop turns, unless a write is already due."""
        if not self._write_scheduled:
            self._write_scheduled = True
            if turns == 2:
                self._loop.call_soon(self._loop.call_soon, self._write_out)
            else:
                self._loop.call_soon(self._write_out)

    def _write_out(self) -> None:
        self._write_scheduled = False
        buf, self._wbuf = self._wbuf, []
        if not buf:
            return
        if _trace.on:
            _trace.mark("tx")
        busy = self._rules.busy
        if busy is not None and type(buf[-1]) not in _CONTROL:  # traffic: keep the loop hot a moment
            busy.kick()
        if self._closed is None and self._transport is not None and buf:
            parts: list[bytes] = []
            limit = self._rules.batch_bytes
            if limit and len(buf) > 1:
                pack_batch_into(parts, buf, limit)
            else:
                for m in buf:
                    pack_into(parts, m)
            self._transport.writelines(parts)

    @property
    def paused(self) -> bool:
        """Whether the socket's write buffer is over its high-water mark (see :meth:`drain`)."""
        return self._paused is not None

    async def drain(self) -> None:
        """Wait while the socket's write buffer is over its high-water mark."""
        while self._paused is not None and self._closed is None:
            await asyncio.shield(self._paused)
        if self._closed is not None:
            raise self._closed

    async def next_handshake_message(self, timeout: float) -> Message:
        try:
            item = await asyncio.wait_for(self._handshake.get(), timeout)
        except asyncio.TimeoutError:
            raise Timeout(f"no handshake reply from {self.peername} within {timeout:.0f} s") from None
        if isinstance(item, AiomooncakeError):
            raise item
        return item

    async def probe(self) -> bool:
        """Ask the peer for a sign of life: True once it answers a ping sent now, False if the
        connection is lost first (at the latest after the heartbeat timeout of silence)."""
        if self._closed is not None:
            return False
        stamp = time.monotonic()
        while stamp in self._probes:
            stamp += 1e-9
        fut: asyncio.Future[bool] = self._loop.create_future()
        self._probes[stamp] = fut
        self.send(Ping(stamp))
        return await fut

    def start(self, handler: Handler, on_lost: LostHandler, interval: float, timeout: float,
              policy: Policy | None = None) -> None:
        """Leave the handshake: deliver frames to ``handler``, write under ``policy`` and start
        heartbeats."""
        if policy is not None:
            self._rules = policy
        self._handler = handler
        self._on_lost = on_lost
        while not self._handshake.empty():  # frames that arrived right behind the handshake
            item = self._handshake.get_nowait()
            if isinstance(item, AiomooncakeError):
                on_lost(item)
                return
            handler(item)
        if self._closed is not None:
            on_lost(self._closed)
            return
        self._heartbeat = asyncio.get_running_loop().create_task(self._beat(interval, timeout))

    def close(self, error: AiomooncakeError | None = None, reason: str = "closed by the peer") -> None:
        if self._closed is not None:
            return
        if error is None and self._transport is not None:
            self._wbuf.append(Bye(reason))
            self._write_out()
        self._lost(error or PeerClosed(f"the connection to {self.peername} was closed locally"))

    @property
    def closed(self) -> AiomooncakeError | None:
        return self._closed

    # ---------------------------------------------------------- internals
    def _protocol_error(self, e: ProtocolError) -> None:
        log.warning("protocol error from %s, closing the connection: %s", self.peername, e)
        if self._transport is not None:
            self._wbuf.append(Bye(f"protocol error: {e}"))
            self._write_out()
        self._lost(ProtocolError(f"{self.peername} sent a bad frame: {e}"))

    def _lost(self, error: AiomooncakeError) -> None:
        if self._closed is not None:
            return
        self._closed = error
        if self._heartbeat is not None:
            self._heartbeat.cancel()
        if self._transport is not None:
            self._transport.close()
        if self._paused is not None and not self._paused.done():
            self._paused.set_result(None)
        self._handshake.put_nowait(error)
        probes, self._probes = self._probes, {}
        for probe in probes.values():
            if not probe.done():
                probe.set_result(False)
        if self._on_lost is not None:
            self._on_lost(error)

    async def _beat(self, interval: float, timeout: float) -> None:
        # Wake at the next ping or at the silence deadline, whichever is first, so a dead peer is
        # declared dead ``timeout`` after the last byte from it, not up to ``interval`` later.
        next_ping = time.monotonic() + interval
        while self._closed is None:
            now = time.monotonic()
            await asyncio.sleep(max(0.0, min(next_ping, self._last_rx + timeout) - now))
            if time.monotonic() - self._last_rx >= timeout:
                # Timers run before I/O in a loop iteration: after a stalled loop (a long callback)
                # the peer's frames may be waiting unread. Let the loop poll them before judging.
                for _ in range(2):
                    await asyncio.sleep(0)
                silent = time.monotonic() - self._last_rx
                if silent >= timeout:
                    self._lost(PeerClosed(f"no heartbeat from {self.peername} for {silent:.1f} s "
                                          f"(timeout {timeout:g} s): the peer is dead or unreachable"))
                    return
            now = time.monotonic()
            if now >= next_ping:
                # Heard from the peer within half an interval (its ping, our ping's pong, traffic):
                # it is alive and our answers keep it informed, so skip this ping. On an idle pair
                # one side ends up pinging and the other answering: fewer wake-ups, which cost
                # each process CPU even when idle.
                if now - self._last_rx >= interval / 2:
                    self.send(Ping(now))
                next_ping = now + interval
