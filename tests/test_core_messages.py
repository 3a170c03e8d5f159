"""Wire form of the control messages: every kind round-trips, and ``decode`` turns every malformed
frame into ProtocolError (never another exception, never a half-valid message)."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aiomooncake.core import messages as m
from aiomooncake.core.messages import Code, Kind, decode, encode
from aiomooncake.errors import AiomooncakeError, ProtocolError

# One instance of every message kind, with fields chosen to exercise the edges of their ranges.
SAMPLES: list[m.Message] = [
    m.Eager(1, 0, "float32", (2, 3), b"\x00" * 24),
    m.Eager(2**64 - 1, -(2**63), "uint8", (), b""),  # largest op, smallest tag, scalar, no bytes
    m.Rts(7, 2**63 - 1, "bfloat16", (1024, 1024), 2 * 1024 * 1024, "cuda"),
    m.Rts(9, 1, "uint8", (64,), 64, "cuda", 0x7F00_0000_2000, 5, 2),  # a pull offer over the engine
    m.Cts(7, 0x7F00_0000_1000, 2 * 1024 * 1024, "cpu", 12, 3),  # registration epoch and gen
    m.Ack(3),
    m.Acks([3, 4, 2**64 - 1]),
    m.Nack(4, Code.MISMATCH, "dtype differs"),
    m.Done(5),
    m.Dones([5, 6]),
    m.Abort(6, Code.CANCELLED, "the sender cancelled this message"),
    m.RCancel(8),
    m.Ping(1234.5),
    m.Pong(0.25),
    m.Bye("shutting down"),
    m.Hello(1, {"caps": ["tcp", "rdma"], "transport": "auto", "host_id": "h1"}),
    m.Welcome(1, {"segment": "10.0.0.1:1234"}),
    m.Ready({}),
    m.Refuse("bad secret"),
]


def wire(msg: m.Message) -> Any:
    """What the peer's decoder hands to ``decode``: the msgpack round trip of ``encode``."""
    return msgpack.unpackb(msgpack.packb(encode(msg), use_bin_type=True), raw=False)


def test_samples_cover_every_kind() -> None:
    assert {encode(s)[0] for s in SAMPLES} == set(Kind)


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda s: type(s).__name__)
def test_roundtrip_through_msgpack(msg: m.Message) -> None:
    back = decode(wire(msg))
    assert type(back) is type(msg)
    assert back == msg


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda s: type(s).__name__)
def test_roundtrip_without_msgpack(msg: m.Message) -> None:
    assert decode(encode(msg)) == msg


def test_encoded_form_is_a_plain_array() -> None:
    assert encode(m.Ack(9)) == [Kind.ACK, 9]
    assert encode(m.Nack(9, Code.FAILED, "x")) == [Kind.NACK, 9, 3, "x"]
    assert encode(m.Eager(1, 2, "int8", (3,), b"abc")) == [Kind.EAGER, 1, 2, "int8", [3], b"abc", "cpu"]


def test_decoded_codes_and_shapes_have_their_proper_types() -> None:
    nack = decode(wire(m.Nack(1, Code.CANCELLED, "r")))
    assert isinstance(nack, m.Nack) and nack.code is Code.CANCELLED
    rts = decode(wire(m.Rts(1, 0, "float32", (4, 5), 80, "cpu")))
    assert isinstance(rts, m.Rts) and rts.shape == (4, 5) and type(rts.shape) is tuple


def test_ping_accepts_an_integer_stamp_as_float() -> None:
    ping = decode([Kind.PING, 3])
    assert ping == m.Ping(3.0) and type(ping.stamp) is float


def test_encode_rejects_non_messages() -> None:
    with pytest.raises(TypeError):
        encode(("not", "a", "message"))  # type: ignore[arg-type]


def test_protocol_error_is_a_library_error() -> None:
    with pytest.raises(AiomooncakeError):
        decode(None)


# ------------------------------------------------------------------------- frame shape
@pytest.mark.parametrize("obj", [None, {}, (), (Kind.ACK, 1), "ack", b"\x04\x01", 4, 4.0, True, []],
                         ids=repr)
def test_non_list_or_empty_frame(obj: Any) -> None:
    with pytest.raises(ProtocolError):
        decode(obj)


@pytest.mark.parametrize("kind", [0, 12, 19, 24, 255, -1, 2**70, True, False, 4.0, "4", b"\x04", None, [4]],
                         ids=repr)
def test_unknown_kind(kind: Any) -> None:
    with pytest.raises(ProtocolError, match="kind"):
        decode([kind, 1])


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda s: type(s).__name__)
def test_wrong_arity(msg: m.Message) -> None:
    frame = encode(msg)
    name = Kind(frame[0]).name
    with pytest.raises(ProtocolError, match=name):
        decode([*frame, 0])
    with pytest.raises(ProtocolError, match=name):
        decode(frame[:-1])
    with pytest.raises(ProtocolError):
        decode(frame[:1])


# ------------------------------------------------------------------------- field types
def _replace(msg: m.Message, index: int, value: Any) -> list[Any]:
    frame = encode(msg)
    frame[index] = value
    return frame


EAGER = m.Eager(1, 5, "float32", (2,), b"\x00" * 8)
RTS = m.Rts(1, 5, "float32", (2,), 8, "cpu")
CTS = m.Cts(1, 4096, 8, "cpu", 5, 2)


# (message, field index in the frame, bad value)
BAD_FIELDS: list[tuple[m.Message, int, Any]] = [
    # bool where an int is expected (bool is an int subclass in Python and in msgpack's eyes)
    (m.Ack(1), 1, True),
    (m.Done(1), 1, False),
    (EAGER, 2, True),
    (RTS, 5, True),
    (CTS, 2, True),
    (CTS, 3, False),
    (m.Nack(1, Code.FAILED, "r"), 2, True),
    (m.Hello(1, {}), 1, True),
    # negative or out-of-range ids and sizes
    (m.Ack(1), 1, -1),
    (m.RCancel(1), 1, -5),
    (m.Ack(1), 1, 2**64),
    (RTS, 5, -1),
    (CTS, 2, -4096),
    (CTS, 3, -1),
    (EAGER, 2, 2**63),
    (EAGER, 2, -(2**63) - 1),
    # floats, strings, None where an int is expected
    (m.Ack(1), 1, 1.0),
    (m.Ack(1), 1, "1"),
    (m.Ack(1), 1, None),
    (RTS, 1, 1.5),
    # codes
    (m.Nack(1, Code.FAILED, "r"), 2, 0),
    (m.Nack(1, Code.FAILED, "r"), 2, 4),
    (m.Abort(1, Code.FAILED, "r"), 2, "failed"),
    # strings
    (EAGER, 3, b"float32"),
    (EAGER, 3, 7),
    (EAGER, 3, "x" * 257),
    (RTS, 6, None),
    (CTS, 4, ["cpu"]),
    (CTS, 5, True),
    (CTS, 5, -1),
    (CTS, 6, 1.0),
    (CTS, 6, None),
    (m.Bye("r"), 1, "x" * (m.MAX_REASON + 1)),
    (m.Nack(1, Code.FAILED, "r"), 3, b"reason"),
    (m.Refuse("r"), 1, 0),
    # payload must be bytes
    (EAGER, 5, "\x00" * 8),
    (EAGER, 5, bytearray(8)),
    (EAGER, 5, [0] * 8),
    (EAGER, 5, None),
    (EAGER, 5, memoryview(b"\x00" * 8)),
    # shapes
    (EAGER, 4, (2,)),  # a tuple never comes out of msgpack with use_list=True
    (EAGER, 4, 2),
    (EAGER, 4, None),
    (EAGER, 4, [True]),
    (EAGER, 4, [-1]),
    (EAGER, 4, [2.0]),
    (EAGER, 4, ["2"]),
    (RTS, 4, [2**62 + 1]),
    (RTS, 4, [2**64]),
    (RTS, 4, [1] * (m.MAX_SHAPE_DIMS + 1)),
    # stamps
    (m.Ping(1.0), 1, "now"),
    (m.Pong(1.0), 1, None),
    (m.Ping(1.0), 1, True),
    # handshake info
    (m.Hello(1, {}), 2, []),
    (m.Welcome(1, {}), 2, {1: "x"}),
    (m.Ready({}), 1, {b"caps": []}),
    (m.Ready({}), 1, None),
]


@pytest.mark.parametrize(("msg", "index", "value"), BAD_FIELDS,
                         ids=[f"{type(b[0]).__name__}[{b[1]}]={b[2]!r:.20}" for b in BAD_FIELDS])
def test_bad_field(msg: m.Message, index: int, value: Any) -> None:
    frame = _replace(msg, index, value)
    assert decode(encode(msg)) == msg  # the unmodified frame is fine
    with pytest.raises(ProtocolError):
        decode(frame)


def test_limits_are_inclusive() -> None:
    assert decode(_replace(RTS, 4, [2**62])).shape == (2**62,)  # type: ignore[union-attr]
    assert len(decode(_replace(RTS, 4, [1] * m.MAX_SHAPE_DIMS)).shape) == m.MAX_SHAPE_DIMS  # type: ignore[union-attr]
    assert decode(_replace(EAGER, 3, "x" * 256)).dtype == "x" * 256  # type: ignore[union-attr]
    assert decode(_replace(m.Bye(""), 1, "r" * m.MAX_REASON)) == m.Bye("r" * m.MAX_REASON)
    assert decode(_replace(CTS, 2, 2**64 - 1)).addr == 2**64 - 1  # type: ignore[union-attr]
    assert decode(_replace(EAGER, 2, 2**63 - 1)).tag == 2**63 - 1  # type: ignore[union-attr]


def test_error_messages_are_bounded() -> None:
    """A hostile peer's huge field must not end up verbatim in the error (and the log)."""
    with pytest.raises(ProtocolError) as info:
        decode(_replace(EAGER, 3, "x" * 100_000))
    assert len(str(info.value)) < 200
    with pytest.raises(ProtocolError) as info:
        decode(_replace(RTS, 4, [1] * 100_000))
    assert len(str(info.value)) < 200


# ------------------------------------------------------------------------- properties
tags = st.integers(-(2**63), 2**63 - 1)
ops = st.integers(0, 2**64 - 1)
dims = st.lists(st.integers(0, 2**62), max_size=m.MAX_SHAPE_DIMS).map(tuple)
names = st.text(max_size=256)
reasons = st.text(max_size=200)
codes = st.sampled_from(list(Code))
info_values = st.one_of(st.integers(-(2**63), 2**63 - 1), st.text(max_size=10),
                        st.lists(st.text(max_size=5), max_size=3))
infos = st.dictionaries(st.text(max_size=10), info_values, max_size=4)
stamps = st.floats(allow_nan=False)

messages = st.one_of(
    st.builds(m.Eager, ops, tags, names, dims, st.binary(max_size=64)),
    st.builds(m.Rts, ops, tags, names, dims, ops, names),
    st.builds(m.Cts, ops, ops, ops, names, ops, ops),
    st.builds(m.Ack, ops),
    st.builds(m.Nack, ops, codes, reasons),
    st.builds(m.Done, ops),
    st.builds(m.Abort, ops, codes, reasons),
    st.builds(m.RCancel, ops),
    st.builds(m.Ping, stamps),
    st.builds(m.Pong, stamps),
    st.builds(m.Bye, reasons),
    st.builds(m.Hello, ops, infos),
    st.builds(m.Welcome, ops, infos),
    st.builds(m.Ready, infos),
    st.builds(m.Refuse, reasons),
)


@settings(max_examples=300, deadline=None)
@given(messages)
def test_any_valid_message_roundtrips(msg: m.Message) -> None:
    assert decode(wire(msg)) == msg


leaves = st.one_of(st.none(), st.booleans(), st.integers(-(2**64), 2**64), st.floats(), st.text(max_size=8),
                   st.binary(max_size=8))
objects = st.recursive(leaves, lambda kids: st.one_of(st.lists(kids, max_size=7),
                                                      st.dictionaries(st.text(max_size=4), kids, max_size=3)),
                       max_leaves=20)
kinds = st.one_of(st.sampled_from([int(k) for k in Kind]), st.integers(-2, 30), leaves)


@settings(max_examples=500, deadline=None)
@given(kinds, st.lists(objects, max_size=7))
def test_decode_never_crashes(kind: Any, fields: list[Any]) -> None:
    """Whatever arrives, decode returns a message or raises ProtocolError, nothing else."""
    try:
        msg = decode([kind, *fields])
    except ProtocolError:
        return
    # what was accepted is well-formed: it survives its own round trip
    assert decode(encode(msg)) == msg


# ----------------------------------------------------------------------- coalesced completions
def test_coalesce_turns_runs_of_acks_and_dones_into_one_message_each_in_order() -> None:
    rts = m.Rts(9, 1, "uint8", (64,), 64, "cpu")
    msgs: list[m.Message] = [m.Ack(1), m.Ack(2), m.Ack(3), rts, m.Done(4), m.Done(5), m.Ack(6),
                             m.Done(7), m.Done(8)]
    assert m.coalesce(msgs) == [m.Acks([1, 2, 3]), rts, m.Dones([4, 5]), m.Ack(6), m.Dones([7, 8])]
    assert m.coalesce([m.Ack(1), rts, m.Done(2)]) == [m.Ack(1), rts, m.Done(2)]  # no run: unchanged
    assert m.coalesce([]) == []


def test_coalesce_caps_a_message_at_max_coalesced_ids() -> None:
    n = m.MAX_COALESCED + 5
    out = m.coalesce([m.Ack(i) for i in range(n)])
    assert out == [m.Acks(list(range(m.MAX_COALESCED))), m.Acks(list(range(m.MAX_COALESCED, n)))]
    assert [decode(wire(x)) for x in out] == out


@pytest.mark.parametrize("body", [[Kind.ACKS, []], [Kind.ACKS, [1, "x"]], [Kind.DONES, [-1]],
                                  [Kind.DONES, 5], [Kind.ACKS, [2**64]],
                                  [Kind.ACKS, list(range(m.MAX_COALESCED + 1))]],
                         ids=["empty", "not-an-int", "negative", "not-a-list", "too-large", "too-many"])
def test_malformed_coalesced_completions_are_protocol_errors(body: list[Any]) -> None:
    with pytest.raises(ProtocolError):
        decode(body)
