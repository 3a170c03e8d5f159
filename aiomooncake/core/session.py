"""The per-peer rendezvous state machine (no I/O).

The adapter calls methods (``post_send``, ``post_recv``, ``receive``, ``accept`` ...); the session
updates its state and appends frames to :attr:`Session.outbox` and events to
:attr:`Session.events`, which the adapter drains after every call.

Send path (sender's view)::

    small:  EAGER ---------------------------------> ACK | NACK          => done | failed
    large:  RTS ---> CTS(addr, capacity) => WriteRequested ... write_finished => DONE  => done
                 \\-> NACK                                                               => failed

Receive path (receiver's view)::

    post_recv --(matches EAGER or RTS, in tag order)--> RecvMatched
    EAGER: adapter copies the payload, calls delivered()          => ACK,  RecvComplete
    RTS:   adapter prepares the destination, calls accept()       => CTS;  DONE => RecvComplete
    dtype or size differ                                            => NACK, RecvFailed(MessageMismatch)

Cancellation: an unmatched receive is withdrawn locally; a receive whose CTS went out sends RCANCEL
and is only released (RecvReleased) once the sender answers DONE or ABORT, so no byte lands in its
buffer afterwards. A cancelled send sends ABORT; an unmatched message is withdrawn by the receiver.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum
from typing import Union

from ..errors import (
    AiomooncakeError,
    ConfigurationError,
    MessageMismatch,
    PeerClosed,
    ProtocolError,
    TransferCancelled,
    TransferFailed,
)
from .matching import TagMatcher
from .messages import (
    _TAG_MAX,
    _TAG_MIN,
    MAX_SHAPE_DIMS,
    Abort,
    Ack,
    Acks,
    Code,
    Cts,
    Done,
    Dones,
    Eager,
    Message,
    Nack,
    RCancel,
    Rts,
)


class SendState(Enum):
    EAGER_SENT = "eager-sent"
    RTS_SENT = "rts-sent"
    WRITING = "writing"
    CANCELLING = "cancelling"
    DONE = "done"
    FAILED = "failed"


class RecvState(Enum):
    POSTED = "posted"
    MATCHED = "matched"
    CTS_SENT = "cts-sent"
    CANCELLING = "cancelling"
    DONE = "done"
    FAILED = "failed"


@dataclass(slots=True, unsafe_hash=True)
class RecvSpec:
    """What a receive expects; ``None`` fields accept anything (recv_tensor)."""

    dtype: str | None = None
    numel: int | None = None


@dataclass(eq=False, slots=True)
class SendOp:
    id: int
    tag: int
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    device: str
    eager: bool
    state: SendState
    addr: int = 0
    capacity: int = 0
    link: str = ""
    epoch: int = 0  # the receiver's registration state announced with the CTS
    gen: int = 0
    context: object = None  # the adapter's handle (future, tensor, ...)
    cancelled_by: str = ""  # "sender" or "receiver" once a cancellation stopped the writes
    src: int = 0  # the source address offered for a pull (rendezvous on a same-host link)
    desc: bytes = b""  # the receiver's plane descriptor of the destination (from its CTS)


@dataclass(eq=False, slots=True)
class RecvOp:
    id: int
    tag: int
    spec: RecvSpec
    state: RecvState = RecvState.POSTED
    msg: Eager | Rts | None = None
    link: str = ""
    context: object = None

    @property
    def remote_op(self) -> int:
        assert self.msg is not None
        return self.msg.op


@dataclass(slots=True, unsafe_hash=True)
class SendComplete:
    op: SendOp


@dataclass(slots=True, unsafe_hash=True)
class SendFailed:
    op: SendOp
    error: AiomooncakeError


@dataclass(slots=True, unsafe_hash=True)
class WriteRequested:
    """The receiver is ready: write ``op.nbytes`` into ``[op.addr, op.addr + op.capacity)``."""

    op: SendOp


@dataclass(slots=True, unsafe_hash=True)
class StopWriting:
    """The receiver cancelled: stop submitting writes, then call ``write_finished``."""

    op: SendOp


@dataclass(slots=True, unsafe_hash=True)
class RecvMatched:
    """A receive matched a message; for eager ones ``op.msg.data`` holds the payload."""

    op: RecvOp


@dataclass(slots=True, unsafe_hash=True)
class RecvComplete:
    op: RecvOp


@dataclass(slots=True, unsafe_hash=True)
class RecvFailed:
    op: RecvOp
    error: AiomooncakeError


@dataclass(slots=True, unsafe_hash=True)
class RecvReleased:
    """A cancelled receive's buffer is safe: the sender will write no more into it."""

    op: RecvOp


@dataclass(slots=True, unsafe_hash=True)
class MessageArrived:
    """An unexpected message is waiting (used for any-source receives)."""

    tag: int


Event = Union[  # noqa: UP007
    SendComplete, SendFailed, WriteRequested, StopWriting, RecvMatched, RecvComplete, RecvFailed,
    RecvReleased, MessageArrived,
]


def numel_of(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


@dataclass(eq=False)
class Session:
    """Both halves (sending and receiving) of the protocol with one peer."""

    eager_threshold: int = 64 * 1024
    outbox: list[Message] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    closed: AiomooncakeError | None = None

    def __post_init__(self) -> None:
        self._next_send = 1
        self._next_recv = 1
        self._sends: dict[int, SendOp] = {}
        self._incoming: dict[int, RecvOp] = {}  # remote op id -> matched receive
        self._unexpected: dict[int, Eager | Rts] = {}  # remote op id -> unmatched message
        self._matcher: TagMatcher[RecvOp, Eager | Rts] = TagMatcher()

    # ------------------------------------------------------------------ sending
    def post_send(self, tag: int, dtype: str, shape: tuple[int, ...], nbytes: int, device: str,
                  payload: bytes | None, src: int = 0, epoch: int = 0, gen: int = 0,
                  desc: bytes = b"") -> SendOp:
        """Start a send. Pass ``payload`` (the bytes) for an eager send, ``None`` for rendezvous.
        A rendezvous may offer ``src``, the source's address, for the receiver to pull from (a
        same-host link; over the engine with the sender's registration ``epoch`` and ``gen``): it
        then answers with ACK (pulled) or, as usual, CTS or NACK."""
        self._check_open()
        _check_tag(tag)
        if len(shape) > MAX_SHAPE_DIMS:
            raise ConfigurationError(f"cannot send a tensor of {len(shape)} dimensions; the protocol "
                                     f"carries at most {MAX_SHAPE_DIMS}")
        eager = payload is not None
        if payload is not None and len(payload) != nbytes:
            raise ValueError("eager payload length differs from nbytes")
        op = SendOp(self._next_send, tag, dtype, shape, nbytes, device, eager,
                    SendState.EAGER_SENT if eager else SendState.RTS_SENT, src=0 if eager else src)
        self._next_send += 1
        self._sends[op.id] = op
        if payload is not None:
            self.outbox.append(Eager(op.id, tag, dtype, shape, payload, device))
        else:
            self.outbox.append(Rts(op.id, tag, dtype, shape, nbytes, device, op.src, epoch, gen,
                                   desc if op.src else b""))
        return op

    def is_eager(self, nbytes: int) -> bool:
        return nbytes <= self.eager_threshold

    def write_finished(self, op: SendOp, error: AiomooncakeError | None = None) -> None:
        """The adapter's writes for ``op`` have all settled (``error`` if any failed)."""
        if self.closed is not None:
            # close() already failed the op (StopWriting, SendFailed) and nobody is listening.
            if op.state is SendState.CANCELLING:
                op.state = SendState.FAILED
            return
        if op.state is SendState.WRITING and error is None:
            self.outbox.append(Done(op.id))
            self._finish_send(op, None)
        elif op.state is SendState.WRITING:
            self.outbox.append(Abort(op.id, Code.FAILED, str(error)))
            self._finish_send(op, error)
        elif op.state is SendState.CANCELLING:
            # One side asked to stop; whatever happened, the receiver gets a final word.
            by_receiver = op.cancelled_by == "receiver"
            if error is None:
                self.outbox.append(Done(op.id))
            else:
                self.outbox.append(Abort(op.id, Code.CANCELLED, "cancelled by the receiver" if by_receiver
                                         else "the sender cancelled this message"))
            self._finish_send(op, TransferCancelled(
                f"the receiver cancelled its recv (tag {op.tag}) before this message arrived"
                if by_receiver else f"the send (tag {op.tag}) was cancelled"))

    def cancel_send(self, op: SendOp) -> bool:
        """Withdraw a send the caller gave up on. Returns True if the adapter must still wait for
        in-flight writes (then call ``write_finished``); the op is otherwise finished now."""
        if op.state in (SendState.EAGER_SENT, SendState.RTS_SENT):
            self.outbox.append(Abort(op.id, Code.CANCELLED, "the sender cancelled this message"))
            self._sends.pop(op.id, None)
            op.state = SendState.FAILED
            return False
        if op.state is SendState.WRITING:
            op.state = SendState.CANCELLING
            op.cancelled_by = "sender"
            return True
        return op.state is SendState.CANCELLING

    def _finish_send(self, op: SendOp, error: AiomooncakeError | None) -> None:
        self._sends.pop(op.id, None)
        if error is None:
            op.state = SendState.DONE
            self.events.append(SendComplete(op))
        else:
            op.state = SendState.FAILED
            self.events.append(SendFailed(op, error))

    # ---------------------------------------------------------------- receiving
    def post_recv(self, tag: int, spec: RecvSpec) -> RecvOp:
        self._check_open()
        _check_tag(tag)
        op = RecvOp(self._next_recv, tag, spec)
        self._next_recv += 1
        msg = self._matcher.post(tag, op)
        if msg is not None:
            del self._unexpected[msg.op]
            self._match(op, msg)
        return op

    def accept(self, op: RecvOp, link: str, addr: int, capacity: int, epoch: int = 0, gen: int = 0,
               desc: bytes = b"") -> None:
        """The destination of a matched rendezvous receive is ready at ``addr``."""
        if op.state is not RecvState.MATCHED or not isinstance(op.msg, Rts):
            raise RuntimeError(f"accept() on a receive in state {op.state.value}")
        if self.closed is not None:
            return
        op.state = RecvState.CTS_SENT
        op.link = link
        self.outbox.append(Cts(op.remote_op, addr, capacity, link, epoch, gen, desc))

    def delivered(self, op: RecvOp) -> None:
        """The eager payload of ``op`` was copied into the destination."""
        if op.state is not RecvState.MATCHED or not isinstance(op.msg, Eager):
            raise RuntimeError(f"delivered() on a receive in state {op.state.value}")
        self._acked(op)

    def pulled(self, op: RecvOp) -> None:
        """The adapter copied a matched rendezvous message from the source its RTS offered."""
        if op.state is not RecvState.MATCHED or not isinstance(op.msg, Rts) or not op.msg.src:
            raise RuntimeError(f"pulled() on a receive in state {op.state.value} without a pull offer")
        self._acked(op)

    def _acked(self, op: RecvOp) -> None:
        """The bytes are in: ACK completes the sender's op, and the receive is done."""
        self._incoming.pop(op.remote_op, None)
        if self.closed is None:
            self.outbox.append(Ack(op.remote_op))
        op.state = RecvState.DONE
        self.events.append(RecvComplete(op))

    def refuse(self, op: RecvOp, error: AiomooncakeError) -> None:
        """The adapter could not prepare or fill the destination of a matched receive."""
        if op.state is not RecvState.MATCHED:
            raise RuntimeError(f"refuse() on a receive in state {op.state.value}")
        code = Code.MISMATCH if isinstance(error, MessageMismatch) else Code.FAILED
        self._incoming.pop(op.remote_op, None)
        if self.closed is None:
            self.outbox.append(Nack(op.remote_op, code, str(error)))
        op.state = RecvState.FAILED
        self.events.append(RecvFailed(op, error))

    def cancel_recv(self, op: RecvOp) -> bool:
        """Give up on a receive. Returns True if the caller must wait for RecvReleased before the
        buffer is safe (the sender may be writing into it); False if it is safe now."""
        if op.state is RecvState.POSTED:
            self._matcher.withdraw_posted(op.tag, op)
            op.state = RecvState.FAILED
            return False
        if op.state is RecvState.MATCHED:
            self._incoming.pop(op.remote_op, None)
            if self.closed is None:
                self.outbox.append(Nack(op.remote_op, Code.CANCELLED, "the receiver cancelled its recv"))
            op.state = RecvState.FAILED
            return False
        if op.state is RecvState.CTS_SENT:
            op.state = RecvState.CANCELLING
            if self.closed is None:
                self.outbox.append(RCancel(op.remote_op))
                return True
            return False
        return op.state is RecvState.CANCELLING

    def _match(self, op: RecvOp, msg: Eager | Rts) -> None:
        op.msg = msg
        spec = op.spec
        numel = numel_of(msg.shape)
        nbytes = len(msg.data) if isinstance(msg, Eager) else msg.nbytes
        problem = None
        if spec.dtype is not None and spec.dtype != msg.dtype:
            problem = f"dtype differs: the sender sent {msg.dtype}, the recv expects {spec.dtype}"
        elif spec.numel is not None and spec.numel != numel:
            problem = (f"size differs: the sender sent {numel} elements ({nbytes} B) of {msg.dtype}, "
                       f"the recv's tensor holds {spec.numel}")
        self._incoming[msg.op] = op
        op.state = RecvState.MATCHED
        if problem is not None:
            self.refuse(op, MessageMismatch(f"tag {op.tag}: {problem}; no byte was written"))
            return
        self.events.append(RecvMatched(op))

    # ------------------------------------------------------------------- frames
    def receive(self, msg: Message) -> None:
        """Feed one data-path frame from the peer."""
        if self.closed is not None:
            return
        if isinstance(msg, (Eager, Rts)):
            if msg.op in self._incoming or msg.op in self._unexpected:
                raise ProtocolError(f"duplicate message id {msg.op}")
            recv = self._matcher.arrive(msg.tag, msg)
            if recv is None:
                self._unexpected[msg.op] = msg
                self.events.append(MessageArrived(msg.tag))
            else:
                self._match(recv, msg)
        elif isinstance(msg, Cts):
            self._on_cts(msg)
        elif isinstance(msg, Ack):
            self._on_ack(msg.op)
        elif isinstance(msg, Acks):  # a burst's ACKs, in order
            for op in msg.ops:
                self._on_ack(op)
        elif isinstance(msg, Dones):  # a burst's DONEs, in order (a refused one raises, as alone)
            for op in msg.ops:
                self._on_sender_final(Done(op))
        elif isinstance(msg, Nack):
            s = self._sends.get(msg.op)
            if s is not None and s.state in (SendState.EAGER_SENT, SendState.RTS_SENT):
                self._finish_send(s, _remote_error(msg.code, msg.reason))
        elif isinstance(msg, (Done, Abort)):
            self._on_sender_final(msg)
        elif isinstance(msg, RCancel):
            s = self._sends.get(msg.op)
            if s is not None and s.state is SendState.WRITING:
                s.state = SendState.CANCELLING
                s.cancelled_by = "receiver"
                self.events.append(StopWriting(s))
        else:
            raise ProtocolError(f"unexpected {type(msg).__name__} frame after the handshake")

    def _on_ack(self, op: int) -> None:
        s = self._sends.get(op)
        if s is not None and (s.state is SendState.EAGER_SENT or (s.state is SendState.RTS_SENT and s.src)):
            self._finish_send(s, None)

    def _on_cts(self, msg: Cts) -> None:
        s = self._sends.get(msg.op)
        if s is None or s.state is not SendState.RTS_SENT:
            return  # a race with our own cancellation: the receiver will see our ABORT
        if msg.capacity < s.nbytes:
            self.outbox.append(Abort(s.id, Code.MISMATCH, "destination too small"))
            self._finish_send(s, MessageMismatch(
                f"tag {s.tag}: the receiver's destination holds {msg.capacity} B, the message has "
                f"{s.nbytes} B; nothing was written"))
            return
        s.addr, s.capacity, s.link, s.epoch, s.gen = msg.addr, msg.capacity, msg.link, msg.epoch, msg.gen
        s.desc = msg.desc
        s.state = SendState.WRITING
        self.events.append(WriteRequested(s))

    def _on_sender_final(self, msg: Done | Abort) -> None:
        # Raise before changing anything, so a refused frame leaves the session consistent (and
        # close() still fails every pending receive).
        pending = self._unexpected.get(msg.op)
        if pending is not None:  # aborted before any receive matched it: withdraw
            if isinstance(msg, Done):
                raise ProtocolError(f"DONE for message {msg.op} that was never accepted")
            del self._unexpected[msg.op]
            self._matcher.withdraw_unexpected(pending.tag, pending)
            return
        r = self._incoming.get(msg.op)
        if r is None:
            return
        if isinstance(msg, Done) and r.state not in (RecvState.CTS_SENT, RecvState.CANCELLING):
            raise ProtocolError(f"DONE for message {msg.op} before its CTS")
        del self._incoming[msg.op]
        if r.state is RecvState.CANCELLING:
            r.state = RecvState.FAILED
            self.events.append(RecvReleased(r))
        elif isinstance(msg, Done):  # CTS_SENT
            r.state = RecvState.DONE
            self.events.append(RecvComplete(r))
        else:
            # MATCHED (we were preparing) or CTS_SENT: the sender gave up on this message
            r.state = RecvState.FAILED
            self.events.append(RecvFailed(r, _remote_error(msg.code, msg.reason, sender=True)))

    # -------------------------------------------------------------- lifecycle
    def close(self, error: AiomooncakeError | None = None) -> None:
        """The connection is gone: fail everything still pending with ``error`` (PeerClosed)."""
        if self.closed is not None:
            return
        err = error if error is not None else PeerClosed("the peer closed the connection")
        self.closed = err
        for s in list(self._sends.values()):
            if s.state is SendState.WRITING or s.state is SendState.CANCELLING:
                # The adapter still owns in-flight writes; it reports through write_finished.
                s.state = SendState.CANCELLING
                self.events.append(StopWriting(s))
                self.events.append(SendFailed(s, err))
            else:
                self.events.append(SendFailed(s, err))
                s.state = SendState.FAILED
        self._sends.clear()
        posted, _ = self._matcher.drain()
        for r in posted:
            r.state = RecvState.FAILED
            self.events.append(RecvFailed(r, err))
        for r in self._incoming.values():
            if r.state is RecvState.CANCELLING:
                self.events.append(RecvReleased(r))
            else:
                self.events.append(RecvFailed(r, err))
            r.state = RecvState.FAILED
        self._incoming.clear()
        self._unexpected.clear()

    def _check_open(self) -> None:
        if self.closed is not None:
            raise PeerClosed(f"the peer connection is closed ({self.closed})")

    def has_unexpected(self, tag: int) -> bool:
        return self._matcher.has_unexpected(tag)

    @property
    def pending(self) -> int:
        """Operations not yet finished (for diagnostics and tests)."""
        return len(self._sends) + len(self._incoming) + self._matcher.posted_count()


def _check_tag(tag: int) -> None:
    # The same bounds the peer's decoder enforces: a frame outside them would make it drop the
    # connection (failing everything with it) instead of failing this one call.
    if type(tag) is not int or not _TAG_MIN <= tag <= _TAG_MAX:
        raise ConfigurationError(f"a tag must be an int in [-2**63, 2**63 - 1], got {tag!r:.40}")


def _remote_error(code: Code, reason: str, sender: bool = False) -> AiomooncakeError:
    who = "sender" if sender else "receiver"
    if code is Code.MISMATCH:
        return MessageMismatch(f"the {who} refused the message: {reason}")
    if code is Code.CANCELLED:
        return TransferCancelled(f"the {who} cancelled: {reason}")
    return TransferFailed(f"the {who} failed: {reason}")
