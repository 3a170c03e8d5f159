"""Matching: per-tag FIFO order, tag independence, unexpected messages, and hundreds of operations
in flight on one peer and across four peers (each a separate process)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

import pytest
import torch
from harness import (
    EAGER_THRESHOLD,
    KiB,
    Remote,
    Scenario,
    dest_for,
    do,
    make_tensor,
    same_bytes,
    u8,
    wait_until,
)

SMALL = 1 * KiB  # eager
LARGE = 96 * KiB  # rendezvous
assert SMALL <= EAGER_THRESHOLD < LARGE


def msg_spec(tag: int, i: int, large: bool) -> dict[str, object]:
    """Message ``i`` of ``tag``: its seed and length identify it."""
    return u8((LARGE if large else SMALL) + 8 * i + tag, seed=1000 * tag + i)


async def test_per_tag_order_with_mixed_paths(remote: Remote) -> None:
    """The k-th recv posted on a tag gets the k-th message sent on it, whatever the path of each
    (a large rendezvous message followed by a small eager one on the same tag must not overtake),
    even when we post the receives in reverse tag order."""
    tags = [1, 2, 3]
    per_tag = 6
    plan = [(tag, i, (i + tag) % 2 == 0) for i in range(per_tag) for tag in tags]
    steps = [do.send(tag, msg_spec(tag, i, large)) for tag, i, large in plan]
    async with remote.scenario(steps=[do.gather(steps)]) as sc:
        recvs = {(tag, i): asyncio.ensure_future(sc.peer.recv_tensor(tag))
                 for tag in reversed(tags) for i in range(per_tag)}
        got = {k: await f for k, f in recvs.items()}
        (sent,) = await sc.result()
    assert all(o["ok"] for o in sent)
    for tag, i, large in plan:
        assert same_bytes(got[tag, i], make_tensor(msg_spec(tag, i, large))), f"tag {tag} message {i}"


async def test_sequential_sends_keep_order(remote: Remote) -> None:
    """Sends issued one after the other (each awaited) on two tags, mixed paths, are received by
    receives posted all at once, tag 6's before tag 5's: each tag's messages in send order."""
    plan = [(t, i, i % 3 == 0) for i in range(4) for t in (5, 6)]
    steps = [do.send(tag, msg_spec(tag, i, large)) for tag, i, large in plan]
    async with remote.scenario(steps=steps) as sc:
        order = sorted(plan, key=lambda p: -p[0])
        tasks = [asyncio.ensure_future(sc.peer.recv_tensor(tag)) for tag, _, _ in order]
        got = await asyncio.wait_for(asyncio.gather(*tasks), 60)
        sent = await sc.result()
    assert all(o["ok"] for o in sent)
    for t, (tag, i, large) in zip(got, order, strict=True):
        assert same_bytes(t, make_tensor(msg_spec(tag, i, large))), f"tag {tag} message {i}"


async def test_tag_independence(remote: Remote) -> None:
    """A recv pending on one tag is not satisfied by messages on other tags, and a message waiting on
    another tag does not block it."""
    a, b = u8(300, seed=1), u8(200 * KiB, seed=2)
    steps = [do.gather([do.send(2, b), do.send(3, a)], posted="posted"), do.wait("go"), do.send(1, a)]
    async with remote.scenario(steps=steps) as sc:
        pending = asyncio.ensure_future(sc.peer.recv_tensor(1))
        await sc.event("posted")
        assert await wait_until(lambda: sc.peer.probe(2) and sc.peer.probe(3), 10)
        await asyncio.sleep(0.2)
        assert not pending.done(), "a recv on tag 1 completed with a message of another tag"
        assert not sc.peer.probe(1)
        assert same_bytes(await sc.peer.recv_tensor(3), make_tensor(a))
        assert same_bytes(await sc.peer.recv_tensor(2), make_tensor(b))
        assert not pending.done()
        sc.tell("go")
        assert same_bytes(await asyncio.wait_for(pending, 30), make_tensor(a))
        res = await sc.result()
    assert all(o["ok"] for o in res[0]) and res[2]["ok"]


@pytest.mark.parametrize("tag", [0, 2**31 - 1, -5, 2**40])
async def test_tag_values(remote: Remote, tag: int) -> None:
    """Any int tag works, including 0, negative and large ones, and is not confused with others."""
    sp = u8(100, seed=3)
    steps = [do.send(tag + 1, u8(7, seed=4)), do.send(tag, sp)]
    async with remote.scenario(steps=[do.gather(steps)]) as sc:
        assert same_bytes(await sc.peer.recv_tensor(tag), make_tensor(sp))
        assert same_bytes(await sc.peer.recv_tensor(tag + 1), make_tensor(u8(7, seed=4)))
        await sc.result()


async def test_unexpected_messages(remote: Remote) -> None:
    """Messages that arrive before any recv is posted wait (eager payloads buffered, rendezvous ones
    as a request only); probe() sees them; each send completes only once received; later receives
    find them in order with their bytes intact."""
    msgs = [msg_spec(9, i, large=i % 2 == 1) for i in range(8)]
    async with remote.scenario(steps=[do.gather([do.send(9, m) for m in msgs], posted="posted"),
                                      do.emit("all sent")]) as sc:
        await sc.event("posted")
        await asyncio.wait_for(sc.peer.wait_incoming(9), 30)
        assert sc.peer.probe(9)
        assert not sc.peer.probe(8)
        await asyncio.sleep(0.3)  # every message has arrived by now; none may be considered received
        await sc.no_event("all sent", 0.2)  # no send completed: none was received yet
        for i, m in enumerate(msgs):
            dest = dest_for(m)
            assert await sc.peer.recv(dest, 9) is dest
            assert same_bytes(dest, make_tensor(m)), f"unexpected message {i}"
        assert not sc.peer.probe(9)
        await sc.event("all sent")
        (sent, _) = await sc.result()
    assert all(o["ok"] for o in sent)


async def test_recv_posted_before_send(remote: Remote) -> None:
    """The other order: receives wait for messages that are sent later."""
    msgs = [msg_spec(4, i, large=i % 2 == 0) for i in range(6)]
    async with remote.scenario(steps=[do.wait("go"), *[do.send(4, m) for m in msgs]]) as sc:
        tasks = [asyncio.ensure_future(sc.peer.recv_tensor(4)) for _ in msgs]
        await asyncio.sleep(0.1)
        assert not any(t.done() for t in tasks)
        sc.tell("go")
        got = await asyncio.wait_for(asyncio.gather(*tasks), 60)
        await sc.result()
    for t, m in zip(got, msgs, strict=True):
        assert same_bytes(t, make_tensor(m))


def _ops(n: int, seed0: int) -> list[tuple[int, dict[str, object]]]:
    """``n`` messages over 8 tags; every fourth one large (rendezvous)."""
    return [(i % 8, u8((LARGE if i % 4 == 3 else SMALL) + i, seed=seed0 + i)) for i in range(n)]


def exchange_steps(n: int, seed: int) -> list[dict[str, object]]:
    """The remote's half of a both-ways exchange: on "go", post ``n`` receives (for what we send)
    and ``n`` sends at once."""
    ours, theirs = _ops(n, seed), _ops(n, seed + 50_000)
    return [do.wait("go"),
            do.gather([*(do.recv(tag, sp) for tag, sp in ours), *(do.send(tag, sp) for tag, sp in theirs)],
                      posted="posted")]


async def drive_exchange(sc: Scenario, n: int, seed: int) -> None:
    """Our half of :func:`exchange_steps`: ``n`` receives posted first (asserted pending), then the
    remote is told to post its ``n`` receives and ``n`` sends, then we post our ``n`` sends."""
    ours, theirs = _ops(n, seed), _ops(n, seed + 50_000)
    dests = [dest_for(sp) for _, sp in theirs]
    recvs = [asyncio.ensure_future(sc.peer.recv(d, tag)) for d, (tag, _) in zip(dests, theirs, strict=True)]
    await asyncio.sleep(0.05)
    assert not any(r.done() for r in recvs), "a recv completed before anything was sent"
    sc.tell("go")
    assert await sc.event("posted") == 2 * n
    sends = [asyncio.ensure_future(sc.peer.send(make_tensor(sp), tag)) for tag, sp in ours]
    await asyncio.sleep(0)
    in_flight = sum(not f.done() for f in recvs + sends)
    assert in_flight >= n, f"only {in_flight} operations in flight"
    await asyncio.wait_for(asyncio.gather(*recvs, *sends), 120)
    for i, (d, (_, sp)) in enumerate(zip(dests, theirs, strict=True)):
        assert same_bytes(d, make_tensor(sp)), f"message {i} from the remote"
    (_, outs) = await sc.result(120)
    assert len(outs) == 2 * n
    bad = [i for i, o in enumerate(outs) if not o["ok"] or (i < n and not o["match"])]
    assert not bad, f"remote operations failed or got wrong bytes: {bad[:10]} {outs[bad[0]]!r:.300}"


async def test_256_in_flight_one_peer(remote: Remote) -> None:
    """256 receives + 256 sends in flight on each side of one peer (1024 operations), mixed eager and
    rendezvous over 8 tags."""
    n = 256
    async with remote.scenario(steps=exchange_steps(n, seed=1)) as sc:
        await drive_exchange(sc, n, seed=1)


async def test_in_flight_across_4_peers(spawn_remotes: Callable[[int], list[Remote]]) -> None:
    """Four peers, each a separate process, 128 receives + 128 sends in flight on each side of each
    (512 operations in flight in this process at once)."""
    n = 128
    remotes = spawn_remotes(4)
    async with contextlib.AsyncExitStack() as stack:
        scs = [await stack.enter_async_context(r.scenario(steps=exchange_steps(n, seed=10_000 * k)))
               for k, r in enumerate(remotes)]
        assert len({sc.peer.remote_info.get("pid") for sc in scs}) == 4
        await asyncio.gather(*(drive_exchange(sc, n, seed=10_000 * k) for k, sc in enumerate(scs)))


async def test_same_tag_many_concurrent_receivers_get_fifo(remote: Remote) -> None:
    """300 receives posted at once on a single tag take the 300 messages in send order."""
    n = 300
    msgs = [u8(SMALL if i % 5 else LARGE, seed=7000 + i) for i in range(n)]
    async with remote.scenario(steps=[do.wait("go"), do.gather([do.send(11, m) for m in msgs])]) as sc:
        dests = [dest_for(m) for m in msgs]
        tasks = [asyncio.ensure_future(sc.peer.recv(d, 11)) for d in dests]
        await asyncio.sleep(0)
        sc.tell("go")
        await asyncio.wait_for(asyncio.gather(*tasks), 120)
        (_, sent) = await sc.result()
    assert all(o["ok"] for o in sent)
    wrong = [i for i, (d, m) in enumerate(zip(dests, msgs, strict=True)) if not same_bytes(d, make_tensor(m))]
    assert not wrong, f"messages matched out of order: {wrong[:10]}"


def test_ops_helper_mixes_paths() -> None:
    ops = _ops(8, 0)
    sizes = [torch.Size(sp["shape"]).numel() for _, sp in ops]  # type: ignore[arg-type]
    assert any(s > EAGER_THRESHOLD for s in sizes) and any(s <= EAGER_THRESHOLD for s in sizes)
    assert len({tag for tag, _ in ops}) == 8
