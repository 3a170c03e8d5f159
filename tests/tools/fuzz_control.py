#!/usr/bin/env python3
"""Fuzz the control plane of a live listener with hypothesis-generated frames.

A *target* process listens (with a shared secret) and serves every peer the same way: receives
posted on a few tags (fixed-size buffers and ``recv_tensor``), a rendezvous send waiting for a CTS,
and an echo on tags 100 -> 101. This process then runs hypothesis cases against it; each case is
one hostile frame on a control connection, in one of two phases:

``handshake``  on a fresh connection, before authentication: the frame is the first the listener
               sees (a HELLO with random contents, any other kind, garbage). The listener must
               refuse or close, and reveal nothing (no segment, address, host or capabilities).
``session``    after a genuine authenticated handshake, behind 0-20 harmless frames: the frame is
               fed to the peer's session. A frame that does not decode (truncated, oversized,
               wrongly typed, unknown kind, random msgpack or bytes) must close the connection; a
               PING sent behind it shows whether it did.

Throughout, a well-behaved peer does checksummed echo round trips with the target on another
connection: it must never fail. At the end the target must still run, must have logged a
ProtocolError (or a handshake failure) for every connection it closed, and its resident memory is
reported. Frames counted are the frames the target parsed (harmless prefix, the hostile frame, the
probe when answered).

    python tests/tools/fuzz_control.py --cases 60000          # >= 100,000 frames
    python tests/tools/fuzz_control.py --cases 2000 --json out.json

Exit status 0 only if every property held.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import random
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import msgpack
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import seed as hyp_seed
from hypothesis import strategies as st

import aiomooncake
from aiomooncake.core import messages as m
from aiomooncake.core.messages import PROTOCOL_VERSION, Kind
from aiomooncake.errors import ProtocolError
from aiomooncake.transport import auth
from aiomooncake.transport.framing import FrameDecoder, pack

HOST = "127.0.0.1"
SECRET = "fuzzing secret, long enough to be a real one"
MAX_FRAME = aiomooncake.Options().max_frame
ECHO_IN, ECHO_OUT = 100, 101
BATCH = 2000
log = logging.getLogger("fuzz_control")


# =============================================================================== the target
class _Counter(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.protocol_errors = 0
        self.handshake_failures = 0
        self.other: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        if msg.startswith("protocol error from"):
            self.protocol_errors += 1
        elif msg.startswith("handshake with"):
            self.handshake_failures += 1
        elif len(self.other) < 50:
            self.other.append(f"{record.name}: {msg[:300]}")


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


async def _serve_peer(peer: aiomooncake.Peer, stats: dict[str, int]) -> None:
    async def recv_loop(tag: int) -> None:
        while not peer.closed:
            buf = torch.empty(64, dtype=torch.float32)
            with contextlib.suppress(aiomooncake.AiomooncakeError):
                await peer.recv(buf, tag)

    async def recv_tensor_loop() -> None:
        while not peer.closed:
            with contextlib.suppress(aiomooncake.AiomooncakeError):
                await peer.recv_tensor(4)

    async def send_loop() -> None:
        while not peer.closed:
            with contextlib.suppress(aiomooncake.AiomooncakeError):
                await peer.send(torch.ones(32768, dtype=torch.float32), 9)

    async def echo() -> None:
        while not peer.closed:
            try:
                t = await peer.recv_tensor(ECHO_IN)
                await peer.send(t, ECHO_OUT)
                stats["echoed"] += 1
            except aiomooncake.AiomooncakeError:
                pass

    tasks = [asyncio.ensure_future(c) for c in (recv_loop(1), recv_loop(2), recv_tensor_loop(),
                                                   send_loop(), echo())]
    try:
        while not peer.closed:
            await asyncio.sleep(0.2)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await peer.close()


async def _target_main() -> None:
    counter = _Counter()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("aiomooncake").addHandler(counter)
    logging.getLogger("aiomooncake").setLevel(logging.WARNING)
    stats = {"accepted": 0, "echoed": 0}
    lst = await aiomooncake.listen(HOST, 0, secret=SECRET, handshake_timeout=10.0)
    sys.stdout.write(json.dumps({"port": lst.port, "pid": os.getpid()}) + "\n")
    sys.stdout.flush()
    rss0 = _rss()
    peers: set[asyncio.Task[None]] = set()

    async def accept() -> None:
        while True:
            peer = await lst.accept()
            stats["accepted"] += 1
            t = asyncio.ensure_future(_serve_peer(peer, stats))
            peers.add(t)
            t.add_done_callback(peers.discard)

    acceptor = asyncio.ensure_future(accept())
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while True:
        line = await reader.readline()
        if not line:
            break
        if line.strip() == b"stats":
            sys.stdout.write(json.dumps({
                "protocol_errors": counter.protocol_errors, "handshake_failures": counter.handshake_failures,
                "other_warnings": counter.other, "accepted": stats["accepted"], "echoed": stats["echoed"],
                "open_peers": len(peers), "rss_start": rss0, "rss_now": _rss()}) + "\n")
            sys.stdout.flush()
    acceptor.cancel()
    await lst.close()


# =============================================================================== raw client
class Closed(Exception):
    pass


class Raw:
    """A blocking control connection that speaks frames by hand."""

    def __init__(self, port: int, timeout: float) -> None:
        self.sock = socket.create_connection((HOST, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.dec = FrameDecoder(1 << 24)
        self.inbox: list[m.Message] = []
        self.raw = bytearray()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def next(self, want: type | tuple[type, ...] | None = None) -> m.Message:
        """The next frame (of type ``want``; PINGs are answered and skipped). Closed on EOF."""
        while True:
            while self.inbox:
                msg = self.inbox.pop(0)
                if isinstance(msg, m.Ping):
                    with contextlib.suppress(OSError):
                        self.sock.sendall(pack(m.Pong(msg.stamp)))
                    continue
                if want is None or isinstance(msg, want):
                    return msg
            try:
                data = self.sock.recv(1 << 16)
            except ConnectionResetError:
                data = b""
            if not data:
                raise Closed
            self.raw += data
            self.inbox.extend(self.dec.feed(data))

    def handshake(self) -> None:
        key = auth.key_of(SECRET)
        assert key is not None
        nonce_c = auth.new_nonce()
        self.send(pack(m.Hello(PROTOCOL_VERSION, {"auth": auth.SCHEME, "nonce": nonce_c})))
        w = self.next()
        assert isinstance(w, m.Welcome), w
        proof = auth.proof(key, "client", nonce_c, w.info["nonce"])
        info = {"caps": ["tcp"], "transport": "auto", "host_id": "fuzzer/elsewhere", "pid": 1,
                "max_frame": MAX_FRAME, "host_transport": "te"}
        self.send(pack(m.Ready({"proof": proof, "info": info})))
        w = self.next()
        assert isinstance(w, m.Welcome) and "links" in w.info, w
        segs = {t: "127.0.0.1:1" for t in set(w.info["links"].values())}  # nothing listens there
        self.send(pack(m.Ready({"segments": segs})))
        self.next(m.Rts)  # the target's peer is up (its first send announced itself)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


# =============================================================================== frames
def frame(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


def decodes(data: bytes) -> bool:
    """Whether the target's decoder accepts every frame in ``data`` (and needs no more bytes)."""
    d = FrameDecoder(MAX_FRAME)
    try:
        d.feed(data)
    except ProtocolError:
        return False
    return not d._buf


ints = st.one_of(st.integers(-(2**63), 2**64 - 1), st.integers(-3, 300),
                 st.sampled_from([0, 1, -1, 2**31, 2**32, 2**62, 2**63 - 1, 2**63, 2**64 - 1, -(2**63)]))
scalars = st.one_of(st.none(), st.booleans(), ints, st.floats(allow_nan=True), st.text(max_size=40),
                    st.binary(max_size=64))
keys = st.one_of(st.text(max_size=8), st.text(max_size=8), st.text(max_size=8), ints)  # mostly str
objects = st.recursive(scalars, lambda c: st.one_of(st.lists(c, max_size=8),
                                                    st.dictionaries(keys, c, max_size=6)), max_leaves=30)
KINDS = [int(k) for k in Kind]
ARITY = {int(k): v[0] for k, v in m._DECODERS.items()}
DTYPES = ["float32", "uint8", "int64", "bfloat16", "complex128", "bool", "float8_e4m3fn", "nope", ""]
ops = st.one_of(st.integers(0, 12), ints)
tags = st.one_of(st.sampled_from([0, 1, 2, 4, 9, ECHO_IN, -1]), ints)
shapes = st.lists(st.one_of(st.integers(0, 70), ints), max_size=5)


def _valid_kind_fields(kind: int) -> st.SearchStrategy[list[Any]]:
    """Fields of the right arity, each either well typed with a random value or anything at all."""
    k = Kind(kind)
    typed: dict[Kind, list[st.SearchStrategy[Any]]] = {
        Kind.EAGER: [ops, tags, st.sampled_from(DTYPES), shapes, st.binary(max_size=600),
                     st.sampled_from(["cpu", "cuda", "x"])],
        Kind.RTS: [ops, tags, st.sampled_from(DTYPES), shapes, ints, st.sampled_from(["cpu", "cuda", "?"])],
        Kind.CTS: [ops, ints, ints, st.sampled_from(["cpu", "cuda", "shm", "zz"]), ints, ints],
        Kind.ACK: [ops], Kind.DONE: [ops], Kind.RCANCEL: [ops],
        Kind.ACKS: [st.lists(ops, max_size=6)], Kind.DONES: [st.lists(ops, max_size=6)],
        Kind.NACK: [ops, st.integers(0, 4), st.text(max_size=30)],
        Kind.ABORT: [ops, st.integers(0, 4), st.text(max_size=30)],
        Kind.PING: [st.floats(allow_nan=True)], Kind.PONG: [st.floats(allow_nan=True)],
        Kind.BYE: [st.text(max_size=30)],
        Kind.HELLO: [ints, objects], Kind.WELCOME: [ints, objects], Kind.READY: [objects],
        Kind.REFUSE: [st.text(max_size=30)],
    }
    # Each field: three times in four well typed with a random value, else any object at all.
    fields = [st.one_of(s, s, s, objects) for s in typed[k]]
    return st.tuples(*fields).map(list)


small_ops = st.integers(1, 40)
small_tags = st.sampled_from([0, 1, 2, 3, 4, 9, ECHO_IN, ECHO_OUT, -5])
small_shapes = st.lists(st.integers(0, 40), max_size=3).map(tuple)
codes = st.sampled_from(list(m.Code))
well_formed = st.one_of(
    st.builds(m.Eager, small_ops, small_tags, st.sampled_from(DTYPES), small_shapes,
              st.binary(max_size=300), st.sampled_from(["cpu", "cuda"])),
    st.builds(m.Rts, small_ops, small_tags, st.sampled_from(DTYPES), small_shapes,
              st.integers(0, 1 << 20), st.sampled_from(["cpu", "cuda"])),
    st.builds(m.Cts, small_ops, st.integers(0, 2**48), st.integers(0, 1 << 22),
              st.sampled_from(["cpu", "cuda", "x"]), st.integers(0, 5), st.integers(0, 5)),
    st.builds(m.Ack, small_ops), st.builds(m.Done, small_ops), st.builds(m.RCancel, small_ops),
    st.builds(m.Acks, st.lists(small_ops, min_size=1, max_size=4)),
    st.builds(m.Dones, st.lists(small_ops, min_size=1, max_size=4)),
    st.builds(m.Nack, small_ops, codes, st.text(max_size=20)),
    st.builds(m.Abort, small_ops, codes, st.text(max_size=20)),
    st.builds(m.Hello, st.integers(0, 3), st.just({})), st.builds(m.Ready, st.just({})),
)


@st.composite
def hostile(draw: st.DrawFn) -> tuple[str, bytes]:
    """(category, bytes on the wire) of one hostile frame."""
    cat = draw(st.sampled_from(["well-formed", "well-formed", "typed", "typed", "arity", "unknown-kind",
                                "random-msgpack", "random-bytes", "truncated-body", "truncated-eof",
                                "oversized", "not-an-array"]))
    if cat == "well-formed":  # decodes; the session decides (often a legal frame it ignores)
        return cat, pack(draw(well_formed))
    if cat == "typed":
        kind = draw(st.sampled_from(KINDS))
        body = msgpack.packb([kind, *draw(_valid_kind_fields(kind))], use_bin_type=True)
    elif cat == "arity":
        kind = draw(st.sampled_from(KINDS))
        n = draw(st.integers(0, 9).filter(lambda x: x != ARITY[kind]))
        body = msgpack.packb([kind, *draw(st.lists(objects, min_size=n, max_size=n))], use_bin_type=True)
    elif cat == "unknown-kind":
        bad_kind = draw(st.one_of(ints.filter(lambda k: k not in KINDS), st.text(max_size=5), st.none(),
                                  st.floats(), st.binary(max_size=4)))
        body = msgpack.packb([bad_kind, *draw(st.lists(objects, max_size=4))], use_bin_type=True)
    elif cat == "random-msgpack":
        body = msgpack.packb(draw(objects), use_bin_type=True)
    elif cat == "not-an-array":
        body = msgpack.packb(draw(st.one_of(scalars, st.dictionaries(st.text(max_size=5), objects,
                                                                     max_size=4))), use_bin_type=True)
    elif cat == "random-bytes":
        body = draw(st.binary(min_size=0, max_size=300))
    elif cat == "truncated-eof":  # the header promises more than ever arrives: the peer hangs up
        whole = msgpack.packb([draw(st.sampled_from(KINDS)), *draw(st.lists(objects, max_size=6))],
                              use_bin_type=True)
        return cat, frame(whole)[:draw(st.integers(1, 4 + len(whole) - 1))]
    elif cat == "truncated-body":
        whole = msgpack.packb([draw(st.sampled_from(KINDS)), *draw(st.lists(objects, min_size=1,
                                                                            max_size=6))], use_bin_type=True)
        body = whole[:draw(st.integers(0, max(0, len(whole) - 1)))]
    else:  # oversized: a header over the cap; the body never needs to arrive
        length = draw(st.integers(MAX_FRAME + 1, 2**32 - 1))
        return cat, struct.pack(">I", length) + draw(st.binary(max_size=64))
    return cat, frame(body)


HARMLESS = [pack(m.Ping(1.0)), pack(m.Pong(2.0)), pack(m.Ack(10**6)), pack(m.Done(10**6 + 1)),
            pack(m.Nack(10**6 + 2, m.Code.FAILED, "x")), pack(m.RCancel(10**6 + 3)),
            pack(m.Cts(10**6 + 4, 0, 0, "cpu"))]


# =============================================================================== the run
@dataclass
class Report:
    cases: int = 0
    frames: int = 0
    by_category: dict[str, int] = field(default_factory=dict)
    closed_by_category: dict[str, int] = field(default_factory=dict)
    closed: int = 0  # connections the target closed
    survived: int = 0  # hostile frame accepted (well-formed), connection kept
    handshakes: int = 0
    handshake_cases: int = 0
    session_cases: int = 0
    violations: list[str] = field(default_factory=list)
    legit_roundtrips: int = 0
    legit_failures: int = 0
    target: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


class Fuzzer:
    def __init__(self, port: int, timeout: float) -> None:
        self.port = port
        self.timeout = timeout
        self.conn: Raw | None = None
        self.r = Report()

    def _session_conn(self) -> Raw:
        if self.conn is None:
            self.conn = Raw(self.port, self.timeout)
            self.conn.handshake()
            self.r.handshakes += 1
        return self.conn

    def _verdict(self, conn: Raw) -> bool:
        """True if the connection is still open (our PING was answered), False if closed."""
        stamp = float(self.r.cases)
        try:
            conn.send(pack(m.Ping(stamp)))
            while True:
                msg = conn.next((m.Pong, m.Bye, m.Refuse))
                if isinstance(msg, m.Pong) and msg.stamp == stamp:
                    return True
                if isinstance(msg, (m.Bye, m.Refuse)):
                    conn.next()  # then EOF
        except (Closed, BrokenPipeError, ConnectionResetError):
            return False
        except TimeoutError:
            raise AssertionError(f"HANG: no answer and no close within {self.timeout:g} s") from None

    def case(self, phase: str, cat: str, data: bytes, prefix: int) -> None:
        self.r.cases += 1
        self.r.by_category[cat] = self.r.by_category.get(cat, 0) + 1
        ok_frame = decodes(data)
        if cat == "truncated-eof":
            self._truncated(phase, data, prefix)
            return
        if phase == "handshake":
            self.r.handshake_cases += 1
            conn = Raw(self.port, self.timeout)
            try:
                conn.send(data)
                self.r.frames += 1
                alive = self._verdict(conn)
                if alive:  # a genuine HELLO got its challenge; the connection then times out
                    self.r.frames += 1
                text = bytes(conn.raw).decode("latin-1")
                for word in ("segments", "links", "caps", "host_id", "max_frame", "127.0.0.1"):
                    if word in text:
                        self.r.violations.append(f"handshake case revealed {word!r}: {data!r:.200}")
            finally:
                conn.close()
            if not ok_frame and alive:
                self.r.violations.append(f"undecodable first frame did not close: {data!r:.200}")
            self.r.closed += not alive
            return
        self.r.session_cases += 1
        conn = self._session_conn()
        pre = b"".join(random.choice(HARMLESS) for _ in range(prefix))
        try:
            conn.send(pre + data)
        except (BrokenPipeError, ConnectionResetError):
            self.conn = None
            conn.close()
            self.r.violations.append("the connection closed during the harmless prefix")
            return
        self.r.frames += prefix + 1
        alive = self._verdict(conn)
        if alive:
            self.r.frames += 1
            self.r.survived += 1
        else:
            self.r.closed += 1
            self.r.closed_by_category[cat] = self.r.closed_by_category.get(cat, 0) + 1
            self.conn = None
            conn.close()
        if not ok_frame and alive:
            self.r.violations.append(f"an undecodable frame did not close the connection: {data!r:.200}")


    def _truncated(self, phase: str, data: bytes, prefix: int) -> None:
        """Send the start of a frame, then hang up our side: the target must close its side too."""
        if phase == "handshake":
            self.r.handshake_cases += 1
            conn = Raw(self.port, self.timeout)
            prefix = 0
        else:
            self.r.session_cases += 1
            conn = self._session_conn()
            self.conn = None
        try:
            conn.send(b"".join(random.choice(HARMLESS) for _ in range(prefix)) + data)
            conn.sock.shutdown(socket.SHUT_WR)
            self.r.frames += prefix + 1
            while True:
                conn.next((m.Bye, m.Refuse))
        except (Closed, BrokenPipeError, ConnectionResetError):
            self.r.closed += 1
            self.r.closed_by_category["truncated-eof"] = self.r.closed_by_category.get("truncated-eof", 0) + 1
        except TimeoutError:
            self.r.violations.append(f"HANG: a connection that hung up mid-frame stayed open: {data!r:.100}")
        finally:
            conn.close()


def _legit_peer(port: int, stop: threading.Event, r: Report) -> None:
    async def main() -> None:
        peer = await aiomooncake.connect(HOST, port, secret=SECRET)
        g = torch.Generator().manual_seed(7)
        async with peer:
            while not stop.is_set():
                n = int(torch.randint(0, 300_000, (1,), generator=g))
                t = torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g)
                try:
                    back = asyncio.ensure_future(peer.recv_tensor(ECHO_OUT))
                    await asyncio.wait_for(peer.send(t, ECHO_IN), 30)
                    got = await asyncio.wait_for(back, 30)
                    if torch.equal(got, t):
                        r.legit_roundtrips += 1
                    else:
                        r.legit_failures += 1
                except Exception as e:
                    r.legit_failures += 1
                    log.error("the well-behaved peer failed: %s: %s", type(e).__name__, e)
                    return

    aiomooncake.run(main())


def run(cases: int, seed: int = 0, timeout: float = 10.0, log_dir: str | None = None) -> Report:
    err: Any = subprocess.DEVNULL
    if log_dir:
        err = open(os.path.join(log_dir, "fuzz-target.log"), "wb")  # noqa: SIM115
    target = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--target"], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=err)
    if err is not subprocess.DEVNULL:
        err.close()
    assert target.stdout is not None and target.stdin is not None
    t0 = time.monotonic()
    stop = threading.Event()
    legit: threading.Thread | None = None
    fz: Fuzzer | None = None
    try:
        hello = json.loads(target.stdout.readline())
        port = hello["port"]
        fz = Fuzzer(port, timeout)
        legit = threading.Thread(target=_legit_peer, args=(port, stop, fz.r), daemon=True)
        legit.start()
        random.seed(seed)

        def batch(n: int, batch_seed: int) -> None:
            # Hypothesis keeps a record of every example of one run and slows down as it grows:
            # run in batches of a few thousand, each from its own seed.
            @hyp_seed(batch_seed)
            @settings(max_examples=n, deadline=None, database=None, phases=[Phase.generate],
                      suppress_health_check=list(HealthCheck))
            @given(phase=st.sampled_from(["session"] * 4 + ["handshake"]), h=hostile(),
                   prefix=st.integers(0, 20))
            def fuzz(phase: str, h: tuple[str, bytes], prefix: int) -> None:
                assert target.poll() is None, f"the target died (exit {target.returncode})"
                fz.case(phase, h[0], h[1], prefix)

            fuzz()

        done = 0
        while done < cases:
            n = min(BATCH, cases - done)
            batch(n, seed * 100_003 + done)
            done += n
            log.info("%d/%d cases, %d frames, %d closed, %d violations", fz.r.cases, cases, fz.r.frames,
                     fz.r.closed, len(fz.r.violations))
        fz.r.seconds = time.monotonic() - t0
        time.sleep(0.5)
        stop.set()
        legit.join(60)
        target.stdin.write(b"stats\n")
        target.stdin.flush()
        fz.r.target = json.loads(target.stdout.readline())
        if target.poll() is not None:
            fz.r.violations.append(f"the target died (exit {target.returncode})")
        return fz.r
    finally:
        stop.set()
        if fz is not None and fz.conn is not None:
            fz.conn.close()
        with contextlib.suppress(Exception):
            target.stdin.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            target.wait(10)
        if target.poll() is None:
            target.send_signal(signal.SIGKILL)
            target.wait()


def check(r: Report) -> list[str]:
    """Every property the run must show, as a list of what failed."""
    bad = list(r.violations)
    if r.legit_failures or r.legit_roundtrips == 0:
        bad.append(f"the well-behaved peer: {r.legit_roundtrips} round trips, {r.legit_failures} failures")
    logged = r.target.get("protocol_errors", 0) + r.target.get("handshake_failures", 0)
    if logged < r.closed:
        bad.append(f"the target closed {r.closed} connections but logged only {logged} errors")
    return bad


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", type=int, default=60_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=10.0, help="a verdict later than this is a hang")
    p.add_argument("--json")
    p.add_argument("--log-dir")
    p.add_argument("--target", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.target:
        aiomooncake.run(_target_main())
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    r = run(args.cases, args.seed, args.timeout, args.log_dir)
    problems = check(r)
    out = {**asdict(r), "problems": problems}
    out["violations"] = out["violations"][:20]
    print(json.dumps({k: v for k, v in out.items() if k != "violations"} | {"violations": out["violations"]},
                     indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
