"""Faults between real processes, the CI-sized runs (the full figures are in docs/reliability.md).

* ``tests/tools/stress_kill.py``, a handful of trials: kill -9 the receiver and the sender mid-transfer,
  freeze a sender; the survivor fails the pending operation with PeerClosed in time, nothing lands
  in its buffer after a recv failed (dead sender), and it keeps working with its other peer and with
  the restarted one (same port and new port), every round trip checksummed.
* Liveness with the default options: a frozen peer is declared dead within 2 s of its last byte.
* The memory lent to the engine stays alive until the engine has let go, on both sides.
"""

from __future__ import annotations

import asyncio
import collections
import gc
import signal
import time
import weakref
from collections.abc import Callable
from typing import Any

import pytest
import torch
from harness import (
    Remote,
    do,
    load_script,
    make_tensor,
    regions_in_flight,
    spec,
    wait_until,
    writes_submitted,
)

import aiomooncake
from aiomooncake import peer as peer_mod
from aiomooncake.peer import quarantine

DEFAULT = aiomooncake.Options()


stress = load_script("stress_kill")


@pytest.mark.parametrize(("host_transport", "trials"), [("auto", 2), ("te", 1)])
def test_stress_kill_small(tmp_path: Any, host_transport: str, trials: int) -> None:
    """A trial or two of each kind, with the default liveness options."""
    args = stress.parse_args(["--trials", str(trials), "--kinds", "receiver,sender,hang", "--size", "32",
                              "--echoes", "8", "--log-dir", str(tmp_path),
                              "--options", f'{{"host_transport": "{host_transport}"}}'])
    result = aiomooncake.run(stress.run(args))
    summary = result["summary"]
    for kind, s in summary.items():
        assert s["failed_trials"] == 0, (kind, [t["problems"] for t in result["trials"] if t["problems"]])
        assert s["hangs"] == 0
        assert s["missed"] < s["trials"], f"{kind}: no kill landed mid-transfer"
        # "none": the receive finished with every byte right (the same-host path pulls the bytes
        # itself, which works from a stopped sender and can beat a dying one)
        assert set(s["errors"]) <= {"PeerClosed", "none"}, (kind, s["errors"])
        assert s["errors"].get("none", 0) == s["completed"], s
        if host_transport == "te" or kind == "receiver":
            assert s["completed"] == 0, s
        assert s["bystander_corrupted_or_lost"] == 0 and s["restart_corrupted_or_lost"] == 0
        assert s["bystander_roundtrips"] > 0 and s["restart_roundtrips"] > 0
    assert summary["receiver"]["detect_s"]["max"] < 1.0
    sender = summary["sender"]
    # On the same-host path every sender trial may end with the receiver having pulled every byte
    # before the kill took (asserted whole above): then there is no detection to time.
    if sender["completed"] < sender["trials"] - sender["missed"]:
        assert sender["detect_s"]["max"] < 1.0
    else:
        assert host_transport == "auto"
    assert sender["late_bytes"] == 0
    # a frozen peer: within the 2 s heartbeat timeout of its last byte (+ scheduling on a busy box);
    # on the same-host path the receiver pulls from the frozen sender and needs no detection
    hang = summary["hang"]
    if hang["completed"] < hang["trials"] - hang["missed"]:
        assert hang["detect_s"]["min"] >= 1.0
        assert hang["detect_s"]["max"] <= DEFAULT.heartbeat_timeout + 0.5
    else:
        assert host_transport == "auto"


async def test_frozen_peer_detected_within_the_default_timeout(
        spawn_remotes: Callable[[int], list[Remote]]) -> None:
    """Default options: every pending operation on a frozen peer fails with PeerClosed about
    heartbeat_timeout (2 s) after the freeze, not heartbeat_timeout + heartbeat_interval."""
    assert DEFAULT.heartbeat_timeout <= 2.0  # the bound
    (r,) = spawn_remotes(1)
    async with r.scenario(steps=[do.emit("ready"), do.wait("never")]) as sc:
        await sc.event("ready")
        peer = sc.peer
        ops = [asyncio.ensure_future(peer.recv(torch.empty(1 << 20, dtype=torch.uint8), 1)),
               asyncio.ensure_future(peer.recv_tensor(2)),
               asyncio.ensure_future(peer.send(torch.ones(1 << 20, dtype=torch.uint8), 3)),
               asyncio.ensure_future(peer.send(torch.ones(16), 4))]
        await asyncio.sleep(0.3)
        t0 = time.monotonic()
        r.kill(signal.SIGSTOP)
        try:
            outs = await asyncio.wait_for(asyncio.gather(*ops, return_exceptions=True), 10)
            elapsed = time.monotonic() - t0
        finally:
            r.kill(signal.SIGKILL)
        assert all(isinstance(o, aiomooncake.PeerClosed) for o in outs), outs
        assert "no heartbeat" in str(outs[0])
        assert DEFAULT.heartbeat_timeout - DEFAULT.heartbeat_interval <= elapsed
        assert elapsed <= DEFAULT.heartbeat_timeout + 0.3, elapsed


async def test_source_stays_alive_while_the_engine_writes_from_it(
        spawn_remotes: Callable[[int], list[Remote]]) -> None:
    """The receiver freezes mid-transfer: our send fails with PeerClosed while the engine still has
    a write from our tensor in flight. Dropping every reference of ours must not free that memory
    until the engine lets go (here: once the receiver is killed and the write fails)."""
    (r,) = spawn_remotes(1)
    n = 256 << 20
    big = spec(torch.uint8, (n,), fill=0x11)
    opts = {"heartbeat_interval": 0.2, "heartbeat_timeout": 1.0, "chunk_bytes": 1 << 20, "window": 2,
            "host_transport": "te", "cancel_timeout": 20.0}
    async with r.scenario(steps=[do.recv(4, big)], options=opts) as sc:
        src = make_tensor(big)
        alive = weakref.ref(src)
        w0, base = writes_submitted(), regions_in_flight()
        sends = [asyncio.ensure_future(sc.peer.send(src, 4))]
        assert await wait_until(lambda: writes_submitted() - w0 >= 4 or sends[0].done(), 30)
        assert not sends[0].done(), "the transfer finished before the freeze: make it slower"
        r.kill(signal.SIGSTOP)
        try:
            with pytest.raises(aiomooncake.PeerClosed):
                await asyncio.wait_for(sends[0], 10)
            sends.clear()  # the failed task's traceback holds the send's frame, and so the tensor
            del src
            gc.collect()
            assert regions_in_flight() > base, "the stalled engine write should still be in flight"
            assert alive() is not None, "the source was freed while the engine was still reading it"
        finally:
            r.kill(signal.SIGKILL)
        assert await wait_until(lambda: regions_in_flight() <= base, 20), "the engine never let go"
        gc.collect()
        assert await wait_until(lambda: alive() is None, 5), "the source is never freed afterwards"


async def test_receive_memory_is_quarantined_when_the_sender_dies(
        spawn_remotes: Callable[[int], list[Remote]], monkeypatch: pytest.MonkeyPatch) -> None:
    """The sender dies while its engine writes into our recv_tensor's memory: the recv fails with
    PeerClosed at once, but that memory (allocated by the library) stays allocated and registered
    for Peer.quarantine_s, so a late write can never land in memory handed out again."""
    monkeypatch.setattr(peer_mod.Peer, "quarantine_s", 3.0)
    monkeypatch.setattr(quarantine, "_held", collections.deque())  # earlier tests' entries: later
    (r,) = spawn_remotes(1)
    big = spec(torch.uint8, (128 << 20,), fill=0x22)
    opts = {"chunk_bytes": 4096, "window": 1, "host_transport": "te"}
    q0 = peer_mod.quarantined_bytes()
    async with r.scenario(steps=[do.send(5, big)], options=opts) as sc:
        base = regions_in_flight()
        recv = asyncio.ensure_future(sc.peer.recv_tensor(5))
        assert await wait_until(lambda: regions_in_flight() > base or recv.done(), 30)
        await asyncio.sleep(0.2)  # bytes are landing
        assert not recv.done()
        r.kill(signal.SIGKILL)
        with pytest.raises(aiomooncake.PeerClosed):
            await asyncio.wait_for(recv, 5)
        assert peer_mod.quarantined_bytes() - q0 == 128 << 20
        assert regions_in_flight() > base, "the memory was unregistered while a write may land"
        await asyncio.sleep(3.2)
    # expired: released when the next peer is created or closed (here: this scenario's close).
    # Earlier tests' quarantines may expire at the same moment, so the total can fall below q0.
    assert peer_mod.quarantined_bytes() <= q0
    assert regions_in_flight() <= base


async def test_failed_engine_write_to_a_live_peer_is_retried(monkeypatch: pytest.MonkeyPatch) -> None:
    """An engine write that fails while the peer answers (e.g. the engine reused a pooled connection
    to a dead process whose port a restarted peer now holds) is written again, up to one attempt
    per pooled connection; if every attempt fails, the send fails with TransferFailed (not
    PeerClosed: the peer is alive) and the peer stays usable."""
    from aiomooncake.errors import TransferFailed
    from aiomooncake.planes.te import TeJob, TePlane

    real = TePlane.write
    failures = [1]

    def flaky(self: TePlane, target: Any, pieces: Any, window: int, lane: int = -1) -> TeJob:
        if failures[0] > 0:
            failures[0] -= 1
            job = TeJob(self, target, list(pieces), window, lane)
            job.future.set_exception(TransferFailed("simulated: the engine reported status -1"))
            return job
        return real(self, target, pieces, window, lane)

    monkeypatch.setattr(TePlane, "write", flaky)
    lst = await aiomooncake.listen("127.0.0.1", 0, host_transport="te")
    a = await aiomooncake.connect("127.0.0.1", lst.port, host_transport="te")
    b = await asyncio.wait_for(lst.accept(), 10)
    await lst.close()
    async with a, b:
        src = torch.randint(0, 256, (1 << 20,), dtype=torch.uint8)
        got, _ = await asyncio.wait_for(asyncio.gather(b.recv_tensor(1), a.send(src, 1)), 30)
        assert torch.equal(got, src) and failures[0] == 0
        failures[0] = 3  # stale connections to go through: still delivered
        got, _ = await asyncio.wait_for(asyncio.gather(b.recv_tensor(4), a.send(src, 4)), 30)
        assert torch.equal(got, src) and failures[0] == 0
        failures[0] = 1 + peer_mod.peer._WRITE_RETRIES  # fails on every retry: a real data-plane failure
        outs = await asyncio.wait_for(asyncio.gather(b.recv_tensor(2), a.send(src, 2),
                                                     return_exceptions=True), 30)
        assert isinstance(outs[1], TransferFailed) and not isinstance(outs[1], aiomooncake.PeerClosed)
        assert isinstance(outs[0], TransferFailed), outs[0]
        assert failures[0] == 0 and not a.closed
        got, _ = await asyncio.wait_for(asyncio.gather(b.recv_tensor(3), a.send(src, 3)), 30)
        assert torch.equal(got, src)


async def test_a_segment_name_taken_over_by_a_restarted_peer_is_refreshed(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A restarted peer's engine may get the RPC port (hence the segment name) of a dead one; the
    engine's cached descriptor of that name (dead data port, dead buffers) must then be re-fetched,
    or every write to the new peer fails ('TCP lane connection to ... refused', seen in the engine
    stress run). The first link to a name, and a new link from the same process, refresh nothing."""
    from aiomooncake.planes import negotiate
    from aiomooncake.planes.base import DataPlane

    calls: list[object] = []
    monkeypatch.setattr(negotiate, "_segment_owners", {})

    class FakePlane(DataPlane):
        kind = "tcp"

        async def refresh_remote(self, segment: str) -> bool:
            calls.append(segment)
            return True

    def links(seg: str) -> dict[str, Any]:
        return {"cpu": negotiate.Link("cpu", "tcp", FakePlane(), seg)}

    a, b = {"host_id": "h", "pid": 10}, {"host_id": "h", "pid": 11}
    await negotiate._forget_stale_segments(links("127.0.0.1:15001"), a)
    await negotiate._forget_stale_segments(links("127.0.0.1:15001"), a)  # same process again
    await negotiate._forget_stale_segments(links("127.0.0.1:15002"), b)  # another name
    assert calls == []
    await negotiate._forget_stale_segments(links("127.0.0.1:15001"), b)  # taken over
    assert calls == ["127.0.0.1:15001"]
