"""Control-plane messages and their wire form.

A frame body is a msgpack array ``[kind, *fields]``; arrays are smaller and faster to pack than
maps, which matters for the 8-byte ping-pong. ``decode`` validates every field's type so a hostile
or buggy peer yields :class:`ProtocolError`, never a crash deep inside the state machine.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, Union

from ..errors import ProtocolError

PROTOCOL_VERSION = 1


class Kind(IntEnum):
    # data-path messages (after the handshake)
    EAGER = 1  # sender -> receiver: small message with its payload inline
    RTS = 2  # sender -> receiver: "ready to send" a large message
    CTS = 3  # receiver -> sender: "clear to send", where the destination lives
    ACK = 4  # receiver -> sender: eager message consumed by a recv
    NACK = 5  # receiver -> sender: message refused (mismatch, cancelled, failed)
    DONE = 6  # sender -> receiver: every byte written into the destination
    ABORT = 7  # sender -> receiver: no (more) bytes will be written
    RCANCEL = 8  # receiver -> sender: please stop writing into the destination
    PING = 9
    PONG = 10
    BYE = 11
    # handshake messages
    HELLO = 20
    WELCOME = 21
    READY = 22
    REFUSE = 23


class Code(IntEnum):
    """Why a message was refused or aborted."""

    MISMATCH = 1
    CANCELLED = 2
    FAILED = 3


@dataclass(frozen=True, slots=True)
class Eager:
    op: int
    tag: int
    dtype: str
    shape: tuple[int, ...]
    data: bytes


@dataclass(frozen=True, slots=True)
class Rts:
    op: int
    tag: int
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    device: str  # where the sender's bytes live ("cpu" or "cuda"); the receiver picks the link


@dataclass(frozen=True, slots=True)
class Cts:
    op: int
    addr: int
    capacity: int
    link: str  # which data-plane link to write over ("cpu" or "cuda")


@dataclass(frozen=True, slots=True)
class Ack:
    op: int


@dataclass(frozen=True, slots=True)
class Nack:
    op: int
    code: Code
    reason: str


@dataclass(frozen=True, slots=True)
class Done:
    op: int


@dataclass(frozen=True, slots=True)
class Abort:
    op: int
    code: Code
    reason: str


@dataclass(frozen=True, slots=True)
class RCancel:
    op: int


@dataclass(frozen=True, slots=True)
class Ping:
    stamp: float


@dataclass(frozen=True, slots=True)
class Pong:
    stamp: float


@dataclass(frozen=True, slots=True)
class Bye:
    reason: str


@dataclass(frozen=True, slots=True)
class Hello:
    """Client's opening: who it is and what it can do."""

    version: int
    info: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Welcome:
    version: int
    info: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Ready:
    info: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Refuse:
    reason: str


Message = Union[
    Eager, Rts, Cts, Ack, Nack, Done, Abort, RCancel, Ping, Pong, Bye, Hello, Welcome, Ready, Refuse
]

MAX_SHAPE_DIMS = 64
MAX_REASON = 4096


def encode(msg: Message) -> list[Any]:
    """Turn a message into the msgpack-ready array."""
    if isinstance(msg, Eager):
        return [Kind.EAGER, msg.op, msg.tag, msg.dtype, list(msg.shape), msg.data]
    if isinstance(msg, Rts):
        return [Kind.RTS, msg.op, msg.tag, msg.dtype, list(msg.shape), msg.nbytes, msg.device]
    if isinstance(msg, Cts):
        return [Kind.CTS, msg.op, msg.addr, msg.capacity, msg.link]
    if isinstance(msg, Ack):
        return [Kind.ACK, msg.op]
    if isinstance(msg, Nack):
        return [Kind.NACK, msg.op, int(msg.code), msg.reason]
    if isinstance(msg, Done):
        return [Kind.DONE, msg.op]
    if isinstance(msg, Abort):
        return [Kind.ABORT, msg.op, int(msg.code), msg.reason]
    if isinstance(msg, RCancel):
        return [Kind.RCANCEL, msg.op]
    if isinstance(msg, Ping):
        return [Kind.PING, msg.stamp]
    if isinstance(msg, Pong):
        return [Kind.PONG, msg.stamp]
    if isinstance(msg, Bye):
        return [Kind.BYE, msg.reason]
    if isinstance(msg, Hello):
        return [Kind.HELLO, msg.version, msg.info]
    if isinstance(msg, Welcome):
        return [Kind.WELCOME, msg.version, msg.info]
    if isinstance(msg, Ready):
        return [Kind.READY, msg.info]
    if isinstance(msg, Refuse):
        return [Kind.REFUSE, msg.reason]
    raise TypeError(f"not a message: {msg!r}")


def _int(v: Any, what: str, lo: int = 0, hi: int = 2**64 - 1) -> int:
    if type(v) is not int or not lo <= v <= hi:
        raise ProtocolError(f"bad {what}: {v!r}")
    return v


def _str(v: Any, what: str, limit: int = 256) -> str:
    if type(v) is not str or len(v) > limit:
        raise ProtocolError(f"bad {what}: {v!r:.80}")
    return v


def _float(v: Any, what: str) -> float:
    if type(v) not in (int, float):
        raise ProtocolError(f"bad {what}: {v!r:.80}")
    return float(v)


def _shape(v: Any) -> tuple[int, ...]:
    if type(v) is not list or len(v) > MAX_SHAPE_DIMS:
        raise ProtocolError(f"bad shape: {v!r:.80}")
    return tuple(_int(d, "shape dimension", 0, 2**62) for d in v)


def _info(v: Any) -> dict[str, Any]:
    if type(v) is not dict or not all(type(k) is str for k in v):
        raise ProtocolError(f"bad handshake info: {v!r:.80}")
    return v


def _code(v: Any) -> Code:
    try:
        return Code(_int(v, "code"))
    except ValueError:
        raise ProtocolError(f"unknown code {v!r}") from None


_TAG_MIN, _TAG_MAX = -(2**63), 2**63 - 1


def decode(obj: Any) -> Message:
    """Validate a decoded msgpack object and build the message; raise ProtocolError otherwise."""
    if type(obj) is not list or not obj:
        raise ProtocolError(f"a frame must be a non-empty array, got {type(obj).__name__}")
    kind, *f = obj
    try:
        k = Kind(kind) if isinstance(kind, int) and not isinstance(kind, bool) else None
    except ValueError:
        k = None
    if k is None:
        raise ProtocolError(f"unknown message kind {kind!r:.40}")
    arity = _ARITY[k]
    if len(f) != arity:
        raise ProtocolError(f"{k.name} takes {arity} fields, got {len(f)}")
    if k is Kind.EAGER:
        if type(f[4]) is not bytes:
            raise ProtocolError("EAGER payload must be bytes")
        return Eager(_int(f[0], "op"), _int(f[1], "tag", _TAG_MIN, _TAG_MAX), _str(f[2], "dtype"),
                     _shape(f[3]), f[4])
    if k is Kind.RTS:
        return Rts(_int(f[0], "op"), _int(f[1], "tag", _TAG_MIN, _TAG_MAX), _str(f[2], "dtype"),
                   _shape(f[3]), _int(f[4], "nbytes"), _str(f[5], "device"))
    if k is Kind.CTS:
        return Cts(_int(f[0], "op"), _int(f[1], "addr"), _int(f[2], "capacity"), _str(f[3], "link"))
    if k is Kind.ACK:
        return Ack(_int(f[0], "op"))
    if k is Kind.NACK:
        return Nack(_int(f[0], "op"), _code(f[1]), _str(f[2], "reason", MAX_REASON))
    if k is Kind.DONE:
        return Done(_int(f[0], "op"))
    if k is Kind.ABORT:
        return Abort(_int(f[0], "op"), _code(f[1]), _str(f[2], "reason", MAX_REASON))
    if k is Kind.RCANCEL:
        return RCancel(_int(f[0], "op"))
    if k is Kind.PING:
        return Ping(_float(f[0], "stamp"))
    if k is Kind.PONG:
        return Pong(_float(f[0], "stamp"))
    if k is Kind.BYE:
        return Bye(_str(f[0], "reason", MAX_REASON))
    if k is Kind.HELLO:
        return Hello(_int(f[0], "version"), _info(f[1]))
    if k is Kind.WELCOME:
        return Welcome(_int(f[0], "version"), _info(f[1]))
    if k is Kind.READY:
        return Ready(_info(f[0]))
    return Refuse(_str(f[0], "reason", MAX_REASON))


_ARITY = {
    Kind.EAGER: 5, Kind.RTS: 6, Kind.CTS: 4, Kind.ACK: 1, Kind.NACK: 3, Kind.DONE: 1, Kind.ABORT: 3,
    Kind.RCANCEL: 1, Kind.PING: 1, Kind.PONG: 1, Kind.BYE: 1, Kind.HELLO: 2, Kind.WELCOME: 2,
    Kind.READY: 1, Kind.REFUSE: 1,
}
