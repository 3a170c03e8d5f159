"""The collector pause during bursts (aiomooncake.gcpause): when it holds, that it always ends, and
that a real burst of messages uses it."""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import Iterator
from typing import Any

import pytest
import torch

import aiomooncake
from aiomooncake import gcpause


@pytest.fixture
def fresh(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Nothing in flight, no hold, the collector on; restored afterwards."""
    was = gc.isenabled()
    gc.enable()
    for name, value in (("_inflight", 0), ("_hold", None), ("_spent", False), ("enabled", True),
                        ("_resume_at", 0.0), ("GAP_S", 0.0)):
        monkeypatch.setattr(gcpause, name, value)
    yield
    (gc.enable if was else gc.disable)()


def test_a_burst_pauses_the_collector_until_nothing_is_in_flight(fresh: None) -> None:
    for _ in range(gcpause.BURST - 1):
        gcpause.begin()
    assert gc.isenabled(), "a few operations must not pause it"
    gcpause.begin()
    assert not gc.isenabled()
    for _ in range(gcpause.BURST - 1):
        gcpause.end()
        assert not gc.isenabled()
    gcpause.end()
    assert gc.isenabled()


def test_a_collector_the_user_disabled_stays_disabled(fresh: None) -> None:
    gc.disable()
    for _ in range(gcpause.BURST):
        gcpause.begin()
    for _ in range(gcpause.BURST):
        gcpause.end()
    assert not gc.isenabled()


def test_a_hold_ends_after_max_hold_even_with_operations_in_flight(
        fresh: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gcpause, "MAX_HOLD_S", 0.05)
    ran_out = gcpause.ran_out
    for _ in range(gcpause.BURST):
        gcpause.begin()
    assert not gc.isenabled()
    deadline = time.monotonic() + 5
    while not gc.isenabled() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert gc.isenabled(), "the watchdog did not end a hold that outlasted MAX_HOLD_S"
    assert gcpause.ran_out == ran_out + 1
    # no new hold while that burst is still in flight, even as more operations join it
    for _ in range(gcpause.BURST):
        gcpause.begin()
    assert gc.isenabled()
    for _ in range(2 * gcpause.BURST):
        gcpause.end()
    for _ in range(gcpause.BURST):  # back to zero: the next burst pauses again
        gcpause.begin()
    assert not gc.isenabled()
    for _ in range(gcpause.BURST):
        gcpause.end()
    assert gc.isenabled()


def test_after_a_hold_ran_out_the_collector_runs_a_while(
        fresh: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """A loop of bursts keeps starting holds; one that ran out is followed by GAP_S of collecting."""
    monkeypatch.setattr(gcpause, "MAX_HOLD_S", 0.05)
    monkeypatch.setattr(gcpause, "GAP_S", 60.0)
    for _ in range(gcpause.BURST):
        gcpause.begin()
    deadline = time.monotonic() + 5
    while not gc.isenabled() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert gc.isenabled()
    for _ in range(gcpause.BURST):
        gcpause.end()
    for _ in range(gcpause.BURST):  # the next burst, at once: no hold yet
        gcpause.begin()
    assert gc.isenabled()
    for _ in range(gcpause.BURST):
        gcpause.end()


def test_switched_off_it_never_pauses(fresh: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gcpause, "enabled", False)
    for _ in range(2 * gcpause.BURST):
        gcpause.begin()
    assert gc.isenabled()
    for _ in range(2 * gcpause.BURST):
        gcpause.end()


async def test_a_burst_of_messages_pauses_it_and_leaves_it_on() -> None:
    """64 messages each way at once between two peers (real engine, loopback): a hold starts,
    no collection runs while it is in force, and the collector is on again afterwards."""
    gc.enable()
    ran_during_hold: list[int] = []

    def watch(phase: str, info: dict[str, int]) -> None:
        if phase == "start" and gcpause._hold is not None:
            ran_during_hold.append(info["generation"])

    async with await aiomooncake.listen("127.0.0.1", 0) as lst:
        a = await aiomooncake.connect("127.0.0.1", lst.port)
        b = await asyncio.wait_for(lst.accept(), 30)
        out = [torch.full((1000 + i,), i % 251, dtype=torch.uint8) for i in range(64)]
        got = [torch.empty_like(x) for x in out]
        before = gcpause.holds
        gc.callbacks.append(watch)
        try:
            await asyncio.wait_for(asyncio.gather(*(a.send(x, tag=1) for x in out),
                                                  *(b.recv(x, tag=1) for x in got)), 60)
            await asyncio.sleep(0.01)  # the completion callbacks run
        finally:
            gc.callbacks.remove(watch)
        assert all(torch.equal(x, y) for x, y in zip(out, got, strict=True))
        assert gcpause.holds > before
        assert gc.isenabled() and gcpause._hold is None
        assert not ran_during_hold
        await a.close()
        await b.close()


async def test_every_operation_ends_once_and_leaves_no_count() -> None:
    """``on_end`` runs exactly once for each operation, however it ends (completed, eager or not;
    refused; withdrawn unmatched; a send withdrawn before its receiver answered), with its future
    done by then; and the collector's in-flight count is back to zero afterwards (a leaked count
    would keep every later hold from starting)."""
    ended: dict[int, int] = {}
    seen_done: list[bool] = []

    def on_end(p: Any) -> None:
        ended[id(p)] = ended.get(id(p), 0) + 1
        seen_done.append(p.future.done())

    async with await aiomooncake.listen("127.0.0.1", 0) as lst:
        a = await aiomooncake.connect("127.0.0.1", lst.port)
        b = await asyncio.wait_for(lst.accept(), 30)
        before = gcpause._inflight
        sizes = [8, 100_000, 3000, 300_000] * 4
        out = [torch.full((n,), i % 251, dtype=torch.uint8) for i, n in enumerate(sizes)]
        got = [torch.empty_like(x) for x in out]
        handles: list[Any] = [a.post_send(x, tag=1, on_end=on_end) for x in out]
        handles += [b.post_recv(y, tag=1, on_end=on_end) for y in got]
        # refused: the size differs (both ends fail)
        handles.append(a.post_send(torch.zeros(64, dtype=torch.uint8), tag=2, on_end=on_end))
        handles.append(b.post_recv(torch.zeros(65, dtype=torch.uint8), tag=2, on_end=on_end))
        # withdrawn: a receive nobody sends to, and a send nobody receives
        lonely_recv = b.post_recv(torch.zeros(300_000, dtype=torch.uint8), tag=3, on_end=on_end)
        lonely_send = a.post_send(torch.zeros(300_000, dtype=torch.uint8), tag=4, on_end=on_end)
        handles += [lonely_recv, lonely_send]
        await asyncio.wait([h.future for h in handles[:-2]], timeout=60)
        assert all(torch.equal(x, y) for x, y in zip(out, got, strict=True))
        await lonely_recv.cancel()
        lonely_send.withdraw()
        for _ in range(50):
            if len(ended) == len(handles):
                break
            await asyncio.sleep(0.01)
        assert sorted(ended.values()) == [1] * len(handles), "every operation ends exactly once"
        assert all(seen_done)
        assert gcpause._inflight == before
        await a.close()
        await b.close()
