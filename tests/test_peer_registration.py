"""Memory registration with the Transfer Engine, counted by the engine's own statistics
(``planes.existing()[i].stats().registrations``) in this process and in the remote one.

Registrations are cached per allocation (a CPU tensor's storage) while peers are open: sending or
receiving with the same tensor again, or with another view of the same storage, registers nothing;
eager messages never touch the engine; ``aiomooncake.register`` registers once up front. (The harness
keeps CPU tensors on the engine, ``host_transport="te"``: the same-host path registers nothing.)
"""

from __future__ import annotations

from collections.abc import Callable

from harness import (
    EAGER_THRESHOLD,
    MiB,
    Remote,
    dest_for,
    do,
    make_tensor,
    registrations,
    same_bytes,
    u8,
    writes_submitted,
)

import aiomooncake

LARGE = 1 * MiB
assert LARGE > EAGER_THRESHOLD


async def test_sending_the_same_tensor_again_registers_nothing(remote: Remote) -> None:
    sp = u8(LARGE, seed=1)
    src = make_tensor(sp)
    async with remote.scenario(steps=[do.recv(1, sp) for _ in range(3)]) as sc:
        counts = []
        for _ in range(3):
            r0 = registrations()
            await sc.peer.send(src, 1)
            counts.append(registrations() - r0)
        outs = await sc.result()
    assert all(o["ok"] and o["match"] for o in outs)
    assert counts == [1, 0, 0], f"registrations per send of one tensor: {counts}"


async def test_receiving_into_the_same_tensor_again_registers_nothing(remote: Remote) -> None:
    specs = [u8(LARGE, seed=10 + i) for i in range(3)]
    async with remote.scenario(steps=[do.send(2, sp) for sp in specs]) as sc:
        dest = dest_for(specs[0])
        counts = []
        for sp in specs:
            r0 = registrations()
            await sc.peer.recv(dest, 2)
            counts.append(registrations() - r0)
            assert same_bytes(dest, make_tensor(sp))
        await sc.result()
    assert counts == [1, 0, 0], f"registrations per recv into one tensor: {counts}"


async def test_remote_process_counts_too(remote: Remote) -> None:
    """The same holds in the remote process: a kept source or destination tensor registers once."""
    a, b = u8(LARGE, seed=20), u8(LARGE, seed=21)
    steps = [do.send(3, a, keep="src"), do.send(3, b, keep="src"), do.recv(4, a, keep="dst"),
             do.recv(4, b, keep="dst")]
    async with remote.scenario(steps=steps) as sc:
        t1, t2 = await sc.peer.recv_tensor(3), await sc.peer.recv_tensor(3)
        await sc.peer.send(make_tensor(a), 4)
        await sc.peer.send(make_tensor(b), 4)
        outs = await sc.result()
    assert same_bytes(t1, make_tensor(a)) and same_bytes(t2, make_tensor(b))
    assert all(o["ok"] for o in outs)
    assert outs[2]["match"] and outs[3]["match"]
    assert [o["registrations"] for o in outs] == [1, 0, 1, 0]


async def test_views_of_one_storage_share_one_registration(remote: Remote) -> None:
    """Slices of one storage are one allocation: a single registration serves all of them."""
    whole = make_tensor(u8(4 * LARGE, seed=30))
    parts = [whole[:LARGE], whole[LARGE:3 * LARGE], whole[3 * LARGE:]]
    steps = [do.recv_tensor(5) for _ in parts]
    async with remote.scenario(steps=steps) as sc:
        r0 = registrations()
        for p in parts:
            await sc.peer.send(p, 5)
        count = registrations() - r0
        outs = await sc.result()
    assert [o["shape"] for o in outs] == [tuple(p.shape) for p in parts]
    assert count == 1, f"{count} registrations for three views of one storage"


async def test_eager_messages_register_nothing(remote: Remote) -> None:
    """Messages up to the eager threshold travel in the control frame: no registration, no write,
    on either side."""
    small = [u8(n, seed=40 + n) for n in (0, 1, 1000, EAGER_THRESHOLD)]
    steps = [do.stats(), *(do.recv(6, sp) for sp in small), *(do.send(7, sp) for sp in small), do.stats()]
    async with remote.scenario(steps=steps) as sc:
        r0, w0 = registrations(), writes_submitted()
        for sp in small:
            await sc.peer.send(make_tensor(sp), 6)
        for sp in small:
            d = dest_for(sp)
            await sc.peer.recv(d, 7)
            assert same_bytes(d, make_tensor(sp))
        ours = registrations() - r0, writes_submitted() - w0
        outs = await sc.result()
    assert ours == (0, 0), f"(registrations, writes) here: {ours}"
    first, last = outs[0], outs[-1]
    theirs = (last["registrations"] - first["registrations"], last["writes"] - first["writes"])
    assert theirs == (0, 0), f"(registrations, writes) in the remote: {theirs}"


async def test_register_up_front(remote: Remote) -> None:
    """aiomooncake.register() registers a tensor's memory once; sends and receives from it or its
    views then register nothing; unregister() releases the pin."""
    sp = u8(2 * LARGE, seed=50)
    steps = [do.recv(8, u8(LARGE, seed=51)), do.send(9, u8(LARGE, seed=52))]
    async with remote.scenario(steps=steps) as sc:
        buf = make_tensor(sp)
        buf[:LARGE].copy_(make_tensor(u8(LARGE, seed=51)))
        r0 = registrations()
        aiomooncake.register(buf)
        try:
            assert registrations() - r0 == 1
            aiomooncake.register(buf)  # idempotent
            r1 = registrations()
            assert r1 - r0 == 1
            await sc.peer.send(buf[:LARGE], 8)
            await sc.peer.recv(buf[LARGE:], 9)
            assert registrations() == r1, "a registered tensor was registered again"
            assert same_bytes(buf[LARGE:], make_tensor(u8(LARGE, seed=52)))
        finally:
            aiomooncake.unregister(buf)
        outs = await sc.result()
    assert outs[0]["match"] and outs[1]["ok"]


async def test_registration_is_shared_by_all_peers(
        remote: Remote, spawn_remotes: Callable[[int], list[Remote]]) -> None:
    """The engine is per process: a tensor registered for one peer needs no registration for another
    peer open at the same time. (When the last peer closes, the core releases cached registrations;
    that is why both peers are open here.)"""
    (other,) = spawn_remotes(1)
    sp = u8(LARGE, seed=60)
    src = make_tensor(sp)
    counts = []
    async with remote.scenario(steps=[do.recv(1, sp)]) as a, other.scenario(steps=[do.recv(1, sp)]) as b:
        for sc in (a, b):
            r0 = registrations()
            await sc.peer.send(src, 1)
            counts.append(registrations() - r0)
        outs = [await a.result(), await b.result()]
    assert all(o["match"] for (o,) in outs)
    assert counts == [1, 0], counts
