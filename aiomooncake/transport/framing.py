"""Length-prefixed msgpack frames with a size cap.

Each frame is a 4-byte big-endian length followed by a msgpack body. The cap bounds what a peer can
make us buffer; a longer frame, or a body that is not valid msgpack, is a ProtocolError.

A burst of messages (a batch's RTS frames, the CTS, ACK or DONE frames answering it) may travel as
one BATCH frame, ``[BATCH, [message, ...]]``: one msgpack call to pack and to parse instead of one
per message, and the receiver sees the burst whole. Its messages are delivered in order, as if they
had come one by one; a BATCH inside a BATCH is a ProtocolError.
"""

from __future__ import annotations

import struct
from typing import Any

import msgpack

from ..core.messages import Message, coalesce, decode, encode
from ..errors import ProtocolError

_HDR = struct.Struct(">I")
HEADER = _HDR.size
BATCH = 12  # the kind of a frame that carries several messages (next to core.messages.Kind's)


_packer = msgpack.Packer(use_bin_type=True)


def pack(msg: Message) -> bytes:
    body: bytes = _packer.pack(encode(msg))
    return _HDR.pack(len(body)) + body


def pack_into(parts: list[bytes], msg: Message) -> None:
    """Append the frame's header and body as two pieces (for writelines: no concatenation copy)."""
    body: bytes = _packer.pack(encode(msg))
    parts.append(_HDR.pack(len(body)))
    parts.append(body)


def pack_batch_into(parts: list[bytes], msgs: list[Message], limit: int) -> None:
    """Append ``msgs`` as BATCH frames of at most ``limit`` bytes each (a message that alone exceeds
    it, such as a large eager payload, goes as a frame of its own); consecutive ACKs and DONEs
    travel as one ACKS or DONES message each (:func:`~aiomooncake.core.messages.coalesce`)."""
    _pack_encoded(parts, [encode(m) for m in coalesce(msgs)], limit)


def _pack_encoded(parts: list[bytes], encs: list[list[Any]], limit: int) -> None:
    if len(encs) == 1:
        body: bytes = _packer.pack(encs[0])
    else:
        body = _packer.pack([BATCH, encs])
        if len(body) > limit:  # split in halves: rare (bursts of small control frames fit)
            half = len(encs) // 2
            _pack_encoded(parts, encs[:half], limit)
            _pack_encoded(parts, encs[half:], limit)
            return
    parts.append(_HDR.pack(len(body)))
    parts.append(body)


class FrameDecoder:
    """Incremental decoder: feed bytes, get messages."""

    __slots__ = ("_buf", "max_frame")

    def __init__(self, max_frame: int) -> None:
        self._buf = bytearray()
        self.max_frame = max_frame

    def feed(self, data: bytes) -> list[Message]:
        buf = self._buf
        if buf:
            buf += data
            view = memoryview(buf)
        else:
            view = memoryview(data)  # common case: whole frames, parsed in place without a copy
        out: list[Message] = []
        pos = 0
        n = len(view)
        try:
            while n - pos >= HEADER:
                (length,) = _HDR.unpack_from(view, pos)
                if length > self.max_frame:
                    raise ProtocolError(f"frame of {length} B exceeds the cap of {self.max_frame} B")
                if n - pos - HEADER < length:
                    break
                start = pos + HEADER
                obj = _unpack(view[start:start + length])
                if type(obj) is list and len(obj) == 2 and obj[0] == BATCH:
                    _unbatch(obj[1], out)
                else:
                    out.append(decode(obj))
                pos = start + length
        finally:
            view.release()
        if buf:
            if pos:
                del buf[:pos]
        elif pos < n:
            buf += data[pos:]
        return out


def _unbatch(items: Any, out: list[Message]) -> None:
    if type(items) is not list:
        raise ProtocolError("a BATCH frame must carry an array of messages")
    for item in items:
        if type(item) is list and item and item[0] == BATCH:
            raise ProtocolError("a BATCH frame inside a BATCH frame")
        out.append(decode(item))


def _unpack(body: bytes | memoryview) -> Any:
    try:
        return msgpack.unpackb(body, raw=False, strict_map_key=True, use_list=True,
                               max_bin_len=len(body), max_str_len=len(body),
                               max_array_len=len(body), max_map_len=len(body), max_ext_len=0)
    except Exception as e:  # msgpack raises a zoo of types on garbage
        raise ProtocolError(f"undecodable frame: {type(e).__name__}: {e}") from None
