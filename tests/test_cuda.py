"""CUDA tests: two processes sharing one GPU, over each same-host CUDA plane: ours (CUDA IPC,
the default) and the Transfer Engine's intra-node NVLink transport.

Skipped without a GPU (CI); ``scripts/gpu-check`` runs them on a GPU machine. tests/test_cuda_ipc.py
holds what only the CUDA IPC plane does.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import torch

import aiomooncake
from aiomooncake import planes
from aiomooncake.planes.base import DataPlane

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

MiB = 1 << 20


@pytest.fixture(scope="module")
def remote() -> Iterator[object]:
    from cuda_remote import EchoRemote

    r = EchoRemote()
    yield r
    r.stop()


@pytest.fixture(scope="module", params=["cuda-ipc", "nvlink"])
def kind(request: pytest.FixtureRequest) -> str:
    """The plane every test of this module runs over (the client forces it; the remote is "auto")."""
    return str(request.param)


@pytest.fixture
async def peer(remote: object, kind: str) -> AsyncIterator[aiomooncake.Peer]:
    p = await aiomooncake.connect("127.0.0.1", remote.port, transport=kind)  # type: ignore[attr-defined]
    yield p
    await p.close()


def _bye(remote: object) -> None:
    """Tell an echo loop to finish (a fresh connection, the module is done)."""
    async def bye() -> None:
        p = await aiomooncake.connect("127.0.0.1", remote.port)  # type: ignore[attr-defined]
        await p.send(torch.tensor([-1], dtype=torch.int64, device="cuda"), tag=0)
        await p.close()
    with contextlib.suppress(Exception):
        aiomooncake.run(bye())


@pytest.fixture(scope="module", autouse=True)
def _stop_remote(remote: object) -> Iterator[None]:
    yield
    _bye(remote)


@pytest.fixture(scope="module")
def inline_remote() -> Iterator[object]:
    """An echo remote that sends small ready CUDA tensors inline even though we share its GPU."""
    from cuda_remote import EchoRemote

    r = EchoRemote(inline=True)
    yield r
    _bye(r)
    r.stop()


@pytest.fixture
async def inline_peer(inline_remote: object, kind: str) -> AsyncIterator[aiomooncake.Peer]:
    """Both sides send small ready CUDA tensors inline (off by default between peers on one GPU)."""
    p = await aiomooncake.connect("127.0.0.1", inline_remote.port,  # type: ignore[attr-defined]
                                  inline_cuda=True, transport=kind)
    yield p
    await p.close()


@pytest.fixture(params=["engine", "inline"])
def either_peer(request: pytest.FixtureRequest, kind: str) -> aiomooncake.Peer:
    """The test runs over both paths of a small CUDA tensor."""
    return request.getfixturevalue("peer" if request.param == "engine" else "inline_peer")  # type: ignore[no-any-return]


async def echo(peer: aiomooncake.Peer, x: torch.Tensor) -> torch.Tensor:
    back = torch.empty_like(x, memory_format=torch.contiguous_format)
    await asyncio.gather(peer.send(x, tag=0), peer.recv(back, tag=0))
    return back


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    def raw(t: torch.Tensor) -> torch.Tensor:
        return t.contiguous().view(-1).view(torch.uint8)
    return bool(torch.equal(raw(a), raw(b)))


def plane_of(kind: str) -> DataPlane:
    return next(e for e in planes.existing() if e.kind == kind)


def _exposed_by_base(plane: DataPlane) -> dict[int, Any]:
    """The plane's cached exposures (TE registrations, CUDA IPC exports) by segment base."""
    return {r.base: r for r in plane._exposed.regions}  # type: ignore[attr-defined]


def dtypes() -> list[torch.dtype]:
    out = []
    for name in dir(torch):
        dt = getattr(torch, name)
        if isinstance(dt, torch.dtype) and dt not in out:
            try:
                t = torch.zeros(4, dtype=dt, device="cuda")
                t.view(torch.uint8)
                if t.is_quantized:
                    continue
            except Exception:
                continue
            out.append(dt)
    return out


async def test_the_plane_is_the_one_asked_for(peer: aiomooncake.Peer, kind: str) -> None:
    assert peer.transports["cuda"] == kind
    assert peer.data_path == ("cuda-ipc" if kind == "cuda-ipc" else "te:nvlink")


async def test_auto_takes_cuda_ipc(remote: object) -> None:
    async with await aiomooncake.connect("127.0.0.1", remote.port) as p:  # type: ignore[attr-defined]
        assert p.data_path == "cuda-ipc", p.data_paths


@pytest.mark.parametrize("nbytes", [1, 4097, 64 * 1024 + 1, MiB, 64 * MiB + 3])
async def test_roundtrip_sizes(peer: aiomooncake.Peer, nbytes: int) -> None:
    x = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, device="cuda")
    assert same_bytes(await echo(peer, x), x)


async def test_roundtrip_1gib(peer: aiomooncake.Peer) -> None:
    x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    x[::4096] = 7
    x[-1] = 9
    assert same_bytes(await echo(peer, x), x)


async def test_every_dtype(peer: aiomooncake.Peer) -> None:
    for dt in dtypes():
        for n in (3, 70_000):  # eager and rendezvous
            raw = torch.randint(0, 256, (n * torch.empty(0, dtype=dt).element_size(),), dtype=torch.uint8,
                                device="cuda")
            x = raw.view(dt)
            back = await echo(peer, x)
            assert back.dtype == dt and same_bytes(back, x), dt


async def test_views_slices_and_shared_segment(peer: aiomooncake.Peer, kind: str) -> None:
    base = torch.randint(0, 256, (8 * MiB,), dtype=torch.uint8, device="cuda")
    eng = plane_of(kind)
    await echo(peer, base)
    regs = eng.stats().registrations
    for off in (1, 4095, 3 * MiB + 17):
        view = base[off:off + 2 * MiB]  # interior, unaligned pointers in an already registered segment
        assert same_bytes(await echo(peer, view), view)
    strided = base.view(-1, 1024)[:, 3:900]  # non-contiguous: sent as its contiguous copy
    assert same_bytes(await echo(peer, strided), strided.contiguous())
    # several tensors of one caching-allocator segment register that segment once
    small = [torch.full((100_000,), i, dtype=torch.uint8, device="cuda") for i in range(8)]
    before = eng.stats().registrations
    for t in small:
        assert same_bytes(await echo(peer, t), t)
    assert eng.stats().registrations - before <= 2, "tensors of one segment must not register one by one"
    assert eng.stats().registrations - regs <= 2 + 2


async def test_freed_and_reallocated_between_sends(peer: aiomooncake.Peer, kind: str) -> None:
    # Free blocks earlier tests left in the caching allocator could serve the reallocation below
    # from another segment (seen once in a full gpu-check run, never alone): start from none.
    gc.collect()
    aiomooncake.empty_cache()
    eng = plane_of(kind)
    x = torch.randint(0, 256, (16 * MiB,), dtype=torch.uint8, device="cuda")
    await echo(peer, x)
    regs = eng.stats().registrations
    seen = _exposed_by_base(eng)
    for i in range(20):
        del x
        x = torch.full((16 * MiB,), i, dtype=torch.uint8, device="cuda")  # same caching-allocator block
        back = await echo(peer, x)
        assert int(back[0]) == i and same_bytes(back, x)
        # No segment goes back to the driver in this loop, so a base seen before is the same
        # segment: its cached exposure must be the one in use, not a new one.
        now = _exposed_by_base(eng)
        again = [hex(b) for b, r in now.items() if b in seen and seen[b] is not r]
        assert not again, f"the same segment was registered again: {again}"
        seen.update(now)
    # echo's result buffers alternate between two blocks; which ones the allocator hands out
    # depends on what earlier tests left, so one new segment for them is allowed
    assert eng.stats().registrations - regs <= 1, "freed and reallocated tensors registered anew"
    # segments given back to the driver and new ones (often at the same address): no stale mapping
    del x, back
    aiomooncake.empty_cache()
    for i in range(3):
        y = torch.full((48 * MiB,), 100 + i, dtype=torch.uint8, device="cuda")
        assert same_bytes(await echo(peer, y), y)
        del y
        aiomooncake.empty_cache()


@pytest.mark.parametrize("nbytes", [4096, 32 * MiB])  # inline-sized (its producer is busy) and large
async def test_sender_waits_for_producer_stream(either_peer: aiomooncake.Peer, nbytes: int) -> None:
    """A fill queued behind a long kernel on the caller's stream must be what goes out."""
    x = torch.zeros(nbytes, dtype=torch.uint8, device="cuda")
    back = torch.empty_like(x)
    side = torch.cuda.Stream()
    torch.cuda.synchronize()
    with torch.cuda.stream(side):
        torch.cuda._sleep(200_000_000)  # ~100+ ms of GPU time before the fill runs
        x.fill_(42)
        t0 = time.perf_counter()
        await asyncio.gather(either_peer.send(x, tag=0), either_peer.recv(back, tag=0))
        waited = time.perf_counter() - t0
    torch.cuda.synchronize()
    assert int(back.min()) == 42 and int(back.max()) == 42, "stale bytes went out"
    assert waited > 0.01


@pytest.mark.parametrize("nbytes", [4096, 16 * MiB])  # inline-sized (inline_peer: copied in) and large
async def test_receiver_orders_with_its_streams(either_peer: aiomooncake.Peer, nbytes: int) -> None:
    """The write must not land before earlier work on the receiver's stream used the buffer, and
    work queued after the recv must see the new bytes."""
    x = torch.full((nbytes,), 5, dtype=torch.uint8, device="cuda")
    buf = torch.full((nbytes,), 1, dtype=torch.uint8, device="cuda")
    side = torch.cuda.Stream()
    torch.cuda.synchronize()
    with torch.cuda.stream(side):
        torch.cuda._sleep(200_000_000)
        before = buf.clone()  # queued behind the sleep: must still read the old bytes
        await asyncio.gather(either_peer.send(x, tag=0), either_peer.recv(buf, tag=0))
        after = buf.to(torch.int64).sum()  # queued after the recv: must see the new bytes
    side.synchronize()
    assert int(before.max()) == 1, "the remote wrote before the receiver's earlier work was done"
    assert int(after) == 5 * nbytes


@pytest.mark.parametrize("nbytes", [4096, 16 * MiB])
async def test_a_batch_orders_on_the_stream_current_at_each_call(either_peer: aiomooncake.Peer,
                                                                  nbytes: int) -> None:
    """A batch's operations complete after the block left the stream they were posted on: each
    still orders on the stream that was current at its call (the send reads the bytes its producer
    wrote there, the receive lands after the work queued there before it)."""
    x = torch.zeros(nbytes, dtype=torch.uint8, device="cuda")
    buf = torch.full((nbytes,), 1, dtype=torch.uint8, device="cuda")
    side = torch.cuda.Stream()
    torch.cuda.synchronize()
    b = either_peer.batch()
    with torch.cuda.stream(side):
        torch.cuda._sleep(200_000_000)  # ~100+ ms of GPU time before the fill runs
        x.fill_(42)
        before = buf.clone()  # queued behind the sleep: must still read the old bytes
        b.send(x, tag=0)
        b.recv(buf, tag=0)
    await b.wait()  # the frames leave, and the copies run, with the default stream current
    side.synchronize()
    torch.cuda.synchronize()
    assert int(before.max()) == 1, "the remote wrote before the receiver's earlier work was done"
    assert int(buf.min()) == 42 and int(buf.max()) == 42, "stale bytes went out"


def _spy_inline(peer: aiomooncake.Peer) -> list[bool]:
    """Record, per send posted on ``peer``, whether it went inline (an EAGER frame with its bytes)."""
    session = peer._session
    inline: list[bool] = []
    real = session.post_send

    def spy(*args: object, **kwargs: object) -> object:
        inline.append(args[5] is not None)  # the payload: given for an eager message
        return real(*args, **kwargs)  # type: ignore[arg-type]
    session.post_send = spy  # type: ignore[method-assign, assignment]
    return inline


async def _small_sends(peer: aiomooncake.Peer) -> list[bool]:
    """Five 4 KiB echoes whose producer is done; whether each of our sends went inline."""
    inline = _spy_inline(peer)
    x = torch.randint(0, 256, (4096,), dtype=torch.uint8, device="cuda")
    back = torch.empty_like(x)
    for _ in range(5):
        torch.cuda.synchronize()  # the producer is done
        await peer.send(x, tag=0)
        await peer.recv(back, tag=0)
        assert same_bytes(back, x)
    return inline


async def test_small_ready_tensor_goes_inline(inline_peer: aiomooncake.Peer) -> None:
    """With inline sends on, a small CUDA tensor whose producer is done travels in the frame."""
    assert await _small_sends(inline_peer) == [True] * 5


async def test_small_tensor_takes_the_engine_between_peers_on_one_gpu(peer: aiomooncake.Peer) -> None:
    """By default peers on one GPU send small tensors through the copier's engine copy (the host
    copies of an inline send cost both processes GPU work: measured slower there)."""
    assert await _small_sends(peer) == [False] * 5


async def test_inline_send_does_not_overtake_a_waiting_one(inline_peer: aiomooncake.Peer) -> None:
    """Two sends on one tag: the first waits behind a 100 ms kernel (so it takes the rendezvous),
    the second is ready (so it goes inline); they arrive in posting order."""
    peer = inline_peer
    first = torch.zeros(4096, dtype=torch.uint8, device="cuda")
    second = torch.full((4096,), 2, dtype=torch.uint8, device="cuda")
    got = [torch.empty(4096, dtype=torch.uint8, device="cuda") for _ in range(2)]
    side = torch.cuda.Stream()
    torch.cuda.synchronize()
    with torch.cuda.stream(side):
        torch.cuda._sleep(200_000_000)
        first.fill_(1)
        s1 = asyncio.ensure_future(peer.send(first, tag=0))
        await asyncio.sleep(0)  # posted
    s2 = asyncio.ensure_future(peer.send(second, tag=0))
    await asyncio.gather(s1, s2, peer.recv(got[0], tag=0), peer.recv(got[1], tag=0))
    torch.cuda.synchronize()
    assert int(got[0].min()) == 1 and int(got[0].max()) == 1, "the inline send overtook"
    assert int(got[1].min()) == 2 and int(got[1].max()) == 2


async def test_recv_tensor_on_gpu(peer: aiomooncake.Peer) -> None:
    x = torch.randn(33, 77, dtype=torch.bfloat16, device="cuda")
    await peer.send(x, tag=0)
    got = await peer.recv_tensor(tag=0)
    assert got.is_cuda and got.shape == x.shape and same_bytes(got, x)


async def test_memory_flat_over_1000_sends(remote: object, kind: str) -> None:
    peer = await aiomooncake.connect("127.0.0.1", remote.port, transport=kind)  # type: ignore[attr-defined]
    eng = plane_of(kind)
    xs = [torch.randint(0, 256, (3 * MiB + i,), dtype=torch.uint8, device="cuda") for i in range(4)]
    backs = [torch.empty_like(x) for x in xs]
    for i in range(50):
        await asyncio.gather(peer.send(xs[i % 4], tag=0), peer.recv(backs[i % 4], tag=0))
    torch.cuda.synchronize()
    free0, _ = torch.cuda.mem_get_info()
    regs0 = eng.stats().registrations
    for i in range(1000):
        await asyncio.gather(peer.send(xs[i % 4], tag=0), peer.recv(backs[i % 4], tag=0))
    torch.cuda.synchronize()
    free1, _ = torch.cuda.mem_get_info()
    assert eng.stats().registrations == regs0
    assert free0 - free1 < 64 * MiB, f"GPU memory fell by {(free0 - free1) / MiB:.0f} MiB over 1000 sends"
    assert all(same_bytes(b, x) for b, x in zip(backs, xs, strict=True))
    # Device registrations outlive the peer (torch keeps the segments; re-registering them would
    # make the next peer's sender re-open IPC mappings): closing neither grows nor leaks them.
    cached = eng.stats().cached_regions
    await peer.close()
    assert eng.stats().cached_regions == cached
    if kind == "nvlink":
        assert aiomooncake.empty_cache() >= 1  # what the user calls to give them back


async def test_burst_of_mixed_sizes_both_ways(kind: str) -> None:
    """An EPLB-like burst (64 messages each way, 3.5 KB to 1.4 MB, all in flight): every byte
    lands where it belongs, and the copier submitted the copies started by one read of frames in
    shared engine batches (counted across both processes: either may be the copier)."""
    from cuda_remote import BURST_ROUNDS, BURST_SIZES, BurstRemote, burst_pattern

    r = BurstRemote()
    try:
        peer = await aiomooncake.connect("127.0.0.1", r.port, transport=kind)
        eng = plane_of(kind)
        before = eng.stats()
        outs = [burst_pattern(0, i, n) for i, n in enumerate(BURST_SIZES)]
        ins = [torch.empty(n, dtype=torch.uint8, device="cuda") for n in BURST_SIZES]
        good = 0
        for _ in range(BURST_ROUNDS):
            for x in ins:
                x.zero_()
            await asyncio.wait_for(asyncio.gather(
                *(peer.send(x, tag=i) for i, x in enumerate(outs)),
                *(peer.recv(x, tag=i) for i, x in enumerate(ins))), 60)
            good += sum(bool(torch.equal(x, burst_pattern(1, i, x.numel()))) for i, x in enumerate(ins))
        after = eng.stats()
        theirs = torch.zeros(3, dtype=torch.int64)
        await peer.recv(theirs, tag=10_000)
        await peer.send(torch.zeros(1), tag=10_001)
        await peer.close()
    finally:
        r.stop()
    expected = BURST_ROUNDS * len(BURST_SIZES)
    assert good == expected and int(theirs[0]) == expected
    requests = after.writes_submitted - before.writes_submitted + int(theirs[1])
    batches = after.batches_submitted - before.batches_submitted + int(theirs[2])
    # every message above the inline size was copied by the engine, once at least
    large = BURST_ROUNDS * sum(n > aiomooncake.Options().shm_eager_threshold for n in BURST_SIZES)
    assert requests >= 2 * large
    assert batches >= 1, "no copies were submitted together"
