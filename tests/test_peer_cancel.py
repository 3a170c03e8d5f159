"""Cancellation between real peer processes.

asyncio cancellation of (or a timeout around) a recv must withdraw it: a recv not yet matched is
simply removed; one whose CTS already went out runs the cancel handshake (RCANCEL, the sender stops
and answers), so once the cancellation returns the remote can no longer write into that buffer.
The sender's send then fails with TransferCancelled, and the peer stays usable.

The slow rendezvous transfers use a 256 MiB message written in 4 KiB chunks, one at a time, so the
transfer takes seconds and is reliably caught mid-way (the tests assert that it was). Big buffers are
allocated before connecting, so filling them does not stall a connected event loop.
"""

from __future__ import annotations

import asyncio

import pytest
import torch
from harness import (
    SENTINEL,
    MiB,
    Remote,
    dest_for,
    do,
    failed_with,
    filled,
    make_tensor,
    same_bytes,
    spec,
    u8,
    untouched,
    wait_until,
    writes_submitted,
)

import aiomooncake

BIG = 256 * MiB
SLOW = {"chunk_bytes": 4096, "window": 1, "heartbeat_interval": 0.5, "heartbeat_timeout": 5.0}
# Fast, but with 64 MiB of engine requests in flight (more than loopback socket buffers hold): when a
# frozen sender wakes up, those still land unless the cancellation waited for the sender's word.
DEEP = {"chunk_bytes": 4 * MiB, "window": 16, "heartbeat_interval": 0.5, "heartbeat_timeout": 5.0}
DEEP_BIG = 1024 * MiB
AFTER = [u8(100, seed=201), u8(300_000, seed=202)]  # eager, rendezvous: the peer is still usable


def big_spec(nbytes: int = BIG) -> dict[str, object]:
    return spec(torch.uint8, (nbytes,), fill=0x11)


async def assert_usable(sc: object, tag: int) -> None:
    """Receive the AFTER messages the remote script sends on ``tag`` once told "again"."""
    sc.tell("again")  # type: ignore[attr-defined]
    for sp in AFTER:
        d = dest_for(sp)
        await asyncio.wait_for(sc.peer.recv(d, tag), 30)  # type: ignore[attr-defined]
        assert same_bytes(d, make_tensor(sp))


def sender_steps(tag: int, nbytes: int = BIG) -> list[dict[str, object]]:
    return [do.wait("go"), do.send(tag, big_spec(nbytes), emit="big"), do.wait("again"),
            *(do.send(tag, sp) for sp in AFTER)]


async def test_cancel_unmatched_recv(remote: Remote) -> None:
    """A cancelled recv that matched nothing is withdrawn: the next message goes to the next recv and
    the abandoned buffer is never written."""
    sp = u8(200_000, seed=210)
    async with remote.scenario(steps=[do.wait("go"), do.send(1, sp), do.send(1, u8(10, seed=211))]) as sc:
        abandoned = dest_for(sp)
        task = asyncio.ensure_future(sc.peer.recv(abandoned, 1))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        sc.tell("go")
        fresh = dest_for(sp)
        await asyncio.wait_for(sc.peer.recv(fresh, 1), 30)
        assert same_bytes(fresh, make_tensor(sp))
        assert same_bytes(await asyncio.wait_for(sc.peer.recv_tensor(1), 30), make_tensor(u8(10, seed=211)))
        assert untouched(abandoned)
        await sc.result()


@pytest.mark.parametrize("sender", ["slow", "deep"])
async def test_cancel_recv_mid_transfer_with_frozen_sender(remote: Remote, sender: str) -> None:
    """Cancel a recv whose CTS went out and whose bytes are arriving, while the sender is frozen
    (SIGSTOP) so it cannot acknowledge yet. Whenever the cancellation returns, not one byte may land
    in the buffer afterwards; the sender's send fails with TransferCancelled; the peer stays usable.
    "slow": 4 KiB writes one at a time; "deep": 16 writes of 4 MiB in flight when it freezes."""
    nbytes, opts = (BIG, SLOW) if sender == "slow" else (DEEP_BIG, DEEP)
    buf = filled(nbytes)
    async with remote.scenario(steps=sender_steps(6, nbytes), options=opts) as sc:
        task = asyncio.ensure_future(sc.peer.recv(buf, 6))
        await asyncio.sleep(0.01)
        sc.tell("go")
        assert await wait_until(lambda: buf[0].item() != SENTINEL or task.done(), 30), "no byte arrived"
        assert not task.done(), "the transfer finished before it could be cancelled"
        remote.pause()
        try:
            task.cancel()
            await asyncio.wait({task}, timeout=0.5)
            snapshot = buf.clone() if task.done() else None  # returned without the sender's word
        finally:
            remote.resume()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, 30)
        if snapshot is None:
            snapshot = buf.clone()
        await asyncio.sleep(0.5)
        assert torch.equal(buf, snapshot), "the remote wrote into the buffer after the cancellation returned"
        assert buf[-1].item() == SENTINEL, "the whole message was written: the cancel came too late"
        out = await sc.event("big")
        assert failed_with(out, aiomooncake.TransferCancelled), out
        await assert_usable(sc, 6)
        await sc.result()


async def test_recv_timeout_mid_transfer(remote: Remote) -> None:
    """A timeout around a recv whose transfer is under way: Timeout is raised only once the remote
    can no longer write, the sender's send fails with TransferCancelled, and the peer is usable."""
    buf = filled(BIG)
    async with remote.scenario(steps=sender_steps(7), options=SLOW) as sc:
        task = asyncio.ensure_future(sc.peer.recv(buf, 7, timeout=1.0))
        await asyncio.sleep(0.01)
        sc.tell("go")
        with pytest.raises(aiomooncake.Timeout):
            await asyncio.wait_for(task, 30)
        snapshot = buf.clone()
        assert snapshot[0].item() != SENTINEL, "no byte had arrived: the timeout was not mid-transfer"
        assert snapshot[-1].item() == SENTINEL, "the whole message arrived before the timeout"
        await asyncio.sleep(0.5)
        assert torch.equal(buf, snapshot), "the remote wrote into the buffer after the timeout returned"
        out = await sc.event("big")
        assert failed_with(out, aiomooncake.TransferCancelled), out
        await assert_usable(sc, 7)
        await sc.result()


async def test_cancel_send_mid_transfer(remote: Remote) -> None:
    """Cancelling our send while the engine writes it: the remote's recv fails with
    TransferCancelled, and both directions work afterwards on the same peer."""
    steps = [do.recv(2, big_spec(), emit="big"), *(do.recv(2, sp) for sp in AFTER), do.send(2, AFTER[1])]
    src = make_tensor(big_spec())
    async with remote.scenario(steps=steps, options=SLOW) as sc:
        w0 = writes_submitted()
        task = asyncio.ensure_future(sc.peer.send(src, 2))
        assert await wait_until(lambda: writes_submitted() - w0 >= 20 or task.done(), 30)
        assert not task.done(), "the transfer finished before it could be cancelled"
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        out = await sc.event("big", timeout=30)
        assert failed_with(out, aiomooncake.TransferCancelled), out
        for sp in AFTER:
            await asyncio.wait_for(sc.peer.send(make_tensor(sp), 2), 30)
        back = await asyncio.wait_for(sc.peer.recv_tensor(2), 30)
        assert same_bytes(back, make_tensor(AFTER[1]))
        _, r1, r2, s = await sc.result()
    assert r1["match"] and r2["match"] and s["ok"]


async def test_cancel_half_of_many_pending_recvs(remote: Remote) -> None:
    """Of 100 pending recvs on one tag, every other one is cancelled before anything is sent: the 50
    messages go, in order, to the 50 remaining recvs; cancelled buffers stay untouched."""
    msgs = [u8(1000 if i % 3 else 100_000, seed=300 + i) for i in range(50)]
    async with remote.scenario(steps=[do.wait("go"), do.gather([do.send(8, m) for m in msgs])]) as sc:
        dests = [dest_for(msgs[i // 2]) for i in range(100)]
        tasks = [asyncio.ensure_future(sc.peer.recv(d, 8)) for d in dests]
        await asyncio.sleep(0.05)
        for t in tasks[1::2]:
            t.cancel()
        await asyncio.gather(*tasks[1::2], return_exceptions=True)
        sc.tell("go")
        await asyncio.wait_for(asyncio.gather(*tasks[0::2]), 60)
        (sent,) = (await sc.result())[1:]
    assert all(o["ok"] for o in sent)
    for i, m in enumerate(msgs):
        assert same_bytes(dests[2 * i], make_tensor(m)), f"message {i}"
        assert untouched(dests[2 * i + 1]), f"cancelled recv {2 * i + 1} was written"


async def test_cancel_after_completion_is_harmless(remote: Remote) -> None:
    """Cancelling the task of a recv that already completed changes nothing: the data stays, and the
    next message goes to the next recv."""
    a, b = u8(500, seed=401), u8(100_000, seed=402)
    async with remote.scenario(steps=[do.send(1, a), do.send(1, b)]) as sc:
        da = dest_for(a)
        task = asyncio.ensure_future(sc.peer.recv(da, 1))
        await asyncio.wait_for(asyncio.shield(task), 30)
        task.cancel()
        assert task.done() and not task.cancelled()
        db = dest_for(b)
        await asyncio.wait_for(sc.peer.recv(db, 1), 30)
        assert same_bytes(da, make_tensor(a)) and same_bytes(db, make_tensor(b))
        await sc.result()
