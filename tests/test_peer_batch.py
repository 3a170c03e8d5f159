"""``Peer.batch()``: operations posted together (no task each, one write for a turn's frames),
matched exactly like separate sends and receives, and withdrawn together on failure, timeout,
an exception in the block, or cancellation. The other peer is a separate process (real TE)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
from harness import (
    EAGER_THRESHOLD,
    KiB,
    Remote,
    dest_for,
    do,
    make_tensor,
    same_bytes,
    u8,
    untouched,
    wait_until,
)

import aiomooncake
from aiomooncake.errors import ConfigurationError, MessageMismatch, Timeout
from aiomooncake.transport.framing import FrameDecoder

SMALL = 1 * KiB
LARGE = 96 * KiB
assert SMALL <= EAGER_THRESHOLD < LARGE


def spec_of(tag: int, i: int) -> dict[str, Any]:
    return u8((LARGE if (tag + i) % 2 else SMALL) + 8 * i + tag, seed=100 * tag + i)


async def test_batch_exchanges_both_ways_in_tag_order(remote: Remote) -> None:
    """A batch of sends and receives on three tags (eager and rendezvous mixed) against a remote
    that sends and receives the same messages concurrently: every byte lands in the receive the
    same plain calls would have matched (the k-th recv of a tag gets the k-th message)."""
    plan = [(tag, i) for i in range(5) for tag in (1, 2, 3)]
    theirs = [do.send(tag, spec_of(tag, i)) for tag, i in plan]
    ours = [do.recv(tag + 10, spec_of(tag + 10, i)) for tag, i in plan]
    async with remote.scenario(steps=[do.gather(theirs + ours)]) as sc:
        dests = {(tag, i): dest_for(spec_of(tag, i)) for tag, i in plan}
        async with sc.peer.batch() as b:
            for tag, i in plan:
                b.send(make_tensor(spec_of(tag + 10, i)), tag + 10)
            order = sorted(dests, key=lambda k: (-k[0], k[1]))  # tags in reverse, each in order
            futs = {k: b.recv(dests[k], k[0]) for k in order}
            assert len(b) == 2 * len(plan)
        assert all(f.done() and f.result() is dests[k] for k, f in futs.items())
        (outcomes,) = await sc.result()
    assert all(o["ok"] for o in outcomes)
    assert all(o["match"] for o in outcomes[len(plan):]), "the remote got wrong bytes"
    for tag, i in plan:  # the i-th receive of a tag got the i-th message sent on it
        assert same_bytes(dests[tag, i], make_tensor(spec_of(tag, i))), f"tag {tag}, receive {i}"


@contextmanager
def counting_writes(peer: aiomooncake.Peer) -> Iterator[list[int]]:
    """The messages each socket write of ``peer`` carries (BATCH frames carry several), while the
    block runs."""
    transport = peer._conn._transport
    assert transport is not None
    writes: list[int] = []
    real = transport.writelines

    def counting(list_of_data: Iterable[bytes | bytearray | memoryview]) -> None:
        parts = list(list_of_data)
        writes.append(len(FrameDecoder(1 << 30).feed(b"".join(parts))))
        real(parts)
    transport.writelines = counting  # type: ignore[method-assign]
    try:
        yield writes
    finally:
        transport.writelines = real  # type: ignore[method-assign]


async def test_batch_frames_leave_in_one_write(remote: Remote) -> None:
    """The RTS frames of 20 rendezvous sends posted in one batch go out in one socket write."""
    specs = [u8(LARGE + i, seed=i) for i in range(20)]
    async with remote.scenario(steps=[do.wait("go"), do.gather([do.recv(7, sp) for sp in specs])]) as sc:
        with counting_writes(sc.peer) as writes:
            b = sc.peer.batch()
            futs = [b.send(make_tensor(sp), 7) for sp in specs]
            assert writes == [], "a batch's frames must wait for the end of the loop turn"
            await asyncio.sleep(0)
            await asyncio.sleep(0)
            assert writes and writes[0] >= len(specs), f"the RTS frames went out in {writes} writes"
            sc.tell("go")
            await b.wait()
            assert all(f.done() and f.exception() is None for f in futs)
        (outcomes,) = (await sc.result())[1:]
    assert all(o["ok"] and o["match"] for o in outcomes)


async def test_a_long_batch_sends_its_head_first(remote: Remote, monkeypatch: pytest.MonkeyPatch) -> None:
    """Held frames leave once ``tuning.CORK_FRAMES`` are queued: the remote starts on the head of a
    long batch while its tail is still being posted; the rest leaves at the end of the turn."""
    monkeypatch.setattr(aiomooncake.tuning, "CORK_FRAMES", 8)
    specs = [u8(LARGE + i, seed=i) for i in range(20)]
    async with remote.scenario(steps=[do.gather([do.recv(7, sp) for sp in specs])]) as sc:
        with counting_writes(sc.peer) as writes:
            b = sc.peer.batch()
            futs = [b.send(make_tensor(sp), 7) for sp in specs]
            assert writes == [8, 8], f"the head of the batch went out in {writes} writes"
            await b.wait()
            assert sum(writes[:3]) == len(specs) and writes[2] == 4, writes
            assert all(f.done() and f.exception() is None for f in futs)
        (outcomes,) = await sc.result()
    assert all(o["ok"] and o["match"] for o in outcomes)


async def test_first_failure_withdraws_the_rest(remote: Remote) -> None:
    """One receive refuses its message (size differs); the batch raises that error at once instead
    of waiting for receives nobody will ever match, which are withdrawn (nothing pending, untouched)."""
    async with remote.scenario(steps=[do.send(3, u8(LARGE))]) as sc:
        wrong = torch.full((LARGE + 1,), 0xA5, dtype=torch.uint8)
        never = [torch.full((LARGE,), 0xA5, dtype=torch.uint8) for _ in range(4)]
        with pytest.raises(MessageMismatch):
            async with sc.peer.batch() as b:
                b.recv(wrong, 3)
                for t in never:
                    b.recv(t, 99)
        assert sc.peer.pending == 0
        assert all(untouched(t) for t in never) and untouched(wrong)
        (sent,) = await sc.result()
    assert not sent["ok"]


async def test_timeout_and_exceptions_withdraw(remote: Remote) -> None:
    """``timeout=`` raises Timeout and withdraws everything; so does an exception raised in the block
    (it propagates) and a cancellation of the waiting task; a finished batch takes no more posts."""
    async with remote.scenario(steps=[do.wait("end")]) as sc:
        peer = sc.peer
        bufs = [torch.full((LARGE,), 0xA5, dtype=torch.uint8) for _ in range(3)]
        with pytest.raises(Timeout):
            async with peer.batch(timeout=0.2) as b:
                for t in bufs:
                    b.recv(t, 5)
                b.send(make_tensor(u8(LARGE)), 6)  # its RTS waits unmatched at the remote
        assert peer.pending == 0

        with pytest.raises(KeyError):
            async with peer.batch() as b:
                b.recv(bufs[0], 5)
                raise KeyError("in the block")
        assert peer.pending == 0

        async def forever() -> None:
            async with peer.batch() as b:
                b.recv(bufs[1], 5)
                b.send(make_tensor(u8(SMALL)), 6)
        task = asyncio.ensure_future(forever())
        assert await wait_until(lambda: peer.pending == 2, 5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert peer.pending == 0
        assert all(untouched(t) for t in bufs)
        with pytest.raises(ConfigurationError):
            b.recv(bufs[2], 5)
        sc.tell("end")
        await sc.result()


async def test_batch_recv_tensor_and_plain_calls_share_the_order(remote: Remote) -> None:
    """Batch receives and plain ``recv_tensor`` calls on one tag match in posting order."""
    specs = [spec_of(4, i) for i in range(6)]
    async with remote.scenario(steps=[do.send(4, sp) for sp in specs]) as sc:
        peer: aiomooncake.Peer = sc.peer
        first = asyncio.ensure_future(peer.recv_tensor(4))
        await asyncio.sleep(0)
        async with peer.batch() as b:
            middle = [b.recv_tensor(4) for _ in range(4)]
        last = await peer.recv_tensor(4)
        got = [await first] + [f.result() for f in middle] + [last]
        await sc.result()
    assert all(same_bytes(g, make_tensor(sp)) for g, sp in zip(got, specs, strict=True))



async def test_a_plain_post_after_burst_posts_keeps_call_order(remote: Remote) -> None:
    """Burst posts and a plain post in the same turn (``post_send`` without ``burst``, whose frame
    leaves at once, with the held ones before it): the k-th message of a tag is still the k-th
    posted, and a bad argument to a burst post raises at the call."""
    specs = [u8(LARGE + 8 * i, seed=i) for i in range(4)]
    async with remote.scenario(steps=[do.gather([do.recv(9, sp) for sp in specs])]) as sc:
        posted = [sc.peer.post_send(make_tensor(sp), 9, burst=True) for sp in specs[:3]]
        with pytest.raises(ConfigurationError):
            sc.peer.post_send(make_tensor(specs[0]), -(2**70), burst=True)
        with pytest.raises(ConfigurationError):
            sc.peer.post_recv(torch.empty(3).expand(4, 3), 9, burst=True)  # not writable
        posted.append(sc.peer.post_send(make_tensor(specs[3]), 9))  # plain: after the queued three
        for p in posted:
            await p
        (outcomes,) = await sc.result()
    assert all(o["ok"] and o["match"] for o in outcomes), "a message overtook an earlier one"
