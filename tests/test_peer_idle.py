"""An idle process costs (almost) nothing: with a connected peer and nothing in flight, after both
eager and rendezvous traffic, each process uses < 1 % of a CPU (user + system time of all its
threads, engine threads included: the process CPU clock behind ``os.times()``), measured over ~2 s
in both processes at once.
"""

from __future__ import annotations

import asyncio
import time

from harness import (
    KiB,
    MiB,
    Remote,
    cpu_seconds,
    do,
    make_tensor,
    same_bytes,
    u8,
)

IDLE_S = 2.0
MAX_SHARE = 0.01
SETTLE_S = 0.3  # let the spin-then-sleep pollers wind down after the last operation


async def measure_idle(seconds: float) -> tuple[float, float]:
    c0, t0 = cpu_seconds(), time.monotonic()
    await asyncio.sleep(seconds)
    return cpu_seconds() - c0, time.monotonic() - t0


async def warm_up(sc: object) -> None:
    """Eager and rendezvous messages both ways (the remote script echoes them)."""
    for i, n in enumerate((100, 4 * MiB, 10 * KiB, 300 * KiB)):
        src = make_tensor(u8(n, seed=500 + i))
        await sc.peer.send(src)  # type: ignore[attr-defined]
        assert same_bytes(await sc.peer.recv_tensor(), src)  # type: ignore[attr-defined]


async def test_idle_with_an_open_peer_uses_under_1_percent_cpu(remote: Remote) -> None:
    steps = [do.echo(0, count=4), do.wait("measure"), do.sleep(SETTLE_S), do.idle_cpu(IDLE_S),
             do.wait("end")]
    async with remote.scenario(steps=steps) as sc:
        await warm_up(sc)
        sc.tell("measure")
        await asyncio.sleep(SETTLE_S)
        cpu, wall = await measure_idle(IDLE_S)
        assert not sc.peer.closed
        sc.tell("end")
        theirs = (await sc.result())[3]
    assert wall >= IDLE_S * 0.9
    assert cpu / wall < MAX_SHARE, f"this process used {cpu:.3f} s CPU in {wall:.2f} s idle"
    assert theirs["cpu"] / theirs["wall"] < MAX_SHARE, (
        f"the remote process used {theirs['cpu']:.3f} s CPU in {theirs['wall']:.2f} s idle")


async def test_waiting_for_a_message_uses_under_1_percent_cpu(remote: Remote) -> None:
    """A recv (and, on the other side, a rendezvous send nobody receives) that waits for its partner
    does not spin either."""
    steps = [do.echo(0, count=4), do.sleep(SETTLE_S),
             do.gather([do.send(2, u8(1 * MiB, seed=9)), do.idle_cpu(IDLE_S)], posted="posted")]
    async with remote.scenario(steps=steps) as sc:
        await warm_up(sc)
        await sc.event("posted")
        pending = asyncio.ensure_future(sc.peer.recv_tensor(1))
        await asyncio.sleep(SETTLE_S)
        cpu, wall = await measure_idle(IDLE_S)
        assert not pending.done()
        got = await asyncio.wait_for(sc.peer.recv_tensor(2), 30)
        assert same_bytes(got, make_tensor(u8(1 * MiB, seed=9)))
        pending.cancel()
        (_, _, (sent, theirs)) = await sc.result()
    assert sent["ok"]
    assert cpu / wall < MAX_SHARE, f"this process used {cpu:.3f} s CPU in {wall:.2f} s waiting"
    assert theirs["cpu"] / theirs["wall"] < MAX_SHARE, (
        f"the remote process used {theirs['cpu']:.3f} s CPU in {theirs['wall']:.2f} s waiting")
