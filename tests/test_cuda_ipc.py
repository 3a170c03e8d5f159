"""What only the CUDA IPC plane does, on a GPU shared by two processes: mappings cached per remote
segment and closed with the last peer, stale segments replaced, every copy checked against what
the remote announced, kill -9 and cancellation mid-batch, expandable segments.

Most tests connect with ``one_copier=False``: each receiver then pulls, so this process maps the
remote's memory (what the assertions on mappings look at) whichever process is elected copier
otherwise. Skipped without a GPU (CI); ``scripts/gpu-check`` runs them.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import torch

import aiomooncake
from aiomooncake import planes
from aiomooncake.core.session import Session
from aiomooncake.planes.cuda_ipc import CudaIpcPlane, SegmentDesc, pack_desc, unpack_desc

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

MiB = 1 << 20
PULL: dict[str, Any] = {"one_copier": False, "transport": "cuda-ipc"}


def ipc() -> CudaIpcPlane:
    return next(p for p in planes.existing() if isinstance(p, CudaIpcPlane))


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    def raw(t: torch.Tensor) -> torch.Tensor:
        return t.contiguous().view(-1).view(torch.uint8)
    return bool(torch.equal(raw(a), raw(b)))


@pytest.fixture
def remote() -> Iterator[Any]:
    from cuda_remote import EchoRemote

    r = EchoRemote()
    yield r
    r.stop()


async def echo(peer: aiomooncake.Peer, x: torch.Tensor) -> torch.Tensor:
    back = torch.empty_like(x)
    await asyncio.gather(peer.send(x, tag=0), peer.recv(back, tag=0))
    return back


async def bye(peer: aiomooncake.Peer) -> None:
    await peer.send(torch.tensor([-1], dtype=torch.int64, device="cuda"), tag=0)


@pytest.fixture
async def puller(remote: Any) -> AsyncIterator[aiomooncake.Peer]:
    p = await aiomooncake.connect("127.0.0.1", remote.port, **PULL)
    yield p
    if not p.closed:
        await bye(p)
        await p.close()


async def test_segments_are_mapped_once_and_stale_ones_replaced(puller: aiomooncake.Peer) -> None:
    plane = ipc()
    x = torch.randint(0, 256, (16 * MiB,), dtype=torch.uint8, device="cuda")
    assert same_bytes(await echo(puller, x), x)
    opened = plane.mappings_opened
    for i in range(20):  # the remote's receive buffer comes from the same block each time
        x = torch.full((16 * MiB,), i, dtype=torch.uint8, device="cuda")
        back = await echo(puller, x)
        assert int(back[0]) == i and same_bytes(back, x)
    assert plane.mappings_opened - opened <= 1, "the same remote segment was mapped again"
    # our segments given back to the driver and new ones at the same addresses: the remote maps
    # the new ones (its stale mappings closed), and the bytes are the new ones
    del x, back
    aiomooncake.empty_cache()
    for i in range(3):
        y = torch.full((48 * MiB,), 100 + i, dtype=torch.uint8, device="cuda")
        assert same_bytes(await echo(puller, y), y)
        del y
        aiomooncake.empty_cache()


async def test_mappings_and_memory_flat_and_closed_with_the_peer(remote: Any) -> None:
    plane = ipc()
    peer = await aiomooncake.connect("127.0.0.1", remote.port, **PULL)
    xs = [torch.randint(0, 256, (3 * MiB + i,), dtype=torch.uint8, device="cuda") for i in range(4)]
    backs = [torch.empty_like(x) for x in xs]

    async def rounds(n: int) -> None:
        for _ in range(n):
            async with peer.batch() as b:
                for j, x in enumerate(xs):
                    b.send(x, tag=0)
                    b.recv(backs[j], tag=0)

    await rounds(20)
    torch.cuda.synchronize()
    free0, _ = torch.cuda.mem_get_info()
    mapped0 = plane.mapped()
    assert mapped0 >= 1, "this process should map the remote's segments (it pulls)"
    await rounds(1000)
    torch.cuda.synchronize()
    free1, _ = torch.cuda.mem_get_info()
    assert plane.mapped() == mapped0, "mappings grew over 1000 batches"
    assert free0 - free1 < 64 * MiB, f"GPU memory fell by {(free0 - free1) / MiB:.0f} MiB"
    assert all(same_bytes(b, x) for b, x in zip(backs, xs, strict=True))
    closed = plane.mappings_closed
    await bye(peer)
    await peer.close()
    assert plane.mappings_closed - closed == mapped0 and plane.mapped() == 0, "mappings outlived the peer"


async def test_a_batch_of_512_mixed_sizes_both_ways(remote: Any) -> None:
    """An EPLB-shaped batch: 128 experts' worth of weights and scales each way, bit-exact."""
    sizes = [1_400_000, 700_000, 7168, 3584] * 128
    gen = torch.Generator(device="cuda").manual_seed(5)
    outs = [torch.randint(0, 256, (n,), dtype=torch.uint8, device="cuda", generator=gen) for n in sizes]
    async with await aiomooncake.connect("127.0.0.1", remote.port) as peer:  # the default: one copier
        assert peer.data_path == "cuda-ipc"
        backs = [torch.empty_like(x) for x in outs]
        async with peer.batch(timeout=60) as b:
            for x, y in zip(outs, backs, strict=True):
                b.send(x, tag=0)
                b.recv(y, tag=0)
        assert all(same_bytes(x, y) for x, y in zip(outs, backs, strict=True))
        await bye(peer)


async def test_a_forged_destination_is_refused(remote: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The writer checks every copy against what the receiver announced: one byte less of capacity,
    or a segment descriptor that does not cover the destination, and nothing is copied."""
    no_pull = Session.post_send  # offer no source: the receiver answers CTS and we write
    monkeypatch.setattr(Session, "post_send", lambda self, *a, **k: no_pull(self, *a[:6]))
    from aiomooncake.peer.peer import Peer

    real = Peer._start_write
    forge: list[str] = []

    def forged(self: Peer, op: Any) -> None:
        if forge and forge[-1] == "capacity":
            op.capacity -= 1
        elif forge and forge[-1] == "segment":
            d = unpack_desc(op.desc)
            assert isinstance(d, SegmentDesc)
            op.desc = pack_desc(SegmentDesc(d.handle, d.base, op.addr - d.base + op.nbytes - 1, d.ident))
        real(self, op)

    monkeypatch.setattr(Peer, "_start_write", forged)
    async with await aiomooncake.connect("127.0.0.1", remote.port, **PULL) as peer:
        x = torch.full((2 * MiB,), 3, dtype=torch.uint8, device="cuda")
        copies = ipc().copies
        forge.append("capacity")
        with pytest.raises(aiomooncake.MessageMismatch, match="holds only"):
            await peer.send(x, tag=0)
        forge.append("segment")
        with pytest.raises(aiomooncake.TransferFailed, match="outside the remote segment"):
            await peer.send(x, tag=0)
        assert ipc().copies == copies, "a refused copy was queued"
        forge.append("none")
        assert same_bytes(await echo(peer, x), x)  # the peer is still usable
        await bye(peer)


async def test_a_recv_cancelled_mid_batch_gets_no_byte_after(puller: aiomooncake.Peer) -> None:
    n, count = 64 * MiB, 24
    outs = [torch.full((n,), 7, dtype=torch.uint8, device="cuda") for _ in range(count)]
    backs = [torch.zeros(n, dtype=torch.uint8, device="cuda") for _ in range(count)]
    sends = [asyncio.ensure_future(puller.send(x, tag=0)) for x in outs]
    recvs = [asyncio.ensure_future(puller.recv(y, tag=0)) for y in backs]
    await asyncio.sleep(0.01)
    for r in recvs:
        r.cancel()
    outcomes = await asyncio.gather(*recvs, return_exceptions=True)
    torch.cuda.synchronize()
    snap = [y.clone() for y in backs]
    await asyncio.sleep(0.5)
    torch.cuda.synchronize()
    assert all(torch.equal(a, b) for a, b in zip(snap, backs, strict=True)), "bytes landed after cancel"
    assert any(isinstance(o, asyncio.CancelledError) for o in outcomes)
    await puller.close()  # the remote's echoes of the cancelled messages fail; so do ours left
    await asyncio.gather(*sends, return_exceptions=True)


@pytest.mark.parametrize("pulls", [True, False], ids=["we-pull", "one-copier"])
async def test_kill_9_of_the_remote_mid_batch(pulls: bool) -> None:
    """The remote dies with a batch in flight: every operation here fails within 2 s, nothing
    lands in our buffers after that, and this process's GPU still works."""
    from cuda_remote import EchoRemote

    r = EchoRemote()
    opts: dict[str, Any] = PULL if pulls else {"transport": "cuda-ipc"}
    peer = await aiomooncake.connect("127.0.0.1", r.port, **opts)
    n, count = 32 * MiB, 32
    outs = [torch.full((n,), 9, dtype=torch.uint8, device="cuda") for _ in range(count)]
    backs = [torch.zeros(n, dtype=torch.uint8, device="cuda") for _ in range(count)]
    ops: list[asyncio.Future[Any]] = [asyncio.ensure_future(peer.send(x, tag=0)) for x in outs]
    ops += [asyncio.ensure_future(peer.recv(y, tag=0)) for y in backs]
    await asyncio.wait(ops, return_when=asyncio.FIRST_COMPLETED)  # the batch is under way
    os.kill(r.proc.pid, signal.SIGKILL)
    t0 = time.perf_counter()
    outcomes = await asyncio.wait_for(asyncio.gather(*ops, return_exceptions=True), 10)
    took = time.perf_counter() - t0
    torch.cuda.synchronize()
    snap = [y.clone() for y in backs]
    await asyncio.sleep(0.5)
    torch.cuda.synchronize()
    assert all(torch.equal(a, b) for a, b in zip(snap, backs, strict=True)), "bytes landed after the error"
    assert took <= 2.0, f"the survivor's operations failed only after {took:.2f} s"
    assert any(isinstance(o, aiomooncake.PeerClosed) for o in outcomes), outcomes[:3]
    await peer.close()
    r.stop()
    z = torch.ones(1024, device="cuda")
    assert float((z * 2).sum()) == 2048.0  # the context survived


def test_expandable_segments_work(tmp_path: Any) -> None:
    """Two processes whose allocators use expandable segments still exchange CUDA tensors, bit-exact,
    over whichever plane the handshake found working (printed for the record)."""
    script = tmp_path / "pair.py"
    script.write_text(_PAIR)
    env = {**os.environ, "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}
    out = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert "ok" in out.stdout
    print(out.stdout.strip().splitlines()[-1])


_PAIR = r'''
import asyncio, multiprocessing as mp, torch, aiomooncake

def server(q):
    async def main():
        async with await aiomooncake.listen("127.0.0.1", 0) as lst:
            q.put(lst.port)
            async with await lst.accept() as peer:
                for _ in range(3):
                    x = await peer.recv_tensor(tag=1, device="cuda")
                    await peer.send(x, tag=2)
    aiomooncake.run(main())

async def client(port):
    async with await aiomooncake.connect("127.0.0.1", port) as peer:
        for i, n in enumerate((4096, 3 << 20, 40 << 20)):
            x = torch.randint(0, 256, (n,), dtype=torch.uint8, device="cuda")
            back = torch.empty_like(x)
            await peer.send(x, tag=1)
            await peer.recv(back, tag=2)
            assert torch.equal(back, x), n
        print("ok", peer.data_paths)

if __name__ == "__main__":
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=server, args=(q,))
    p.start()
    aiomooncake.run(client(q.get(timeout=120)))
    p.join(60)
'''
