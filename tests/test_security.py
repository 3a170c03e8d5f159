"""The authenticated control plane: HMAC challenge-response with a shared secret, refusal of peers
without it before anything sensitive is revealed, listeners bound to exactly the given address, and
what the Transfer Engine itself exposes (documented in docs/security.md).

Listener and client run in this process (the handshake is all control plane); raw-socket
"attackers" speak the frame format directly and record every frame the listener sends them."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import hmac
import logging
import os
import socket
from collections.abc import AsyncIterator
from typing import Any

import pytest
import torch

import aiomooncake
from aiomooncake import planes
from aiomooncake.core.messages import PROTOCOL_VERSION, Hello, Message, Ping, Ready, Refuse, Welcome
from aiomooncake.planes import te as te_plane
from aiomooncake.planes.te import TePlane
from aiomooncake.transport import auth
from aiomooncake.transport.framing import FrameDecoder, pack

HOST = "127.0.0.1"
SECRET = "correct horse battery staple, but longer"
FAST: dict[str, Any] = {"handshake_timeout": 5.0}


@contextlib.asynccontextmanager
async def listening(**opts: Any) -> AsyncIterator[aiomooncake.Listener]:
    lst = await aiomooncake.listen(HOST, 0, **{**FAST, **opts})
    try:
        yield lst
    finally:
        await lst.close()


async def pair(lst: aiomooncake.Listener, **opts: Any) -> tuple[aiomooncake.Peer, aiomooncake.Peer]:
    client = await aiomooncake.connect(HOST, lst.port, **{**FAST, **opts})
    server = await asyncio.wait_for(lst.accept(), 10)
    return client, server


async def roundtrip(a: aiomooncake.Peer, b: aiomooncake.Peer) -> None:
    for n in (16, 1 << 20):  # eager and rendezvous
        src = torch.arange(n, dtype=torch.uint8)
        got, _ = await asyncio.gather(b.recv_tensor(3), a.send(src, 3))
        assert torch.equal(got, src)


async def no_peer_accepted(lst: aiomooncake.Listener, seconds: float = 0.3) -> None:
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(lst.accept(), seconds)


# ---------------------------------------------------------------------------- a raw attacker
class Raw:
    """A TCP client that speaks frames by hand and keeps every frame the listener sent."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.decoder = FrameDecoder(1 << 24)
        self.received: list[Message] = []
        self.raw = b""

    @classmethod
    async def connect(cls, port: int) -> Raw:
        return cls(*await asyncio.open_connection(HOST, port))

    def send(self, *msgs: Message) -> None:
        self.writer.write(b"".join(pack(m) for m in msgs))

    async def next(self, timeout: float = 5.0) -> Message | None:
        """The next non-ping frame from the listener, or None when it closed the connection."""
        while True:
            for i, m in enumerate(self.received):
                if not isinstance(m, Ping):
                    return self.received.pop(i)
            data = await asyncio.wait_for(self.reader.read(1 << 16), timeout)
            if not data:
                return None
            self.raw += data
            self.received.extend(self.decoder.feed(data))

    async def closed_by_peer(self, timeout: float = 5.0) -> bool:
        try:
            while True:
                data = await asyncio.wait_for(self.reader.read(1 << 16), timeout)
                if not data:
                    return True
                self.raw += data
        except (ConnectionError, OSError):
            return True
        except asyncio.TimeoutError:
            return False

    def close(self) -> None:
        self.writer.close()


def _blobs(obj: Any) -> list[bytes]:
    """Every bytes value inside a decoded frame (nonces and proofs: random, so never searched)."""
    if isinstance(obj, bytes):
        return [obj]
    if isinstance(obj, dict):
        return [b for v in obj.values() for b in _blobs(v)]
    if isinstance(obj, (list, tuple)):
        return [b for v in obj for b in _blobs(v)]
    if dataclasses.is_dataclass(obj):
        return [b for f in dataclasses.fields(obj) for b in _blobs(getattr(obj, f.name))]
    return []


def reveals_nothing(raw: bytes) -> None:
    """What the listener sent an unauthenticated party carries no segment, address, host or pid.

    Random bytes fields are blanked first: a 32-byte nonce may spell a short host name by chance."""
    for blob in _blobs(FrameDecoder(1 << 24).feed(raw)):
        if blob:
            raw = raw.replace(blob, bytes(len(blob)))
    text = raw.decode("latin-1")
    for word in ("segments", "links", "caps", "host_id", "pid", "self", "max_frame", "transport"):
        assert word not in text, f"the listener revealed {word!r} before authentication: {raw!r:.300}"
    for e in planes.existing():  # planes other tests of this process started
        assert e.segment not in text
    assert socket.gethostname() not in text


@pytest.fixture
def engine_starts(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every Transfer Engine the handshake asks for (an engine is started for a connection only after
    both sides proved the secret)."""
    calls: list[str] = []
    real = te_plane.start

    async def spy(kind: str, host: str) -> TePlane:
        calls.append(kind)
        return await real(kind, host)

    monkeypatch.setattr(te_plane, "start", spy)
    return calls


# ---------------------------------------------------------------------------- the happy paths
async def test_same_secret_connects_and_transfers() -> None:
    async with listening(secret=SECRET) as lst:
        client, server = await pair(lst, secret=SECRET)
        async with client, server:
            await roundtrip(client, server)
            await roundtrip(server, client)


async def test_secret_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIOMOONCAKE_SECRET", SECRET)
    assert aiomooncake.Options().secret == SECRET
    async with listening() as lst:
        client, server = await pair(lst)
        async with client, server:
            await roundtrip(client, server)
        # An explicit argument wins over the environment; different secrets are refused.
        with pytest.raises(aiomooncake.HandshakeError, match="authentication failed"):
            await aiomooncake.connect(HOST, lst.port, secret="another secret of some length", **FAST)


async def test_no_secret_on_either_side_still_connects() -> None:
    async with listening() as lst:
        client, server = await pair(lst)
        async with client, server:
            await roundtrip(client, server)


# ---------------------------------------------------------------------------- refusals
async def test_client_without_secret_is_refused(caplog: pytest.LogCaptureFixture,
                                                engine_starts: list[str]) -> None:
    async with listening(secret=SECRET) as lst:
        with caplog.at_level(logging.WARNING, logger="aiomooncake"), \
                pytest.raises(aiomooncake.HandshakeError, match="requires a shared secret"):
            await aiomooncake.connect(HOST, lst.port, **FAST)
        await no_peer_accepted(lst)
    assert engine_starts == [], "an engine was started for an unauthenticated client"
    assert any("no shared secret" in r.getMessage() for r in caplog.records), caplog.text


async def test_listener_without_secret_is_refused_by_a_client_with_one(engine_starts: list[str]) -> None:
    async with listening() as lst:
        with pytest.raises(aiomooncake.HandshakeError, match="listener has none"):
            await aiomooncake.connect(HOST, lst.port, secret=SECRET, **FAST)
        await no_peer_accepted(lst)
    assert engine_starts == []


async def test_a_listener_that_skips_authentication_is_refused_by_the_client() -> None:
    """A (malicious or misconfigured) listener that answers an authenticating HELLO with
    ``auth: none`` gets nothing: the client refuses before sending any information about itself."""
    got: list[bytes] = []

    async def fake(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        dec = FrameDecoder(1 << 20)
        data = await reader.read(1 << 16)
        assert isinstance(dec.feed(data)[0], Hello)
        writer.write(pack(Welcome(PROTOCOL_VERSION, {"auth": "none"})))
        while data:
            got.append(data)
            data = await reader.read(1 << 16)
        writer.close()

    server = await asyncio.start_server(fake, HOST, 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        with pytest.raises(aiomooncake.HandshakeError, match="has no shared secret"):
            await aiomooncake.connect(HOST, port, secret=SECRET, **FAST)
        await asyncio.sleep(0.1)
    reveals_nothing(b"".join(got))


async def test_wrong_secret_is_refused_on_both_sides(caplog: pytest.LogCaptureFixture,
                                                      engine_starts: list[str]) -> None:
    async with listening(secret=SECRET) as lst:
        with caplog.at_level(logging.WARNING, logger="aiomooncake"), \
                pytest.raises(aiomooncake.HandshakeError, match="authentication failed"):
            await aiomooncake.connect(HOST, lst.port, secret=SECRET + "!", **FAST)
        await no_peer_accepted(lst)
        # The listener is unaffected and still serves the right secret.
        client, server = await pair(lst, secret=SECRET)
        async with client, server:
            await roundtrip(client, server)
    assert engine_starts.count("tcp") <= 2  # only the authenticated pair got engines


async def test_unauthenticated_party_learns_nothing() -> None:
    """A raw client without the secret: HELLO claiming no auth is refused; HELLO with a nonce gets
    the challenge (version, scheme, nonce, proof) and nothing else, and a made-up proof is refused.
    No frame it receives names a segment, an address, the host, the pid or the capabilities."""
    async with listening(secret=SECRET) as lst:
        raw = await Raw.connect(lst.port)
        raw.send(Hello(PROTOCOL_VERSION, {"auth": "none"}))
        msg = await raw.next()
        assert isinstance(msg, Refuse) and "requires a shared secret" in msg.reason
        assert await raw.closed_by_peer()
        reveals_nothing(raw.raw)

        raw = await Raw.connect(lst.port)
        raw.send(Hello(PROTOCOL_VERSION, {"auth": auth.SCHEME, "nonce": b"\x01" * auth.NONCE_BYTES}))
        challenge = await raw.next()
        assert isinstance(challenge, Welcome)
        assert set(challenge.info) == {"auth", "nonce", "proof"}
        raw.send(Ready({"proof": b"\x00" * auth.PROOF_BYTES, "info": {"caps": ["tcp"]}}))
        msg = await raw.next()
        assert isinstance(msg, Refuse) and "authentication failed" in msg.reason
        assert await raw.closed_by_peer()
        reveals_nothing(raw.raw)
        await no_peer_accepted(lst)


async def test_replayed_and_reflected_proofs_are_refused() -> None:
    """Proofs bind both fresh nonces and the role: a proof recorded on one connection fails on the
    next (new server nonce), and the listener's own proof sent back to it fails (wrong role)."""
    key = auth.key_of(SECRET)
    assert key is not None
    nonce_c = b"\x07" * auth.NONCE_BYTES
    async with listening(secret=SECRET) as lst:
        # A legitimate exchange, recorded.
        raw = await Raw.connect(lst.port)
        raw.send(Hello(PROTOCOL_VERSION, {"auth": auth.SCHEME, "nonce": nonce_c}))
        first = await raw.next()
        assert isinstance(first, Welcome)
        recorded = auth.proof(key, "client", nonce_c, first.info["nonce"])
        raw.close()
        # Replay on a new connection with the same client nonce.
        raw = await Raw.connect(lst.port)
        raw.send(Hello(PROTOCOL_VERSION, {"auth": auth.SCHEME, "nonce": nonce_c}))
        second = await raw.next()
        assert isinstance(second, Welcome) and second.info["nonce"] != first.info["nonce"]
        raw.send(Ready({"proof": recorded, "info": {}}))
        msg = await raw.next()
        assert isinstance(msg, Refuse) and "authentication failed" in msg.reason
        raw.close()
        # Reflection: hand the listener its own proof.
        raw = await Raw.connect(lst.port)
        raw.send(Hello(PROTOCOL_VERSION, {"auth": auth.SCHEME, "nonce": nonce_c}))
        third = await raw.next()
        assert isinstance(third, Welcome)
        raw.send(Ready({"proof": third.info["proof"], "info": {}}))
        msg = await raw.next()
        assert isinstance(msg, Refuse) and "authentication failed" in msg.reason
        raw.close()
        await no_peer_accepted(lst)


@pytest.mark.parametrize("bad", [
    {"auth": "rot13", "nonce": b"x" * 32},
    {"auth": auth.SCHEME},
    {"auth": auth.SCHEME, "nonce": b"short"},
    {"auth": auth.SCHEME, "nonce": "a str, not bytes, of thirty-two."},
    {"caps": ["tcp"], "transport": "auto"},  # a handshake from before authentication existed
])
async def test_malformed_hello_is_refused_with_a_reason(bad: dict[str, Any]) -> None:
    async with listening(secret=SECRET) as lst:
        raw = await Raw.connect(lst.port)
        raw.send(Hello(PROTOCOL_VERSION, bad))
        msg = await raw.next()
        assert isinstance(msg, Refuse) and "protocol error" in msg.reason, msg
        assert await raw.closed_by_peer()
        reveals_nothing(raw.raw)


async def test_proofs_are_compared_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[bytes, bytes]] = []
    # auth calls hmac.compare_digest through the module at check time, so it sees the spy
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        seen.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    async with listening(secret=SECRET) as lst:
        client, server = await pair(lst, secret=SECRET)
        await client.close()
        await server.close()
    assert len(seen) == 2  # the client checked the server's proof and vice versa


async def test_silent_stranger_is_dropped_after_the_handshake_timeout() -> None:
    async with listening(secret=SECRET, handshake_timeout=0.5) as lst:
        raw = await Raw.connect(lst.port)
        assert await raw.closed_by_peer(timeout=5.0)
        assert raw.raw == b"" or all(isinstance(m, (Ping, Refuse))
                                     for m in FrameDecoder(1 << 20).feed(raw.raw))


async def test_flood_before_authentication_is_cut_off(caplog: pytest.LogCaptureFixture) -> None:
    """A stranger that streams frames without waiting for the challenge cannot make the listener
    queue them: the connection is closed with a logged ProtocolError after a handful."""
    async with listening(secret=SECRET) as lst:
        raw = await Raw.connect(lst.port)
        hello = pack(Hello(PROTOCOL_VERSION, {"auth": auth.SCHEME, "nonce": b"\x02" * 32}))
        with caplog.at_level(logging.WARNING, logger="aiomooncake"), \
                contextlib.suppress(ConnectionError):
            raw.writer.write(hello * 10_000)
            await raw.writer.drain()
            assert await raw.closed_by_peer()
        assert any("frames before the handshake ended" in r.getMessage() for r in caplog.records), \
            caplog.text
        await no_peer_accepted(lst)
        # Others are unaffected.
        client, server = await pair(lst, secret=SECRET)
        async with client, server:
            await roundtrip(client, server)


async def test_connections_over_the_handshake_limit_are_closed_at_once(
        caplog: pytest.LogCaptureFixture) -> None:
    """Strangers holding handshakes open fill at most max_handshakes slots; the next connection
    is closed at once (logged); once the silent ones time out, a real peer connects again."""
    async with listening(secret=SECRET, max_handshakes=4, handshake_timeout=1.5) as lst:
        silent = [await Raw.connect(lst.port) for _ in range(4)]
        await asyncio.sleep(0.2)
        with caplog.at_level(logging.WARNING, logger="aiomooncake"):
            extra = await Raw.connect(lst.port)
            assert await extra.closed_by_peer(timeout=1.0)
        assert any("max_handshakes" in r.getMessage() for r in caplog.records), caplog.text
        assert extra.raw == b""  # closed before a byte of the handshake was sent
        for raw in silent:
            assert await raw.closed_by_peer(timeout=5.0)
        await asyncio.sleep(0.1)
        client, server = await pair(lst, secret=SECRET)
        async with client, server:
            await roundtrip(client, server)


@pytest.mark.parametrize("host", ["127.0.0.1:1234", "node1:80", "[::1]:5", "", " node1"])
def test_engine_host_with_a_port_is_refused(host: str) -> None:
    with pytest.raises(aiomooncake.ConfigurationError, match="engine_host"):
        aiomooncake.Options(engine_host=host)


@pytest.mark.parametrize("host", ["127.0.0.1", "::1", "fe80::1", "node1.example.com"])
def test_engine_host_addresses_are_accepted(host: str) -> None:
    assert aiomooncake.Options(engine_host=host).engine_host == host


# ---------------------------------------------------------------------------- binding
async def test_listener_binds_exactly_the_given_address() -> None:
    async with listening() as lst:
        addrs = {s.getsockname()[0] for s in lst._server.sockets}  # type: ignore[union-attr]
        assert addrs == {HOST}
    with pytest.raises(aiomooncake.ConfigurationError, match="explicit host"):
        await aiomooncake.listen("", 0)


def _non_loopback_ipv4() -> str | None:
    with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect(("192.0.2.1", 9))  # no packet is sent: this only picks the outgoing interface
        ip: str = s.getsockname()[0]
        if not ip.startswith("127."):
            return ip
    return None


async def test_loopback_listener_is_not_reachable_on_other_interfaces() -> None:
    ip = _non_loopback_ipv4()
    if ip is None:
        pytest.skip("this machine has no non-loopback IPv4 address")
    async with listening() as lst:
        with pytest.raises(OSError):
            _, w = await asyncio.wait_for(asyncio.open_connection(ip, lst.port), 5)
            w.close()


# ---------------------------------------------------------------------------- the engine itself
def _listening_ports(pid: int) -> dict[int, str]:
    """TCP ports ``pid`` listens on, with their bound address (from /proc/net/tcp{,6})."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
            if link.startswith("socket:["):
                inodes.add(link[8:-1])
    out = {}
    for table in ("tcp", "tcp6"):
        with open(f"/proc/{pid}/net/{table}") as f:
            next(f)
            for line in f:
                cols = line.split()
                local, state, inode = cols[1], cols[3], cols[9]
                if state == "0A" and inode in inodes:  # LISTEN
                    addr, port = local.split(":")
                    out[int(port, 16)] = addr
    return out


async def test_documented_engine_exposure() -> None:
    """What docs/security.md states about the Transfer Engine (not about aiomooncake): it listens
    on every interface whatever host it is given, and anyone who reaches its RPC port learns the
    addresses of registered memory and can read and write that memory, with no authentication.
    If this test fails, the engine changed: update docs/security.md."""
    from mooncake import engine as te

    os.environ["MC_FORCE_TCP"] = "1"
    try:
        victim, attacker = te.TransferEngine(), te.TransferEngine()
        assert victim.initialize(HOST, "P2PHANDSHAKE", "tcp", "") == 0
        assert attacker.initialize(HOST, "P2PHANDSHAKE", "tcp", "") == 0
    finally:
        os.environ.pop("MC_FORCE_TCP", None)
    secret = ctypes.create_string_buffer(b"registered victim memory", 64)
    assert victim.register_memory(ctypes.addressof(secret), 64, "*") == 0
    scratch = ctypes.create_string_buffer(64)
    assert attacker.register_memory(ctypes.addressof(scratch), 64, "*") == 0
    try:
        ports = _listening_ports(os.getpid())
        rpc = victim.get_rpc_port()
        assert ports.get(rpc) in ("00000000", "00000000000000000000000000000000"), \
            f"the engine's RPC port is bound to {ports.get(rpc)}, not to all interfaces"
        segment = f"{HOST}:{rpc}"
        addr = await asyncio.to_thread(attacker.get_first_buffer_address, segment)
        assert addr == ctypes.addressof(secret)
        n = len(b"registered victim memory")
        assert await asyncio.to_thread(attacker.transfer_sync_read, segment,
                                       ctypes.addressof(scratch), addr, n) == 0
        assert scratch.value == b"registered victim memory"
        ctypes.memmove(scratch, b"overwritten by a stranger", 25)
        assert await asyncio.to_thread(attacker.transfer_sync_write, segment,
                                       ctypes.addressof(scratch), addr, 25) == 0
        assert secret.value.startswith(b"overwritten by a stranger")
    finally:
        victim.unregister_memory(ctypes.addressof(secret))
        attacker.unregister_memory(ctypes.addressof(scratch))


def test_auth_primitives() -> None:
    key = auth.key_of(SECRET)
    assert key == SECRET.encode()
    assert auth.key_of(None) is None and auth.key_of("") is None
    a, b = auth.new_nonce(), auth.new_nonce()
    assert len(a) == auth.NONCE_BYTES and a != b
    p = auth.proof(key, "client", a, b)
    assert len(p) == auth.PROOF_BYTES
    assert auth.verify(key, "client", a, b, p)
    assert not auth.verify(key, "server", a, b, p)
    assert not auth.verify(key, "client", b, a, p)
    assert not auth.verify(b"other key of sufficient length", "client", a, b, p)
    with pytest.raises(ValueError):
        auth.proof(key, "attacker", a, b)


async def test_a_listener_whose_engine_fails_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    """The listener cannot start its Transfer Engine (no free port, no device...): the client gets
    a HandshakeError with the reason instead of a bare 'connection lost'."""
    async def broken(kind: str, host: str) -> TePlane:
        raise aiomooncake.ConfigurationError("the Transfer Engine failed to initialize (simulated)")

    monkeypatch.setattr(te_plane, "start", broken)
    async with listening(secret=SECRET) as lst:
        with pytest.raises(aiomooncake.HandshakeError, match=r"could not start its data plane.*simulated"):
            await aiomooncake.connect(HOST, lst.port, secret=SECRET, **FAST)
