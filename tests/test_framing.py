"""Length-prefixed msgpack frames: any byte split decodes the same, and a hostile stream yields
ProtocolError before it can make us buffer more than the cap."""

from __future__ import annotations

import asyncio
import struct

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aiomooncake.core import messages as m
from aiomooncake.core.messages import Code, Kind
from aiomooncake.errors import ProtocolError
from aiomooncake.transport.framing import HEADER, FrameDecoder, pack

CAP = 64 * 1024

FRAMES: list[m.Message] = [
    m.Eager(1, 0, "float32", (4,), bytes(range(16))),
    m.Rts(2, -1, "int64", (3, 3), 72, "cpu"),
    m.Cts(2, 0xDEAD_B000, 72, "cpu"),
    m.Ack(1),
    m.Nack(3, Code.MISMATCH, "dtype differs"),
    m.Done(2),
    m.Abort(4, Code.CANCELLED, "gone"),
    m.RCancel(5),
    m.Ping(1.5),
    m.Pong(1.5),
    m.Bye("bye"),
    m.Hello(1, {"caps": ["tcp"]}),
    m.Welcome(1, {}),
    m.Ready({"ok": True}),
    m.Refuse("no"),
]
STREAM = b"".join(pack(f) for f in FRAMES)


def raw_frame(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


def test_pack_layout() -> None:
    data = pack(m.Ack(7))
    assert HEADER == 4
    (length,) = struct.unpack(">I", data[:4])
    assert length == len(data) - 4
    assert msgpack.unpackb(data[4:]) == [Kind.ACK, 7]


def test_whole_frame() -> None:
    d = FrameDecoder(CAP)
    assert d.feed(pack(m.Done(9))) == [m.Done(9)]
    assert d.feed(b"") == []


def test_many_frames_in_one_feed_keep_their_order() -> None:
    assert FrameDecoder(CAP).feed(STREAM) == FRAMES


def test_split_at_every_byte_boundary() -> None:
    for cut in range(len(STREAM) + 1):
        d = FrameDecoder(CAP)
        got = d.feed(STREAM[:cut]) + d.feed(STREAM[cut:])
        assert got == FRAMES, f"split at byte {cut}"


def test_split_twice_at_every_pair_of_boundaries_in_one_frame() -> None:
    data = pack(FRAMES[0]) + pack(FRAMES[1])
    for i in range(len(data) + 1):
        for j in range(i, len(data) + 1):
            d = FrameDecoder(CAP)
            assert d.feed(data[:i]) + d.feed(data[i:j]) + d.feed(data[j:]) == FRAMES[:2]


def test_one_byte_at_a_time() -> None:
    d = FrameDecoder(CAP)
    got: list[m.Message] = []
    counts = []
    for b in STREAM:
        out = d.feed(bytes([b]))
        counts.append(len(out))
        got += out
    assert got == FRAMES
    assert sum(counts) == len(FRAMES) and max(counts) == 1  # each frame comes out the moment it is whole


def test_partial_header_is_kept() -> None:
    d = FrameDecoder(CAP)
    frame = pack(m.Ack(1))
    assert d.feed(frame[:3]) == []
    assert d.feed(frame[3:4]) == []
    assert d.feed(frame[4:]) == [m.Ack(1)]


def test_frame_exactly_at_the_cap_is_accepted() -> None:
    payload_len = 100
    frame = pack(m.Eager(1, 0, "uint8", (payload_len,), b"x" * payload_len))
    body_len = len(frame) - HEADER
    assert FrameDecoder(body_len).feed(frame) == [m.Eager(1, 0, "uint8", (payload_len,), b"x" * payload_len)]
    with pytest.raises(ProtocolError, match="exceeds"):
        FrameDecoder(body_len - 1).feed(frame)


def test_oversize_length_is_refused_from_the_header_alone() -> None:
    """The cap must bite before the body arrives, or a peer could make us buffer 4 GiB."""
    d = FrameDecoder(CAP)
    with pytest.raises(ProtocolError, match="exceeds"):
        d.feed(struct.pack(">I", CAP + 1))
    with pytest.raises(ProtocolError):
        FrameDecoder(CAP).feed(b"\xff\xff\xff\xff")


def test_oversize_frame_after_good_ones() -> None:
    d = FrameDecoder(CAP)
    assert d.feed(pack(m.Ack(1))) == [m.Ack(1)]
    with pytest.raises(ProtocolError):
        d.feed(pack(m.Ack(2)) + struct.pack(">I", CAP + 1))


@pytest.mark.parametrize("body", [
    b"",  # empty body
    b"\xc1",  # the one byte msgpack never uses
    b"\x92\x04",  # array of 2 with one element: truncated
    b"\xdd\xff\xff\xff\xff",  # array claiming 4 G elements
    b"\xc6\x7f\xff\xff\xff\x00",  # bin claiming 2 GiB
    msgpack.packb([4, 1]) + msgpack.packb([4, 2]),  # two objects in one frame
    msgpack.packb(msgpack.ExtType(1, b"xx")),  # ext types are not part of the protocol
    msgpack.packb(msgpack.Timestamp(1, 0)),
    msgpack.packb([Kind.HELLO, 1, {1: "int key"}], strict_types=False),  # non-str map key
    b"\x94\xa1",  # string claiming a byte that is not there
], ids=repr)
def test_garbage_body(body: bytes) -> None:
    with pytest.raises(ProtocolError):
        FrameDecoder(CAP).feed(raw_frame(body))


@pytest.mark.parametrize("obj", [{"kind": 4}, 4, "ack", [], [4], [4, True], [99, 1], [4, 1, 2]], ids=repr)
def test_valid_msgpack_but_not_a_message(obj: object) -> None:
    with pytest.raises(ProtocolError):
        FrameDecoder(CAP).feed(raw_frame(msgpack.packb(obj)))


def test_unicode_garbage_in_str_is_a_protocol_error() -> None:
    body = b"\x92\x0b\xa2\xff\xfe"  # [BYE, <str of 2 invalid utf-8 bytes>]
    with pytest.raises(ProtocolError):
        FrameDecoder(CAP).feed(raw_frame(body))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(FRAMES), min_size=1, max_size=8), st.data())
def test_random_splits(frames: list[m.Message], data: st.DataObject) -> None:
    stream = b"".join(pack(f) for f in frames)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
    d = FrameDecoder(CAP)
    got: list[m.Message] = []
    prev = 0
    for c in [*cuts, len(stream)]:
        got += d.feed(stream[prev:c])
        prev = c
    assert got == frames


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64))
def test_random_bytes_never_crash(body: bytes) -> None:
    try:
        out = FrameDecoder(CAP).feed(raw_frame(body))
    except ProtocolError:
        return
    assert len(out) == 1  # one whole frame: exactly one message, or an error


class _Recorder:
    """A stand-in asyncio transport that records each write call (the syscalls we would make)."""

    def __init__(self) -> None:
        self.calls: list[bytes] = []

    def writelines(self, parts: list[bytes]) -> None:
        self.calls.append(b"".join(parts))

    def write(self, data: bytes) -> None:
        self.calls.append(data)

    def get_extra_info(self, name: str) -> None:
        return None


async def test_replies_to_one_read_leave_in_one_write() -> None:
    from aiomooncake.transport.connection import Connection, Policy

    conn = Connection(CAP)
    rec = _Recorder()
    conn.connection_made(rec)  # type: ignore[arg-type]
    conn.data_received(pack(m.Ping(1.0)) + pack(m.Ping(2.0)) + pack(m.Ping(3.0)))
    assert len(rec.calls) == 1, rec.calls
    assert FrameDecoder(CAP).feed(rec.calls[0]) == [m.Pong(1.0), m.Pong(2.0), m.Pong(3.0)]
    conn.data_received(pack(m.Ping(4.0)))  # a single frame is answered at once, as before
    assert len(rec.calls) == 2
    unbatched = Connection(CAP, Policy(batch_replies=False))
    unbatched.connection_made(rec)  # type: ignore[arg-type]
    unbatched.data_received(pack(m.Ping(5.0)) + pack(m.Ping(6.0)))
    assert len(rec.calls) == 4  # one write per reply without the batching


async def test_a_lone_ack_waits_two_loop_turns_unless_acks_leave_at_once() -> None:
    """Towards a sleeping remote an ACK alone is held two loop turns (a reply sent meanwhile takes
    it along in one write); with ``ack_now`` (a busy-polling remote, or ``hold_acks=False``) it
    leaves at once."""
    from aiomooncake.transport.connection import Connection, Policy

    conn = Connection(CAP)
    rec = _Recorder()
    conn.connection_made(rec)  # type: ignore[arg-type]
    conn.send(m.Ack(1))
    await asyncio.sleep(0)
    assert rec.calls == [], "an ACK alone left before two loop turns"
    conn.send(m.Eager(2, 0, "uint8", (1,), b"x"))  # the reply: goes now, with the held ACK
    assert len(rec.calls) == 1
    assert FrameDecoder(CAP).feed(rec.calls[0]) == [m.Ack(1), m.Eager(2, 0, "uint8", (1,), b"x")]
    conn.send(m.Ack(3))
    for _ in range(3):
        await asyncio.sleep(0)
    assert len(rec.calls) == 2, "a held ACK never left"
    conn = Connection(CAP, Policy(ack_now=True))
    conn.connection_made(rec)  # type: ignore[arg-type]
    conn.send(m.Ack(4))
    assert len(rec.calls) == 3 and FrameDecoder(CAP).feed(rec.calls[2]) == [m.Ack(4)]


def test_a_burst_travels_as_one_batch_frame_and_comes_back_in_order() -> None:
    from aiomooncake.transport.framing import pack_batch_into

    burst: list[m.Message] = [m.Rts(i, i % 3, "uint8", (1 << 20,), 1 << 20, "cuda", 0x1000 * i, 1, 2,
                                    bytes(88)) for i in range(1, 300)]
    burst += [m.Ack(7), m.Done(8)]
    parts: list[bytes] = []
    pack_batch_into(parts, burst, CAP)
    assert len(parts) == 2, "one frame (a header and a body) for the whole burst"
    assert FrameDecoder(CAP).feed(b"".join(parts)) == burst
    # a frame cap smaller than the burst: several BATCH frames, each within it, same messages
    small: list[bytes] = []
    pack_batch_into(small, burst, 4096)
    assert len(small) > 2 and all(len(b) <= 4096 for b in small[1::2])
    assert all(int.from_bytes(h, "big") == len(b) and len(h) == HEADER
               for h, b in zip(small[::2], small[1::2], strict=True))
    assert FrameDecoder(CAP).feed(b"".join(small)) == burst


def test_a_burst_of_completions_travels_as_one_acks_and_one_dones_message() -> None:
    from aiomooncake.transport.framing import pack_batch_into

    burst: list[m.Message] = [m.Ack(i) for i in range(1, 257)]
    burst += [m.Done(i) for i in range(300, 556)]
    parts: list[bytes] = []
    pack_batch_into(parts, burst, CAP)
    got = FrameDecoder(CAP).feed(b"".join(parts))
    assert got == [m.Acks(list(range(1, 257))), m.Dones(list(range(300, 556)))]
    assert len(b"".join(parts)) < 4 * len(burst), "an id costs a few bytes, not a message"


def test_a_message_larger_than_the_batch_limit_goes_alone() -> None:
    from aiomooncake.transport.framing import pack_batch_into

    big = m.Eager(1, 0, "uint8", (60_000,), bytes(60_000))
    msgs: list[m.Message] = [m.Ack(1), big, m.Ack(2)]
    parts: list[bytes] = []
    pack_batch_into(parts, msgs, 8192)
    assert FrameDecoder(CAP).feed(b"".join(parts)) == msgs


@pytest.mark.parametrize("body", [[12, 5], [12, [[12, []]]], [12, [[4, 1], "x"]], [12, [[4, "a"]]]],
                         ids=["not-a-list", "nested", "not-a-message", "bad-field"])
def test_malformed_batch_frames_are_protocol_errors(body: object) -> None:
    raw = msgpack.packb(body, use_bin_type=True)
    with pytest.raises(ProtocolError):
        FrameDecoder(CAP).feed(len(raw).to_bytes(4, "big") + raw)
