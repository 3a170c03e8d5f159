"""API misuse gives clear errors, at the call, and leaves the peer usable: destinations that must not
be written (immutable bytes, read-only mappings, overlapping elements), too-small destinations,
tensors of the wrong kind or device, operations on a closed peer, and concurrent closes.

Both peers live in this process (one event loop): misuse is caught before anything crosses."""

from __future__ import annotations

import asyncio
import mmap
import os
import random
import tempfile
import warnings
from collections.abc import AsyncIterator
from typing import Any

import pytest
import torch
from harness import wait_until

import aiomooncake
from aiomooncake.peer import writable as peer_mod
from aiomooncake.peer.writable import unwritable as _unwritable

HOST = "127.0.0.1"
Pair = tuple[aiomooncake.Peer, aiomooncake.Peer]
SMALL, LARGE = 256, 1 << 20  # eager, rendezvous


@pytest.fixture
async def pair() -> AsyncIterator[Pair]:
    lst = await aiomooncake.listen(HOST, 0)
    a = await aiomooncake.connect(HOST, lst.port)
    b = await asyncio.wait_for(lst.accept(), 10)
    await lst.close()
    yield a, b
    await a.close()
    await b.close()


def frombuffer(buf: object) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "The given buffer is not writable"
        return torch.frombuffer(buf, dtype=torch.uint8)


async def still_works(a: aiomooncake.Peer, b: aiomooncake.Peer, tag: int = 99) -> None:
    for n in (SMALL, LARGE):
        src = torch.randint(0, 256, (n,), dtype=torch.uint8)
        dest = torch.zeros(n, dtype=torch.uint8)
        await asyncio.wait_for(asyncio.gather(a.send(src, tag), b.recv(dest, tag)), 30)
        assert torch.equal(src, dest)


async def test_closing_the_listener_leaves_accepted_peers_working(pair: Pair) -> None:
    """The fixture closed its listener with a peer accepted and open: that returned (Python 3.12's
    Server.wait_closed would wait for the peer), and the peer still works."""
    lst = await aiomooncake.listen(HOST, 0)
    c = await aiomooncake.connect(HOST, lst.port)
    d = await asyncio.wait_for(lst.accept(), 10)
    await asyncio.wait_for(lst.close(), 5)
    try:
        await still_works(c, d)
        await still_works(*pair)
    finally:
        await c.close()
        await d.close()


# ------------------------------------------------------------------------ unwritable destinations
async def test_recv_into_immutable_bytes_is_refused(pair: Pair) -> None:
    a, b = pair
    for n in (SMALL, LARGE):
        frozen = bytes(range(256)) * (n // 256)
        snapshot = bytes(frozen)  # a copy to compare with
        with pytest.raises(aiomooncake.ConfigurationError, match="immutable Python bytes"):
            await asyncio.wait_for(b.recv(frombuffer(frozen), 1), 10)
        # also at an offset into the object
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            inner = torch.frombuffer(frozen, dtype=torch.uint8, offset=64, count=64)
        with pytest.raises(aiomooncake.ConfigurationError, match="immutable"):
            await asyncio.wait_for(b.recv(inner, 1), 10)
        # the message is still there for a proper recv, and the bytes object never changed
        src = torch.full((n,), 7, dtype=torch.uint8)
        dest = torch.empty(n, dtype=torch.uint8)
        await asyncio.wait_for(asyncio.gather(a.send(src, 1), b.recv(dest, 1)), 30)
        assert torch.equal(dest, src) and frozen == snapshot
    await still_works(a, b)


async def test_recv_into_read_only_mapping_is_refused(pair: Pair) -> None:
    a, b = pair
    with tempfile.NamedTemporaryFile() as f:
        f.write(b"\0" * (2 * mmap.PAGESIZE))
        f.flush()
        fd = os.open(f.name, os.O_RDONLY)
        try:
            mm = mmap.mmap(fd, 2 * mmap.PAGESIZE, prot=mmap.PROT_READ)
            t = frombuffer(mm)
            with pytest.raises(aiomooncake.ConfigurationError, match="read-only"):
                await asyncio.wait_for(b.recv(t, 2), 10)  # writing there would have been a SIGSEGV
            del t
            mm.close()
        finally:
            os.close(fd)
    await still_works(a, b)


async def test_recv_into_overlapping_elements_is_refused(pair: Pair) -> None:
    a, b = pair
    expanded = torch.zeros(1, dtype=torch.float32).expand(64)
    with pytest.raises(aiomooncake.ConfigurationError, match="share memory"):
        await asyncio.wait_for(b.recv(expanded, 3), 10)
    await still_works(a, b)


def test_writable_tensors_pass_the_check() -> None:
    """No false alarms: torch allocations, bytearray-backed, views, numpy, empty tensors."""
    import numpy as np

    ok = [torch.empty(100), torch.empty(3, 1 << 20)[1], torch.empty(64, 64).t(),
          frombuffer(bytearray(5000)), torch.from_numpy(np.zeros(1000)), torch.empty(0),
          torch.empty((), dtype=torch.float64)]
    for t in ok:
        assert _unwritable(t) is None, t.shape
    # many random small tensors: the bytes-header scan must never match torch's own memory
    keep = [torch.empty(int(n)) for n in torch.randint(1, 4096, (2000,))]
    alarms = [(t.shape, why) for t in keep if (why := _unwritable(t)) is not None]
    assert not alarms, alarms
    # nor memory from outside torch next to freed bytes objects (stale headers left behind)
    rng = random.Random(7)
    for _ in range(10):
        junk = [bytes(rng.randint(100, 20000)) for _ in range(200)]
        del junk[::2]
        outside = [torch.from_numpy(np.zeros(rng.randint(1, 3000))) for _ in range(200)]
        outside += [frombuffer(bytearray(rng.randint(1, 20000))) for _ in range(200)]
        del junk
        outside_alarms = [(t.shape, t.data_ptr(), why) for t in outside
                          if (why := _unwritable(t)) is not None]
        assert not outside_alarms, outside_alarms
    for n in (1, 100, 5000, 100_000):  # while a live bytes object is still seen
        assert _unwritable(frombuffer(bytes(n))) is not None, n


def test_a_stale_bytes_header_before_a_malloc_chunk_is_not_taken_for_a_live_one() -> None:
    """A whole bytes header can linger in freed memory (a growing bytes object's old copy), with
    malloc handing out the memory after it: a buffer that starts a malloc chunk of its own (the
    word before it is a chunk size covering it) is not that old object's payload. The same
    addresses without the size field still read as a bytes payload (the check is not blind)."""
    import ctypes
    import sys

    arena = ctypes.create_string_buffer(16384)
    hdr = (ctypes.addressof(arena) + 4096 + 15) & ~15  # a 16-aligned spot well inside the page
    length = 4000
    word = ctypes.c_uint64
    word.from_address(hdr).value = 1  # refcount
    word.from_address(hdr + 8).value = id(bytes)  # type
    word.from_address(hdr + 16).value = length  # size
    ctypes.c_int64.from_address(hdr + 24).value = -1  # hash, not computed
    ctypes.memset(hdr + 32, 1, length)
    ctypes.c_uint8.from_address(hdr + 32 + length).value = 0  # the NUL after the payload
    base, size = hdr + 32 + 256, 1024
    assert sys.implementation.name != "cpython" or peer_mod._inside_bytes_object(base, size)
    word.from_address(base - 8).value = (size + 16) | 1  # a malloc chunk's size field, in use
    assert not peer_mod._inside_bytes_object(base, size)


def _child_probe_pipe(q: Any) -> None:
    q.put(peer_mod._probe_setup())


def test_a_forked_child_gets_its_own_probe_pipe() -> None:
    """The writability probe reads a byte from a pipe into the probed memory; a forked child that
    shared its parent's pipe could take the parent's byte and write a stray one into a tensor."""
    import multiprocessing as mp

    parent = peer_mod._probe_setup()
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_child_probe_pipe, args=(q,))
    p.start()
    child = q.get(timeout=30)
    p.join(30)
    assert child != parent and peer_mod._probe_setup() == parent
    buf = bytearray(b"x" * 4096)
    t = frombuffer(buf)
    assert _unwritable(t) is None and bytes(buf) == b"x" * 4096  # the probe changed nothing


# ------------------------------------------------------------------------ sizes and kinds
@pytest.mark.parametrize("n", [SMALL, LARGE], ids=["eager", "rendezvous"])
async def test_too_small_destination_fails_both_sides(pair: Pair,
                                                     n: int) -> None:
    a, b = pair
    small = torch.full((n // 2,), 0xA5, dtype=torch.uint8)
    results = await asyncio.wait_for(asyncio.gather(a.send(torch.ones(n, dtype=torch.uint8), 4),
                                                    b.recv(small, 4), return_exceptions=True), 30)
    assert all(isinstance(r, aiomooncake.MessageMismatch) for r in results), results
    assert "size differs" in str(results[1]) and "no byte was written" in str(results[1])
    assert bool((small == 0xA5).all()), "a refused message wrote into the destination"
    await still_works(a, b)


async def test_wrong_kind_of_tensor_is_refused(pair: Pair) -> None:
    a, b = pair
    cases: list[tuple[object, str]] = [
        (torch.empty(4, device="meta"), "meta"),
        (torch.zeros(4, 4).to_sparse(), "sparse|strided"),
        (torch.quantize_per_tensor(torch.ones(4), 0.5, 0, torch.quint8), "quantized"),
        ([1, 2, 3], "torch.Tensor"),
        (b"bytes", "torch.Tensor"),
    ]
    for obj, why in cases:
        with pytest.raises(aiomooncake.ConfigurationError, match=why):
            await asyncio.wait_for(a.send(obj, 5), 10)  # type: ignore[arg-type]
        with pytest.raises(aiomooncake.ConfigurationError, match=why):
            await asyncio.wait_for(b.recv(obj, 5), 10)  # type: ignore[arg-type]
    for bad_tag in (2**63, -(2**63) - 1, 1.5, "7"):
        with pytest.raises(aiomooncake.ConfigurationError, match="tag"):
            await asyncio.wait_for(a.send(torch.ones(3), bad_tag), 10)  # type: ignore[arg-type]
    await still_works(a, b)


# ------------------------------------------------------------------------ closed peers
async def test_operations_on_a_closed_peer_fail_at_once(pair: Pair) -> None:
    a, b = pair
    await a.close()
    for op in (a.send(torch.ones(SMALL), 1), a.send(torch.ones(LARGE), 1),
               a.recv(torch.empty(4), 1), a.recv_tensor(1)):
        with pytest.raises(aiomooncake.PeerClosed, match="closed"):
            await asyncio.wait_for(op, 1)
    # the other side learns it too (as soon as the BYE is read), and fails new operations at once
    assert await wait_until(lambda: b.closed, 10), "the remote never learnt of the close"
    with pytest.raises(aiomooncake.PeerClosed):
        await asyncio.wait_for(b.send(torch.ones(SMALL), 1), 1)
    with pytest.raises(aiomooncake.PeerClosed):
        await asyncio.wait_for(b.wait_incoming(1), 1)


async def test_concurrent_close(pair: Pair) -> None:
    """Many close() calls at once, from both sides, with operations pending in both directions:
    every close returns, every pending operation fails with PeerClosed, nothing else is raised."""
    a, b = pair
    pending = [asyncio.ensure_future(a.send(torch.ones(LARGE, dtype=torch.uint8), 6)),
               asyncio.ensure_future(a.recv(torch.empty(LARGE, dtype=torch.uint8), 7)),
               asyncio.ensure_future(b.recv_tensor(8)),
               asyncio.ensure_future(b.send(torch.ones(SMALL), 9))]
    await asyncio.sleep(0.05)
    closes = [a.close() for _ in range(5)] + [b.close() for _ in range(5)]
    results = await asyncio.wait_for(asyncio.gather(*closes, return_exceptions=True), 30)
    assert results == [None] * 10, results
    outs = await asyncio.wait_for(asyncio.gather(*pending, return_exceptions=True), 10)
    assert all(isinstance(o, aiomooncake.PeerClosed) for o in outs), outs
    assert a.closed and b.closed
    await a.close()  # idempotent afterwards too


async def test_close_while_a_transfer_runs_fails_both_sides_cleanly(
        pair: Pair) -> None:
    """Closing the sending side mid-transfer: its send fails with PeerClosed; the receiver's recv
    fails with PeerClosed too (and no byte lands in its buffer afterwards) unless every byte had
    already arrived, in which case it returns the whole tensor."""
    a, b = pair
    n = 64 << 20
    dest = torch.full((n,), 0xA5, dtype=torch.uint8)
    recv = asyncio.ensure_future(b.recv(dest, 10))
    send = asyncio.ensure_future(a.send(torch.ones(n, dtype=torch.uint8), 10))
    await asyncio.sleep(0)
    await asyncio.sleep(0.002)
    await a.close()
    outs = await asyncio.gather(send, recv, return_exceptions=True)
    if all(o is None or isinstance(o, torch.Tensor) for o in outs):
        pytest.skip("the transfer finished before close(): nothing to check")
    assert isinstance(outs[0], aiomooncake.PeerClosed), outs
    if isinstance(outs[1], torch.Tensor):
        # The receiver had every byte and its completion was on the wire when the sender closed:
        # the send cannot know it arrived (as with TCP), but the recv must then be whole.
        assert torch.equal(dest, torch.ones(n, dtype=torch.uint8)), "recv returned partial data"
        return
    assert isinstance(outs[1], aiomooncake.PeerClosed), outs
    snapshot = dest.clone()
    await asyncio.sleep(0.3)
    assert torch.equal(dest, snapshot), "bytes landed after the recv had failed"


def test_bytes_views_across_a_page_boundary_are_seen() -> None:
    """A view into a bytes object whose header sits on the previous 4 KiB page (small objects can
    straddle pages) is still recognised as immutable."""
    found = 0
    keep = []
    for _ in range(20000):
        b = bytes(range(256)) + bytes(44)
        keep.append(b)
        payload = id(b) + 32
        if payload // 4096 != (payload + 96) // 4096:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                view = torch.frombuffer(b, dtype=torch.uint8, offset=96, count=64)
            assert view.data_ptr() // 4096 != id(b) // 4096
            assert _unwritable(view) is not None
            found += 1
            if found >= 5:
                break
    assert found, "no bytes object straddled a page boundary"
