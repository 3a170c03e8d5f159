"""Control-plane fuzzing, the CI-sized runs.

1. In process, fast: hypothesis streams of hostile bytes into a real :class:`Connection` whose
   handler is a real rendezvous :class:`Session` (what a Peer does, minus the data plane). Whatever
   arrives, ``data_received`` never raises; an undecodable frame closes the connection with a
   logged ProtocolError; frames before it are delivered in order.
2. Live, small: ``tests/tools/fuzz_control.py`` against a listener in another process, while a
   well-behaved peer keeps doing checksummed round trips with it (the full run is in
   docs/reliability.md).
"""

from __future__ import annotations

import asyncio
import logging
import struct
from typing import Any

import msgpack
from harness import load_script
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aiomooncake.core import messages as m
from aiomooncake.core.session import Session
from aiomooncake.errors import PeerClosed, ProtocolError
from aiomooncake.transport.connection import Connection
from aiomooncake.transport.framing import FrameDecoder, pack

fz = load_script("fuzz_control")
CAP = fz.MAX_FRAME


class _Transport:
    """Enough of an asyncio transport for a Connection: records writes and close."""

    def __init__(self) -> None:
        self.out = bytearray()
        self.closed = False

    def write(self, data: bytes) -> None:
        self.out += data

    def writelines(self, parts: list[bytes]) -> None:
        for p in parts:
            self.out += p

    def close(self) -> None:
        self.closed = True

    def get_extra_info(self, name: str) -> Any:
        return ("127.0.0.1", 1) if name in ("peername", "sockname") else None


def _connection() -> tuple[Connection, _Transport, list[m.Message], list[BaseException]]:
    conn = Connection(CAP)
    tr = _Transport()
    conn.connection_made(tr)  # type: ignore[arg-type]
    session = Session()
    got: list[m.Message] = []
    lost: list[BaseException] = []

    def handler(msg: m.Message) -> None:
        got.append(msg)
        session.receive(msg)
        session.outbox.clear()
        session.events.clear()

    conn._handler = handler  # past the handshake, without starting heartbeats
    conn._on_lost = lost.append
    return conn, tr, got, lost


def _expected(stream: bytes) -> tuple[list[m.Message], bool]:
    """What the decoder makes of ``stream``: the frames before the first bad one, and whether
    there is a bad one."""
    d = FrameDecoder(CAP)
    out: list[m.Message] = []
    pos = 0
    while pos + 4 <= len(stream):
        (n,) = struct.unpack_from(">I", stream, pos)
        if n > CAP:
            return out, True
        if pos + 4 + n > len(stream):
            break
        try:
            out.extend(d.feed(stream[pos:pos + 4 + n]))
        except ProtocolError:
            return out, True
        pos += 4 + n
    return out, False


frames = st.one_of(fz.hostile().map(lambda h: h[1]), st.sampled_from(fz.HARMLESS),
                   st.builds(pack, fz.well_formed))


@settings(max_examples=800, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(stream=st.lists(frames, min_size=1, max_size=12), cuts=st.lists(st.integers(0, 4096), max_size=4))
def test_hostile_streams_never_escape_the_connection(stream: list[bytes], cuts: list[int]) -> None:
    asyncio.set_event_loop(asyncio.new_event_loop())
    try:
        conn, tr, got, lost = _connection()
        data = b"".join(stream)
        expected, bad = _expected(data)
        pieces, last = [], 0
        for c in sorted(min(c, len(data)) for c in cuts):
            pieces.append(data[last:c])
            last = c
        pieces.append(data[last:])
        for p in pieces:  # any split into reads: data_received must never raise
            conn.data_received(p)
            if conn.closed is not None:
                break
        control = (m.Ping, m.Pong, m.Bye)
        delivered = [x for x in expected if not isinstance(x, control)]
        if bad:
            assert tr.closed and isinstance(conn.closed, (ProtocolError, PeerClosed))
            assert len(lost) == 1
            assert got == delivered[:len(got)]  # a prefix: a session-level refusal stops earlier
        elif conn.closed is None:
            assert got == delivered
        else:  # well-formed frames the session refused (duplicate id, DONE before CTS) or a BYE
            assert got == delivered[:len(got)] and tr.closed
    finally:
        asyncio.get_event_loop().close()
        asyncio.set_event_loop(None)


def test_oversized_header_closes_without_waiting_for_the_body(caplog: Any) -> None:
    asyncio.set_event_loop(asyncio.new_event_loop())
    try:
        conn, tr, _, _ = _connection()
        with caplog.at_level(logging.WARNING, logger="aiomooncake"):
            conn.data_received(struct.pack(">I", CAP + 1))
        assert tr.closed and isinstance(conn.closed, ProtocolError)
        assert "exceeds the cap" in caplog.text
    finally:
        asyncio.get_event_loop().close()
        asyncio.set_event_loop(None)


def test_hanging_up_mid_frame_is_logged(caplog: Any) -> None:
    asyncio.set_event_loop(asyncio.new_event_loop())
    try:
        conn, _, _, lost = _connection()
        body = msgpack.packb([m.Kind.ACK, 5])
        with caplog.at_level(logging.WARNING, logger="aiomooncake"):
            conn.data_received(struct.pack(">I", len(body)) + body[:1])
            conn.connection_lost(None)
        assert "ended in the middle of a frame" in caplog.text
        assert len(lost) == 1
    finally:
        asyncio.get_event_loop().close()
        asyncio.set_event_loop(None)


def test_live_fuzz_small(tmp_path: Any) -> None:
    """The fuzz script, small: a listener in another process takes hostile frames on fresh and on
    authenticated connections; it never crashes or hangs, closes every offending connection with a
    logged error, reveals nothing before authentication, and its well-behaved peer never fails."""
    r = fz.run(cases=600, seed=1, timeout=10.0, log_dir=str(tmp_path))
    problems = fz.check(r)
    assert not problems, problems
    assert r.cases == 600 and r.frames >= 2000
    assert r.handshake_cases > 0 and r.session_cases > 0 and r.closed > 0 and r.survived > 0
    assert r.legit_roundtrips > 0 and r.legit_failures == 0
    assert r.target["open_peers"] <= 2  # the well-behaved peer (and at most one closing)
