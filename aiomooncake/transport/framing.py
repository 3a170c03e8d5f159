"""Length-prefixed msgpack frames with a size cap.

Each frame is a 4-byte big-endian length followed by a msgpack body. The cap bounds what a peer can
make us buffer; a longer frame, or a body that is not valid msgpack, is a ProtocolError.
"""

from __future__ import annotations

import struct
from typing import Any

import msgpack

from ..core.messages import Message, decode, encode
from ..errors import ProtocolError

_HDR = struct.Struct(">I")
HEADER = _HDR.size


_packer = msgpack.Packer(use_bin_type=True)


def pack(msg: Message) -> bytes:
    body: bytes = _packer.pack(encode(msg))
    return _HDR.pack(len(body)) + body


def pack_into(parts: list[bytes], msg: Message) -> None:
    """Append the frame's header and body as two pieces (for writelines: no concatenation copy)."""
    body: bytes = _packer.pack(encode(msg))
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
                out.append(decode(_unpack(view[start:start + length])))
                pos = start + length
        finally:
            view.release()
        if buf:
            if pos:
                del buf[:pos]
        elif pos < n:
            buf += data[pos:]
        return out


def _unpack(body: bytes | memoryview) -> Any:
    try:
        return msgpack.unpackb(body, raw=False, strict_map_key=True, use_list=True,
                               max_bin_len=len(body), max_str_len=len(body),
                               max_array_len=len(body), max_map_len=len(body), max_ext_len=0)
    except Exception as e:  # msgpack raises a zoo of types on garbage
        raise ProtocolError(f"undecodable frame: {type(e).__name__}: {e}") from None
