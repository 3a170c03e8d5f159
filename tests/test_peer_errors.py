"""Errors between real peer processes: mismatches (both sides raise, destination untouched, peer
usable), timeouts that withdraw an operation, and a peer that closes, dies or freezes mid-operation."""

from __future__ import annotations

import asyncio
import gc
import signal
import time
from collections.abc import Callable

import pytest
import torch
from harness import (
    EAGER_THRESHOLD,
    Remote,
    dest_for,
    do,
    failed_with,
    filled,
    make_tensor,
    regions_in_flight,
    same_bytes,
    spec,
    stranded_regions,
    untouched,
    wait_until,
    writes_submitted,
)

import aiomooncake

SMALL = (8, 16)  # 128 float32 = 512 B: eager
LARGE = (64, 1024)  # 256 KiB float32: rendezvous
assert 512 <= EAGER_THRESHOLD < 256 * 1024

HB = {"heartbeat_interval": 0.2, "heartbeat_timeout": 1.0}


def wrong_dest(kind: str, shape: tuple[int, int]) -> dict[str, object]:
    """A destination spec that disagrees with a float32 ``shape`` message in one way."""
    rows, cols = shape
    if kind == "dtype":
        return spec(torch.int32, shape)  # same element size and count, other dtype
    if kind == "fewer":
        return spec(torch.float32, (rows, cols - 1))
    return spec(torch.float32, (rows, cols + 1))


MISMATCHES = ["dtype", "fewer", "more"]


@pytest.mark.parametrize("path", ["eager", "rendezvous"])
@pytest.mark.parametrize("kind", MISMATCHES)
async def test_mismatch_we_receive(remote: Remote, kind: str, path: str) -> None:
    """Our recv disagrees with the remote's send: our recv raises MessageMismatch, the remote's send
    raises MessageMismatch, our destination is untouched, and the next message on the same tag is
    received normally."""
    sp = spec(torch.float32, SMALL if path == "eager" else LARGE, seed=31)
    nxt = spec(torch.float32, LARGE if path == "eager" else SMALL, seed=32)
    async with remote.scenario(steps=[do.send(7, sp), do.send(7, nxt)]) as sc:
        bad = dest_for(wrong_dest(kind, sp["shape"]))
        with pytest.raises(aiomooncake.MessageMismatch):
            await sc.peer.recv(bad, 7)
        assert untouched(bad), "a refused message wrote into the destination"
        good = dest_for(nxt)
        await sc.peer.recv(good, 7)
        assert same_bytes(good, make_tensor(nxt))
        first, second = await sc.result()
    assert failed_with(first, aiomooncake.MessageMismatch), first
    assert second["ok"], second


@pytest.mark.parametrize("path", ["eager", "rendezvous"])
@pytest.mark.parametrize("kind", MISMATCHES)
async def test_mismatch_we_send(remote: Remote, kind: str, path: str) -> None:
    """The remote's recv disagrees with our send: our send raises MessageMismatch, the remote's recv
    raises MessageMismatch with its destination untouched, and both sides go on."""
    sp = spec(torch.float32, SMALL if path == "eager" else LARGE, seed=41)
    async with remote.scenario(steps=[do.recv(3, sp, dest=wrong_dest(kind, sp["shape"])),
                                      do.recv(3, sp)]) as sc:
        with pytest.raises(aiomooncake.MessageMismatch):
            await sc.peer.send(make_tensor(sp), 3)
        await sc.peer.send(make_tensor(sp), 3)
        first, second = await sc.result()
    assert failed_with(first, aiomooncake.MessageMismatch), first
    assert first["untouched"], "the remote's refused destination was written"
    assert second["ok"] and second["match"], second


async def test_mismatch_leaves_other_operations_alone(remote: Remote) -> None:
    """A mismatch on one tag while other messages are in flight on other tags fails only itself."""
    a, b = spec(torch.float32, LARGE, seed=51), spec(torch.float32, SMALL, seed=52)
    steps = [do.gather([do.send(1, a), do.send(2, b), do.send(1, b)])]
    async with remote.scenario(steps=steps) as sc:
        ok2 = asyncio.ensure_future(sc.peer.recv_tensor(2))
        bad = dest_for(spec(torch.float64, LARGE))
        with pytest.raises(aiomooncake.MessageMismatch):
            await sc.peer.recv(bad, 1)
        assert untouched(bad)
        assert same_bytes(await sc.peer.recv_tensor(1), make_tensor(b))
        assert same_bytes(await ok2, make_tensor(b))
        (outs,) = await sc.result()
    assert failed_with(outs[0], aiomooncake.MessageMismatch) and outs[1]["ok"] and outs[2]["ok"]


async def test_recv_timeout_withdraws_the_recv(remote: Remote) -> None:
    """recv(timeout=...) with nothing sent raises aiomooncake.Timeout (an asyncio.TimeoutError)
    after about the timeout; the timed-out recv is withdrawn, so the next message on that tag goes
    to the next recv and the abandoned buffer stays untouched."""
    sp = spec(torch.float32, LARGE, seed=61)
    async with remote.scenario(steps=[do.wait("go"), do.send(5, sp), do.send(5, sp)]) as sc:
        stale = dest_for(sp)
        t0 = time.monotonic()
        with pytest.raises(aiomooncake.Timeout) as ei:
            await sc.peer.recv(stale, 5, timeout=0.3)
        elapsed = time.monotonic() - t0
        assert isinstance(ei.value, asyncio.TimeoutError)
        assert 0.25 <= elapsed < 3.0, elapsed
        with pytest.raises(aiomooncake.Timeout):
            await sc.peer.recv_tensor(5, timeout=0.05)
        sc.tell("go")
        fresh = dest_for(sp)
        await asyncio.wait_for(sc.peer.recv(fresh, 5), 30)
        assert same_bytes(fresh, make_tensor(sp))
        assert same_bytes(await asyncio.wait_for(sc.peer.recv_tensor(5), 30), make_tensor(sp))
        await asyncio.sleep(0.1)
        assert untouched(stale), "a message was written into a recv that had timed out"
        _, s1, s2 = await sc.result()
    assert s1["ok"] and s2["ok"]


@pytest.mark.parametrize("path", ["eager", "rendezvous"])
async def test_send_timeout_withdraws_the_message(remote: Remote, path: str) -> None:
    """send(timeout=...) that nobody receives raises Timeout and withdraws the message: the remote's
    later recv on that tag gets the next message, not the withdrawn one."""
    withdrawn = spec(torch.float32, SMALL if path == "eager" else LARGE, seed=71)
    nxt = spec(torch.int16, (3, 5), seed=72)
    steps = [do.wait("go"), do.recv_tensor(9, nxt), do.recv_tensor(9, timeout=0.5)]
    async with remote.scenario(steps=steps) as sc:
        with pytest.raises(aiomooncake.Timeout):
            await sc.peer.send(make_tensor(withdrawn), 9, timeout=0.3)
        await asyncio.sleep(0.1)
        sc.tell("go")
        await asyncio.wait_for(sc.peer.send(make_tensor(nxt), 9), 30)
        _, got, none = await sc.result()
    assert got["ok"] and got["dtype"] == "int16" and got["match"], got
    assert failed_with(none, aiomooncake.Timeout), f"the withdrawn message was still delivered: {none}"


async def test_remote_closes_mid_operation(remote: Remote) -> None:
    """The remote closes its peer while we have a recv, a recv_tensor and an unreceived rendezvous
    send pending: all three fail with PeerClosed promptly, and so does every later operation."""
    big = spec(torch.float32, LARGE, seed=81)
    async with remote.scenario(steps=[do.wait("close"), do.close()]) as sc:
        peer = sc.peer
        dest = dest_for(big)
        pending = [asyncio.ensure_future(peer.recv(dest, 1)), asyncio.ensure_future(peer.recv_tensor(2)),
                   asyncio.ensure_future(peer.send(make_tensor(big), 3))]
        await asyncio.sleep(0.1)
        assert not any(p.done() for p in pending)
        t0 = time.monotonic()
        sc.tell("close")
        results = await asyncio.wait_for(asyncio.gather(*pending, return_exceptions=True), 10)
        assert time.monotonic() - t0 < 2.0
        assert all(isinstance(r, aiomooncake.PeerClosed) for r in results), results
        assert peer.closed
        assert untouched(dest)
        with pytest.raises(aiomooncake.PeerClosed):
            await peer.send(make_tensor(big), 1)
        with pytest.raises(aiomooncake.PeerClosed):
            await peer.recv(dest_for(big), 1)
        await sc.result()


async def _pending_ops(peer: aiomooncake.Peer, big: dict[str, object]) -> list[asyncio.Future[object]]:
    dest = dest_for(big)
    ops: list[asyncio.Future[object]] = [asyncio.ensure_future(peer.recv(dest, 1)),
                                         asyncio.ensure_future(peer.recv_tensor(2)),
                                         asyncio.ensure_future(peer.send(make_tensor(big), 3))]
    await asyncio.sleep(0.1)
    assert not any(p.done() for p in ops)
    return ops


async def test_remote_killed_mid_operation(spawn_remotes: Callable[[int], list[Remote]]) -> None:
    """SIGKILL of the remote process with operations pending: each fails with PeerClosed within the
    heartbeat timeout (the kernel resets the TCP connection, usually at once)."""
    (r,) = spawn_remotes(1)
    big = spec(torch.float32, LARGE, seed=91)
    async with r.scenario(steps=[do.emit("ready"), do.wait("never")], options=HB) as sc:
        await sc.event("ready")
        ops = await _pending_ops(sc.peer, big)
        t0 = time.monotonic()
        r.kill(signal.SIGKILL)
        results = await asyncio.wait_for(asyncio.gather(*ops, return_exceptions=True), 10)
        elapsed = time.monotonic() - t0
        assert all(isinstance(x, aiomooncake.PeerClosed) for x in results), results
        assert elapsed < HB["heartbeat_timeout"] + 1.0, elapsed
        assert sc.peer.closed


async def test_remote_frozen_is_declared_dead_by_heartbeat(
        spawn_remotes: Callable[[int], list[Remote]]) -> None:
    """SIGSTOP of the remote keeps its TCP connection open but silent: after heartbeat_timeout
    without traffic the peer is declared dead and pending operations fail with PeerClosed."""
    (r,) = spawn_remotes(1)
    big = spec(torch.float32, LARGE, seed=92)
    timeout = HB["heartbeat_timeout"]
    async with r.scenario(steps=[do.emit("ready"), do.wait("never")], options=HB) as sc:
        await sc.event("ready")
        ops = await _pending_ops(sc.peer, big)
        t0 = time.monotonic()
        r.kill(signal.SIGSTOP)
        try:
            results = await asyncio.wait_for(asyncio.gather(*ops, return_exceptions=True), 10)
            elapsed = time.monotonic() - t0
        finally:
            r.kill(signal.SIGKILL)
        assert all(isinstance(x, aiomooncake.PeerClosed) for x in results), results
        assert timeout * 0.5 <= elapsed <= timeout + 1.5, elapsed


async def test_remote_killed_mid_transfer(spawn_remotes: Callable[[int], list[Remote]]) -> None:
    """The receiver dies while our engine is writing a large message into it: our send fails with
    PeerClosed (not a hang), the peer is declared closed, and closing it afterwards finishes."""
    (r,) = spawn_remotes(1)
    n = 256 * 1024 * 1024
    big = spec(torch.uint8, (n,), fill=0x11)
    # 4 KiB chunks one at a time keep both loops busy; a roomier heartbeat avoids a false "dead"
    # verdict on a loaded machine (the kill itself is seen at once through the TCP reset).
    hb = {"heartbeat_interval": 0.5, "heartbeat_timeout": 3.0}
    slow = {**hb, "chunk_bytes": 4096, "window": 1}
    base = regions_in_flight()
    src = make_tensor(big)
    async with r.scenario(steps=[do.recv(4, big)], options=slow) as sc:
        w0 = writes_submitted()
        send = asyncio.ensure_future(sc.peer.send(src, 4))
        assert await wait_until(lambda: writes_submitted() - w0 >= 20 or send.done(), 30)
        assert not send.done(), "the transfer finished before the kill: make it slower"
        r.kill(signal.SIGKILL)
        # The engine's failed write and the lost control connection race; either way the send
        # reports the peer's death, PeerClosed (not a data-plane TransferFailed), and never hangs.
        with pytest.raises(aiomooncake.PeerClosed):
            await asyncio.wait_for(send, hb["heartbeat_timeout"] + 5)
        assert await wait_until(lambda: sc.peer.closed, hb["heartbeat_timeout"] + 1.0)
        await asyncio.wait_for(sc.peer.close(), 10)
        # Let the failed engine requests settle before this test's loop ends (see
        # test_close_waits_for_engine_writes_of_a_dead_peer): a region left "in flight" would make
        # every later registration of that memory fail.
        assert await wait_until(lambda: regions_in_flight() <= base, 10)


async def test_close_waits_for_engine_writes_of_a_dead_peer(
        spawn_remotes: Callable[[int], list[Remote]]) -> None:
    """The receiver stops answering mid-transfer (SIGSTOP: its engine stalls our write), the heartbeat
    declares it dead, and it is then killed. close() must return only once our engine writes to it
    have settled: the source's registration is no longer in use when close() returns (it would stay
    "in flight" forever if the event loop ended right after close())."""
    (r,) = spawn_remotes(1)
    n = 256 * 1024 * 1024
    big = spec(torch.uint8, (n,), fill=0x11)
    hb = {"heartbeat_interval": 0.3, "heartbeat_timeout": 2.0}
    slow = {**hb, "chunk_bytes": 4096, "window": 1, "cancel_timeout": 5.0}
    base = regions_in_flight()
    src = make_tensor(big)
    async with r.scenario(steps=[do.recv(4, big)], options=slow) as sc:
        w0 = writes_submitted()
        send = asyncio.ensure_future(sc.peer.send(src, 4))
        assert await wait_until(lambda: writes_submitted() - w0 >= 20 or send.done(), 30)
        assert not send.done(), "the transfer finished before the freeze: make it slower"
        r.kill(signal.SIGSTOP)
        try:
            with pytest.raises(aiomooncake.PeerClosed):
                await asyncio.wait_for(send, hb["heartbeat_timeout"] + 5)
            assert regions_in_flight() == base + 1, "the stalled engine write should still be in flight"
            r.kill(signal.SIGKILL)  # the engine's request now fails within moments
            await asyncio.wait_for(sc.peer.close(), 10)
            left = regions_in_flight() - base
        finally:
            settled = await wait_until(lambda: regions_in_flight() <= base, 10)
        assert settled, "the engine write never settled"
        assert left == 0, "close() returned while an engine write of this peer was still in flight"


def test_receive_memory_of_a_dead_sender_is_not_stranded_when_the_loop_ends(
        spawn_remotes: Callable[[int], list[Remote]]) -> None:
    """A program's event loop ends (aiomooncake.run returns) soon after a sender died mid-transfer
    into one of its receives. The receive memory must not end up freed while its registration is
    still counted in flight: that strands the registration (every later one overlapping it fails)
    and lets a late write of the dead peer's engine land in memory handed out again."""
    (r,) = spawn_remotes(1)
    hb = {"heartbeat_interval": 0.5, "heartbeat_timeout": 3.0}
    big = spec(torch.uint8, (256 * 1024 * 1024,), fill=0x11)
    before = stranded_regions()

    slow = {**hb, "chunk_bytes": 4096, "window": 1}

    async def program() -> None:
        buf = filled(big["shape"])
        async with r.scenario(steps=[do.send(4, big)], options=slow) as sc:
            recv = asyncio.ensure_future(sc.peer.recv(buf, 4))
            assert await wait_until(lambda: buf[0].item() != 0xA5 or recv.done(), 30), "no byte arrived"
            assert not recv.done(), "the transfer finished before the kill: make it slower"
            r.kill(signal.SIGKILL)
            with pytest.raises(aiomooncake.PeerClosed):
                await asyncio.wait_for(recv, hb["heartbeat_timeout"] + 5)

    aiomooncake.run(program())
    gc.collect()
    assert stranded_regions() == before, "a registration is in flight for memory that was freed"


async def test_sender_killed_mid_transfer(spawn_remotes: Callable[[int], list[Remote]]) -> None:
    """The sender dies while its engine is writing into our buffer: our recv fails with PeerClosed
    within the heartbeat timeout."""
    (r,) = spawn_remotes(1)
    hb = {"heartbeat_interval": 0.5, "heartbeat_timeout": 3.0}
    big = spec(torch.uint8, (256 * 1024 * 1024,), fill=0x11)
    buf = filled(big["shape"])
    async with r.scenario(steps=[do.send(4, big)], options={**hb, "chunk_bytes": 4096, "window": 1}) as sc:
        recv = asyncio.ensure_future(sc.peer.recv(buf, 4))
        assert await wait_until(lambda: buf[0].item() != 0xA5 or recv.done(), 30), "no byte arrived"
        assert not recv.done(), "the transfer finished before the kill: make it slower"
        t0 = time.monotonic()
        r.kill(signal.SIGKILL)
        with pytest.raises(aiomooncake.PeerClosed):
            await asyncio.wait_for(recv, hb["heartbeat_timeout"] + 5)
        assert time.monotonic() - t0 < hb["heartbeat_timeout"] + 1.0
        assert buf[-1].item() == 0xA5


@pytest.mark.parametrize("numel", [6, 400_000], ids=["eager", "rendezvous"])
@pytest.mark.parametrize("dtype", [torch.quint8, torch.qint8, torch.qint32, torch.quint4x2, torch.quint2x4],
                         ids=str)
async def test_quantized_tensor_is_refused_or_roundtrips(
        remote: Remote, dtype: torch.dtype, numel: int) -> None:
    """Quantized dtypes (skipped by the every-dtype roundtrip, see harness.SKIPPED_DTYPES) must either
    be refused up front with ConfigurationError or arrive with their quantizer intact."""
    x = torch.quantize_per_tensor(torch.linspace(0, 3, numel), scale=0.25, zero_point=1, dtype=dtype)
    async with remote.scenario("echo") as sc:
        try:
            await asyncio.wait_for(sc.peer.send(x), 30)
        except aiomooncake.ConfigurationError:
            return  # refused: fine
        back = await asyncio.wait_for(sc.peer.recv_tensor(), 30)
    assert back.dtype == dtype and back.shape == x.shape
    assert back.q_scale() == x.q_scale() and back.q_zero_point() == x.q_zero_point()
    assert torch.equal(back.int_repr(), x.int_repr())


async def test_closing_our_side_fails_our_pending_ops(remote: Remote) -> None:
    """Closing the local peer fails its own pending operations with PeerClosed and is idempotent;
    the remote sees PeerClosed on its pending recv."""
    async with remote.scenario(steps=[do.recv(1, spec(torch.float32, SMALL))]) as sc:
        ops = [asyncio.ensure_future(sc.peer.recv(filled(10), 2)),
               asyncio.ensure_future(sc.peer.send(make_tensor(spec(torch.float32, LARGE)), 3))]
        await asyncio.sleep(0.1)
        await asyncio.wait_for(sc.peer.close(), 10)
        await sc.peer.close()
        results = await asyncio.gather(*ops, return_exceptions=True)
        assert all(isinstance(x, aiomooncake.PeerClosed) for x in results), results
        (theirs,) = await sc.result()
    assert failed_with(theirs, aiomooncake.PeerClosed), theirs
