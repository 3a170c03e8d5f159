"""The same-host CPU path (``aiomooncake.planes.shm``): process_vm_writev between peers on one host.

Multi-process tests run against a peer in another process (tests/harness.py) with the default
options, under which same-host CPU tensors take this path; failure injection (verification, EPERM,
unavailability) runs both peers in this process, which the path serves too (it writes into its own
pid). Bytes are compared bit-exactly; which path a message took is checked with the transports the
peers agreed on and with the engines' counters (the path makes copies and registers nothing).
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import logging
import os
import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import torch
from harness import (
    EAGER_THRESHOLD,
    KiB,
    MiB,
    Remote,
    do,
    make_tensor,
    registrations,
    same_bytes,
    spec,
    u8,
    writes_submitted,
)

import aiomooncake
from aiomooncake import planes, tuning
from aiomooncake.core.session import Session
from aiomooncake.errors import HandshakeError, MessageMismatch, TransferFailed
from aiomooncake.peer import Peer
from aiomooncake.planes import shm
from aiomooncake.planes.base import DataPlane
from aiomooncake.planes.shm import ShmPlane
from aiomooncake.planes.te import TePlane

pytestmark = pytest.mark.skipif(shm.unavailable() is not None, reason=f"shm: {shm.unavailable()}")

# The harness keeps CPU tensors on the Transfer Engine unless told otherwise (TE_OPTIONS).
AUTO = {"host_transport": "auto"}

INLINE = tuning.SHM_INLINE_BYTES
SHM_EAGER = aiomooncake.Options().shm_eager_threshold  # the eager limit towards a same-host peer

# around the boundaries: eager, inline on the loop, one pool chunk, several chunks
SIZES = [0, 1, 4097, SHM_EAGER, SHM_EAGER + 1, EAGER_THRESHOLD + 1, 256 * KiB + 3, INLINE, INLINE + 1,
         3 * MiB + 7, tuning.SHM_CHUNK_BYTES, 2 * tuning.SHM_CHUNK_BYTES + 3, 64 * MiB + 1]


# ------------------------------------------------------------------------- two processes
async def test_same_host_peers_take_the_shm_path(remote: Remote) -> None:
    sp = u8(2 * MiB, seed=3)  # rendezvous: the receiver pulls it (its copies count as the engine's)
    async with remote.scenario(steps=[do.recv(1, sp), do.send(2, sp)], options=AUTO) as sc:
        assert sc.peer.transports == {"cpu": "shm", "cuda": "tcp"}
        w0, r0 = writes_submitted(), registrations()
        await sc.peer.send(make_tensor(sp), 1)
        assert writes_submitted() == w0, "we did not copy: the receiver pulled"
        back = torch.zeros(2 * MiB, dtype=torch.uint8)
        await sc.peer.recv(back, 2)
        assert writes_submitted() - w0 >= 1, "we pulled"
        assert registrations() == r0, "the same-host path registers nothing"
        got, sent = await sc.result()
    assert got["ok"] and got["match"] and got["registrations"] == 0
    assert sent["ok"] and sent["registrations"] == 0
    assert same_bytes(back, make_tensor(sp))


@pytest.mark.parametrize("nbytes", [SHM_EAGER, SHM_EAGER + 1, EAGER_THRESHOLD, 300 * KiB + 5, INLINE,
                                    INLINE + 1, 3 * tuning.SHM_CHUNK_BYTES + 5])
async def test_every_rendezvous_is_pulled_by_the_receiver(remote: Remote, nbytes: int) -> None:
    """RTS offers the source; the receiver copies it with process_vm_readv (on the loop up to the
    inline size, by its threads beyond) and ACKs: no CTS, no write into the receiver. Eager
    messages are not pulled."""
    sp = u8(nbytes, seed=nbytes % 253)
    eng = ShmPlane.instance()
    async with remote.scenario(steps=[do.send(2, sp), do.send(3, sp)], options=AUTO) as sc:
        p0 = eng.pulls
        got = await sc.peer.recv(torch.full((nbytes,), 0xA5, dtype=torch.uint8), 2)
        pulled = eng.pulls - p0
        # a non-contiguous destination: pulled into a contiguous temporary, then copied
        strided = torch.full((nbytes, 2), 0xA5, dtype=torch.uint8)[:, 0]
        got2 = await sc.peer.recv(strided, 3)
        r1, r2 = await sc.result(60)
    assert r1["ok"] and r2["ok"], (r1, r2)
    assert same_bytes(got, make_tensor(sp)) and same_bytes(got2.contiguous(), make_tensor(sp))
    assert pulled == (1 if nbytes > SHM_EAGER else 0)


@pytest.mark.parametrize("nbytes", [INLINE, 3 * INLINE])
async def test_a_pull_the_kernel_refuses_falls_back_to_the_senders_write(
        monkeypatch: pytest.MonkeyPatch, nbytes: int) -> None:
    def refuse(*args: Any) -> None:
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(shm, "copy_from", refuse)
    async with pair() as (a, b):
        eng = ShmPlane.instance()
        w0, p0 = eng.writes_submitted, eng.pulls
        src = torch.arange(nbytes // 8, dtype=torch.int64)
        got = await asyncio.wait_for(asyncio.gather(a.send(src, 5), b.recv(torch.zeros_like(src), 5)), 30)
        assert torch.equal(got[1], src)
        assert eng.pulls == p0 and eng.writes_submitted > w0


@pytest.mark.parametrize("nbytes", SIZES)
async def test_sizes_both_ways(remote: Remote, nbytes: int) -> None:
    out, back = u8(nbytes, seed=nbytes % 251), u8(nbytes, seed=nbytes % 251 + 1)
    async with remote.scenario(steps=[do.recv(1, out), do.send(2, back)], options=AUTO) as sc:
        assert sc.peer.transports["cpu"] == "shm"
        await sc.peer.send(make_tensor(out), 1)
        got = await sc.peer.recv(torch.full((nbytes,), 0xA5, dtype=torch.uint8), 2)
        r_recv, r_send = await sc.result(60)
    assert r_recv["ok"] and r_recv["match"], r_recv
    assert r_send["ok"], r_send
    assert same_bytes(got, make_tensor(back))


@pytest.mark.parametrize(("dtype", "shape"), [(torch.float32, (3, 1001, 97)), (torch.bfloat16, (4097, 33)),
                                              (torch.int64, (5, 300_001)), (torch.bool, (1_000_003,))])
async def test_dtypes_and_odd_shapes(remote: Remote, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    sp = spec(dtype, shape, seed=7)
    async with remote.scenario(steps=[do.recv(1, sp), do.recv_tensor(2, sp)], options=AUTO) as sc:
        assert sc.peer.transports["cpu"] == "shm"
        await sc.peer.send(make_tensor(sp), 1)
        await sc.peer.send(make_tensor(sp).t() if len(shape) == 2 else make_tensor(sp), 2)
        r1, r2 = await sc.result()
    assert r1["ok"] and r1["match"], r1
    assert r2["ok"], r2
    if len(shape) != 2:
        assert r2["match"]


async def test_concurrent_large_messages(remote: Remote) -> None:
    """Several pool jobs at once (more than the pool has threads), each delivered intact."""
    specs = [u8(9 * MiB + i, seed=i) for i in range(6)]
    steps = [do.gather([do.recv(10 + i, sp) for i, sp in enumerate(specs)])]
    async with remote.scenario(steps=steps, options=AUTO) as sc:
        assert sc.peer.transports["cpu"] == "shm"
        await asyncio.gather(*(sc.peer.send(make_tensor(sp), 10 + i) for i, sp in enumerate(specs)))
        (outs,) = await sc.result(60)
    assert all(o["ok"] and o["match"] for o in outs), outs


async def test_host_transport_te_keeps_the_engine(remote: Remote) -> None:
    sp = u8(1 * MiB + 3, seed=5)
    async with remote.scenario(steps=[do.recv(1, sp)], options={"host_transport": "te"}) as sc:
        assert sc.peer.transports["cpu"] == "tcp"
        r0 = registrations()
        await sc.peer.send(make_tensor(sp), 1)
        assert registrations() - r0 >= 0  # may be cached from an earlier test; the bytes must arrive
        (got,) = await sc.result()
    assert got["ok"] and got["match"]


@pytest.mark.parametrize(("mine", "theirs"), [({"host_transport": "te"}, AUTO),
                                              (AUTO, {"host_transport": "te"})])
async def test_one_side_asking_for_te_wins(remote: Remote, mine: dict[str, Any],
                                           theirs: dict[str, Any]) -> None:
    sp = u8(3 * MiB, seed=9)
    async with remote.scenario(steps=[do.recv(1, sp)], options=mine, remote_options=theirs) as sc:
        assert sc.peer.transports["cpu"] == "tcp"
        await sc.peer.send(make_tensor(sp), 1)
        (got,) = await sc.result()
    assert got["ok"] and got["match"]


async def test_environment_variable_selects_te(remote: Remote, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIOMOONCAKE_HOST_TRANSPORT", "te")  # this process only
    async with remote.scenario(steps=[], options=AUTO) as sc:  # auto here, so the variable decides
        assert sc.peer.transports["cpu"] == "tcp"
        await sc.result()


async def test_writes_outside_the_announced_destination_are_refused(
        remote: Remote, monkeypatch: pytest.MonkeyPatch) -> None:
    """The sender checks every write against the receiver's [addr, addr + capacity): a CTS that
    announces one byte too few makes the send fail before any byte moves."""
    orig = Peer._start_write

    def shrink(self: Peer, op: Any) -> None:
        op.capacity -= 1
        orig(self, op)

    monkeypatch.setattr(Peer, "_start_write", shrink)
    no_pull = Session.post_send  # offer no source, so the receiver asks us to write (CTS)
    monkeypatch.setattr(Session, "post_send", lambda self, *a, **k: no_pull(self, *a[:6]))
    sp = u8(2 * MiB, seed=1)
    async with remote.scenario(steps=[do.recv(1, sp)], options=AUTO) as sc:
        assert sc.peer.transports["cpu"] == "shm"
        w0 = writes_submitted()
        with pytest.raises(MessageMismatch, match="holds only"):
            await sc.peer.send(make_tensor(sp), 1)
        assert writes_submitted() == w0
        (got,) = await sc.result()
    assert not got["ok"] and got["untouched"], got


def slow_pulls(monkeypatch: pytest.MonkeyPatch, delay: float) -> list[float]:
    """Make every pulled piece take ``delay`` seconds (in the pool's threads); returns the times
    at which pieces landed."""
    landed: list[float] = []
    real = shm.copy_from

    def slow(pid: int, src: int, dst: int, n: int) -> None:
        time.sleep(delay)
        real(pid, src, dst, n)
        landed.append(time.monotonic())

    monkeypatch.setattr(shm, "copy_from", slow)
    return landed


@pytest.mark.parametrize("how", ["cancel", "timeout", "peer-closed"])
async def test_no_byte_lands_after_a_pull_failed_or_was_cancelled(monkeypatch: pytest.MonkeyPatch,
                                                                   how: str) -> None:
    """A threaded pull (pieces copied by our own pool) is stopped and waited for before the receive
    raises, so nothing lands in the buffer once the caller has its error back."""
    landed = slow_pulls(monkeypatch, 0.05)
    n = 32 * MiB  # several pieces
    async with pair() as (a, b):
        dest = torch.full((n,), 0xA5, dtype=torch.uint8)
        sending = asyncio.ensure_future(a.send(torch.ones(n, dtype=torch.uint8), 3))
        receiving = asyncio.ensure_future(b.recv(dest, 3, timeout=0.08 if how == "timeout" else None))
        await asyncio.sleep(0.08)
        if how == "cancel":
            receiving.cancel()
        elif how == "peer-closed":
            await a.close()
        with pytest.raises((asyncio.CancelledError, aiomooncake.AiomooncakeError)):
            await receiving
        raised_at = time.monotonic()
        snapshot = dest.clone()
        await asyncio.sleep(0.3)
        assert torch.equal(dest, snapshot), "bytes landed after the receive raised"
        assert all(t <= raised_at for t in landed)
        with pytest.raises(aiomooncake.AiomooncakeError):
            await asyncio.wait_for(sending, 10)
        if how != "peer-closed":  # the pair still works
            back = torch.zeros(1000, dtype=torch.int64)
            await asyncio.gather(a.send(torch.arange(1000), 4), b.recv(back, 4))
            assert torch.equal(back, torch.arange(1000))


@pytest.mark.parametrize("nbytes", [SHM_EAGER + 1, 8 * MiB])
async def test_eperm_fails_the_send_with_advice(monkeypatch: pytest.MonkeyPatch,
                                                caplog: pytest.LogCaptureFixture, nbytes: int) -> None:
    """If the kernel refuses the copies at run time (an LSM, changed credentials), the receiver's
    pull falls back to the sender's write, which fails with TransferFailed naming the way out (and a
    logged warning); the receive fails, its destination untouched."""
    def refuse(pid: int, src: int, dst: int, n: int) -> None:
        raise OSError(errno.EPERM, os.strerror(errno.EPERM))

    monkeypatch.setattr(shm, "copy_to", refuse)
    monkeypatch.setattr(shm, "copy_from", refuse)
    monkeypatch.setattr(shm, "_warned_perm", False)
    dest = torch.full((nbytes,), 0xA5, dtype=torch.uint8)
    with caplog.at_level(logging.WARNING, logger="aiomooncake.planes.shm"):
        async with pair() as (a, b):
            assert a.transports["cpu"] == "shm"
            sent, got = await asyncio.wait_for(asyncio.gather(
                a.send(torch.ones(nbytes, dtype=torch.uint8), 1), b.recv(dest, 1),
                return_exceptions=True), 30)
    assert isinstance(sent, TransferFailed) and "host_transport='te'" in str(sent), sent
    assert isinstance(got, aiomooncake.AiomooncakeError), got
    assert bool((dest == 0xA5).all()), "a refused copy changed the destination"
    assert any("host_transport='te'" in r.getMessage() for r in caplog.records)


# ---------------------------------------------------------------------------- one process
@asynccontextmanager
async def pair(server: dict[str, Any] | None = None,
               client: dict[str, Any] | None = None) -> AsyncIterator[tuple[Peer, Peer]]:
    """Two peers of this process, connected over loopback."""
    lst = await aiomooncake.listen("127.0.0.1", 0, **(server or {}))
    try:
        accepted = asyncio.ensure_future(lst.accept())
        try:
            c = await aiomooncake.connect("127.0.0.1", lst.port, **(client or {}))
        except BaseException:
            accepted.cancel()
            raise
        s = await accepted
        try:
            yield s, c
        finally:
            await c.close()
            await s.close()
    finally:
        await lst.close()


async def roundtrip(a: Peer, b: Peer, nbytes: int, seed: int = 0) -> None:
    src = make_tensor(u8(nbytes, seed=seed))
    dst = torch.zeros(nbytes, dtype=torch.uint8)
    await asyncio.gather(a.send(src, 5), b.recv(dst, 5))
    assert same_bytes(dst, src)


async def test_in_process_pair_uses_the_path() -> None:
    async with pair() as (s, c):
        assert s.transports["cpu"] == c.transports["cpu"] == "shm"
        await roundtrip(c, s, 5 * MiB + 1)
        await roundtrip(s, c, 100 * KiB)


async def test_failed_verification_falls_back_to_the_engine(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(shm, "verify", lambda *a: "the test says no")
    with caplog.at_level(logging.WARNING, logger="aiomooncake.planes.shm"):
        async with pair() as (s, c):
            assert s.transports["cpu"] == c.transports["cpu"] == "tcp"
            await roundtrip(c, s, 2 * MiB)
    assert any("the test says no" in r.getMessage() for r in caplog.records)


async def test_forced_shm_with_failed_verification_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shm, "verify", lambda *a: "the test says no")
    with pytest.raises(HandshakeError, match="host_transport 'shm'"):
        async with pair(server={"host_transport": "shm"}, client={"host_transport": "shm"}):
            pass


async def test_client_that_cannot_verify_the_server_refuses(monkeypatch: pytest.MonkeyPatch) -> None:
    """The server verified the client and chose the path; the client's own check fails."""
    real = shm.verify
    calls: list[int] = []

    def second_fails(*a: Any) -> str | None:
        calls.append(1)
        return real(*a) if len(calls) == 1 else "the test says no"

    monkeypatch.setattr(shm, "verify", second_fails)
    with pytest.raises(HandshakeError, match="host_transport='te'"):
        async with pair():
            pass


async def test_unavailable_here_means_the_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shm, "_tested", True)
    monkeypatch.setattr(shm, "_unusable", "pretend seccomp")
    async with pair() as (s, c):
        assert s.transports["cpu"] == c.transports["cpu"] == "tcp"
        await roundtrip(c, s, 1 * MiB)
    with pytest.raises(HandshakeError, match="host_transport 'shm'"):
        async with pair(client={"host_transport": "shm"}):
            pass


async def test_forced_shm_against_te_is_refused() -> None:
    with pytest.raises(HandshakeError, match="mismatch"):
        async with pair(server={"host_transport": "te"}, client={"host_transport": "shm"}):
            pass


async def test_loop_stays_responsive_during_a_large_copy() -> None:
    """Large copies run on pool threads: the loop keeps turning (inline copies are <= 1 MiB)."""
    async with pair() as (s, c):
        n = 256 * MiB
        src, dst = torch.ones(n, dtype=torch.uint8), torch.zeros(n, dtype=torch.uint8)
        await roundtrip(c, s, 16 * MiB)  # warm up
        gaps: list[float] = []
        done = False

        async def tick() -> None:
            last = time.perf_counter()
            while not done:
                await asyncio.sleep(0)
                now = time.perf_counter()
                gaps.append(now - last)
                last = now

        ticker = asyncio.ensure_future(tick())
        t0 = time.perf_counter()
        await asyncio.gather(c.send(src, 9), s.recv(dst, 9))
        elapsed = time.perf_counter() - t0
        done = True
        await ticker
        assert bool(dst.all())
    assert len(gaps) > 10, "the loop did not turn while the copy ran"
    assert max(gaps) < max(0.05, elapsed / 4), f"the loop stalled {max(gaps) * 1e3:.1f} ms"


# ------------------------------------------------------------------------------- units
def test_planes_implement_the_copy_entry_points() -> None:
    """Every plane stands in for another on a link: the entry points the base leaves abstract
    (it raises NotImplementedError for them) must be provided by each."""
    for cls in (ShmPlane, TePlane):
        assert issubclass(cls, DataPlane)
        missing = [n for n in ("write", "pull") if getattr(cls, n) is getattr(DataPlane, n)]
        assert not missing, f"{cls.__name__} lacks {missing}"


def test_listed_with_the_other_planes() -> None:
    eng = ShmPlane.instance()
    assert eng in planes.existing() and eng.kind == "shm" and eng.name == "shm"
    assert eng.segment == f"pid:{os.getpid()}"
    region = eng.acquire(torch.ones(3))
    assert region.size == 0 and eng.announce(region) == planes.Announcement(0, 0, None)


async def test_writes_only_to_verified_pids() -> None:
    eng = ShmPlane.instance()
    src, dst = torch.ones(8, dtype=torch.uint8), torch.zeros(8, dtype=torch.uint8)
    for seg in ("pid:1", "pid:x", "127.0.0.1:1234", f"pid:{os.getpid() + 1}"):
        job = eng.write(seg, [(src.data_ptr(), dst.data_ptr(), 8)], 1)
        with pytest.raises(TransferFailed, match="verified"):
            await job
    assert not bool(dst.any())


def _connected() -> tuple[socket.socket, socket.socket, socket.socket]:
    lst = socket.create_server(("127.0.0.1", 0))
    a = socket.create_connection(lst.getsockname())
    b, _ = lst.accept()
    return lst, a, b


def test_verify_checks_pid_socket_and_probe() -> None:
    lst, a, b = _connected()
    try:
        ours = a.getsockname()
        host, port = b.getsockname()
        peer = f"{host}:{port}"
        # b is the other end of a, and this process holds it: a peer "in this process" passes
        good: dict[str, Any] = {"pid": os.getpid(),
                                "shm_probe": [ctypes.addressof(shm._probe), int(shm._probe[0])]}
        assert shm.verify(good, ours, peer) is None
        bad_nonce = {**good, "shm_probe": [good["shm_probe"][0], good["shm_probe"][1] ^ 1]}
        assert "probe word differs" in str(shm.verify(bad_nonce, ours, peer))
        # a process that does not hold the socket (our parent) is refused
        other = {**good, "pid": os.getppid()}
        why = shm.verify(other, ours, peer)
        assert why is not None and ("does not hold" in why or "another user" in why or "inspect" in why)
        # the other end of some other connection is refused
        assert "does not hold" in str(shm.verify(good, ours, "127.0.0.1:1"))
        junk: object
        for junk in ({}, {"pid": "1"}, {"pid": True}, {"pid": -4}, {"pid": os.getpid()},
                     {**good, "shm_probe": [1]}, {**good, "shm_probe": ["a", 1]}, None, []):
            assert shm.verify(junk, ours, peer) is not None, junk
        assert shm.verify({**good, "pid": 2 ** 22 + 12345}, ours, peer) is not None  # no such process
    finally:
        for sk in (a, b, lst):
            sk.close()


def test_advertise() -> None:
    info: dict[str, Any] = {"caps": ["tcp"]}
    shm.advertise(info, "auto")
    assert info["caps"] == ["tcp", "shm"] and info["uid"] == os.getuid() and info["host_transport"] == "auto"
    info = {"caps": ["tcp"]}
    shm.advertise(info, "te")
    assert info == {"caps": ["tcp"], "host_transport": "te"}


def counting_shared_jobs(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The routed pieces of each shared job the same-host plane is handed from now on."""
    calls: list[int] = []
    real = ShmPlane.copy_all

    def counting(self: ShmPlane, routed: list[Any], lane: int = -1) -> Any:
        calls.append(len(routed))
        return real(self, routed, lane)

    monkeypatch.setattr(ShmPlane, "copy_all", counting)
    return calls


async def test_a_bursts_pulls_share_one_job(monkeypatch: pytest.MonkeyPatch) -> None:
    """The pulls one burst starts (a batch's receives matching offers already in) go to the plane
    as one shared job, and every byte still lands where its own receive asked."""
    calls = counting_shared_jobs(monkeypatch)
    sizes = [INLINE + 1 + 4096 * i for i in range(12)]
    async with pair() as (a, b):
        srcs = [make_tensor(u8(n, seed=i)) for i, n in enumerate(sizes)]
        async with a.batch() as sb:
            futs = [sb.send(t, 9) for t in srcs]
            await asyncio.sleep(0.05)  # every offer is in before the receives are posted
            dests = [torch.zeros(n, dtype=torch.uint8) for n in sizes]
            async with b.batch() as rb:
                for d in dests:
                    rb.recv(d, 9)
        assert all(f.done() for f in futs)
    assert all(same_bytes(d, s) for d, s in zip(dests, srcs, strict=True))
    assert calls == [len(sizes)], calls


async def test_a_receive_withdrawn_before_its_shared_job_starts_gets_no_byte() -> None:
    """A receive withdrawn in the loop turn its pull was queued in is left out of the shared job:
    its buffer stays untouched, its sender learns of the cancellation, the others complete."""
    sizes = [INLINE + 1 + 4096 * i for i in range(6)]
    async with pair() as (a, b):
        srcs = [make_tensor(u8(n, seed=i)) for i, n in enumerate(sizes)]
        sends = [a.post_send(t, 4, burst=True) for t in srcs]
        await asyncio.sleep(0.05)
        dests = [torch.full((n,), 0xA5, dtype=torch.uint8) for n in sizes]
        posted = [b.post_recv(d, 4, burst=True) for d in dests]
        posted[2].withdraw()  # matched, its pull queued for the end of this turn
        futs = [p.future for p in posted] + [s.future for s in sends]
        results = await asyncio.wait_for(asyncio.gather(*futs, return_exceptions=True), 30)
        await posted[2].cancel()
    assert isinstance(results[2], asyncio.CancelledError), results[2]
    assert isinstance(results[len(sizes) + 2], aiomooncake.TransferCancelled), results[len(sizes) + 2]
    assert not any(isinstance(r, BaseException) for i, r in enumerate(results) if i % len(sizes) != 2)
    assert bool((dests[2] == 0xA5).all()), "a withdrawn receive got bytes"
    for i in (0, 1, 3, 4, 5):
        assert same_bytes(dests[i], srcs[i])


async def test_a_long_bursts_copies_start_a_group_at_a_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """Gathered copies go to the plane once ``tuning.MAX_GROUP`` messages are queued for it (the
    head of a long burst copies while the rest is parsed), the remainder at the end of the turn."""
    monkeypatch.setattr(tuning, "MAX_GROUP", 4)
    calls = counting_shared_jobs(monkeypatch)
    sizes = [INLINE + 1 + 4096 * i for i in range(10)]
    async with pair() as (a, b):
        srcs = [make_tensor(u8(n, seed=i)) for i, n in enumerate(sizes)]
        sends = [a.post_send(t, 6, burst=True) for t in srcs]
        await asyncio.sleep(0.05)
        dests = [torch.zeros(n, dtype=torch.uint8) for n in sizes]
        posted = [b.post_recv(d, 6, burst=True) for d in dests]
        assert calls == [4, 4], calls  # two full groups started while posting
        await asyncio.wait_for(asyncio.gather(*(p.future for p in posted), *(s.future for s in sends)), 30)
    assert calls == [4, 4, 2], calls
    assert all(same_bytes(d, s) for d, s in zip(dests, srcs, strict=True))
