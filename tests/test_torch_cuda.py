"""CUDA tensors through the "aiomooncake" backend (two processes sharing GPU 0; skipped without a GPU).

The interesting part is stream ordering, not the bytes: a send must read its tensor only after the
work the caller queued on its current stream before ``isend``, a recv must not land before the work
queued on the caller's stream before ``irecv`` (which could overwrite it), and after ``wait()`` work
the caller queues on its current stream must see the data, without any device synchronization.
``torch.cuda._sleep`` holds those streams busy long enough for a missing dependency to show.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.distributed as dist
from test_torch_harness import Ctx, no_children_left, run_ranks

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

SPIN = 200_000_000  # GPU cycles: ~0.1 s on an H100, far longer than a transfer's set-up


def cuda_stream_order(ctx: Ctx) -> dict[str, Any]:
    dev = torch.device("cuda", 0)
    torch.cuda.set_device(dev)
    peer = 1 - ctx.rank
    side = torch.cuda.Stream(dev)
    out: dict[str, Any] = {}
    for tag, n in ((1, 100), (2, 8 << 20)):  # eager and rendezvous sizes
        if ctx.rank == 0:
            src = torch.zeros(n, device=dev)
            side.wait_stream(torch.cuda.current_stream(dev))  # the zeros are written before the fill
            with torch.cuda.stream(side):
                torch.cuda._sleep(SPIN)
                src.fill_(float(tag))  # queued, not done, when isend is called
                w = dist.isend(src, peer, tag=tag)
                assert w is not None
            w.wait()
        else:
            buf = torch.empty(n, device=dev)
            with torch.cuda.stream(side):
                torch.cuda._sleep(SPIN)
                buf.fill_(-7.0)  # must not overwrite the received bytes
                w = dist.irecv(buf, peer, tag=tag)
                assert w is not None
                w.wait()  # makes `side` wait for the data
                total = buf.sum()  # queued on `side` after the wait
                # read on `side` too: .item() outside would copy on the default stream, which does
                # not wait for the sum (a stale read that once passed for a missing dependency)
                out[f"sum{tag}"] = total.item() / n
    # cross-device: a CUDA tensor into a CPU buffer and back, in one batch
    if ctx.rank == 0:
        host = torch.zeros(1000)
        gpu = torch.full((1000,), 4.0, device=dev)
        works = dist.batch_isend_irecv([dist.P2POp(dist.irecv, host, peer, tag=3),
                                        dist.P2POp(dist.isend, gpu, peer, tag=4)])
    else:
        dev_buf = torch.zeros(1000, device=dev)
        works = dist.batch_isend_irecv([dist.P2POp(dist.isend, torch.full((1000,), 9.0), peer, tag=3),
                                        dist.P2POp(dist.irecv, dev_buf, peer, tag=4)])
    for w in works:
        w.wait()
    if ctx.rank == 0:
        out["to_cpu"] = host.mean().item()
    else:
        out["to_cuda"] = dev_buf.mean().item()
    dist.barrier()
    return out


def core_stream_order(ctx: Ctx) -> list[float]:
    """The same check on the async core itself (the group's own Peer, driven on the loop thread with
    the side stream current), to tell a core problem from a torch-layer one."""
    dev = torch.device("cuda", 0)
    torch.cuda.set_device(dev)
    pg: Any = dist.group.WORLD
    peer_rank = 1 - ctx.rank

    async def go() -> float:
        peer = await pg._mesh._send[peer_rank].ready
        side = torch.cuda.Stream(dev)
        n = 8 << 20
        if ctx.rank == 0:
            src = torch.zeros(n, device=dev)
            side.wait_stream(torch.cuda.current_stream(dev))
            with torch.cuda.stream(side):
                torch.cuda._sleep(SPIN)
                src.fill_(2.0)
                await peer.send(src, 99)
            return 0.0
        buf = torch.empty(n, device=dev)
        with torch.cuda.stream(side):
            buf.fill_(-7.0)
            await peer.recv(buf, 99)
            total = buf.sum()
            return float(total.item()) / n  # on `side`: the default stream would not wait for the sum

    means = []
    for _ in range(4):
        means.append(pg._loop.run(go(), 60))
        dist.barrier()
    return means


def test_core_stream_order() -> None:
    # Repeated sends through the group's own Peer, each fill behind a long kernel on a side stream.
    res = run_ranks(core_stream_order, 2, timeout=180).results
    assert res[1] == [2.0] * 4


def test_cuda_stream_order() -> None:
    res = run_ranks(cuda_stream_order, 2, timeout=180).results
    assert res[1]["sum1"] == 1.0 and res[1]["sum2"] == 2.0
    assert res[0]["to_cpu"] == 9.0 and res[1]["to_cuda"] == 4.0
    assert no_children_left()


def cuda_mixed_string(ctx: Ctx) -> list[float]:
    dev = torch.device("cuda", 0)
    torch.cuda.set_device(dev)
    t = torch.full((8,), float(ctx.rank + 1))
    dist.all_reduce(t)  # on gloo
    b = torch.zeros(8, device=dev)
    peer = 1 - ctx.rank
    for w in dist.batch_isend_irecv([dist.P2POp(dist.isend, t.to(dev) * (ctx.rank + 1), peer),
                                     dist.P2POp(dist.irecv, b, peer)]):
        w.wait()
    return b.tolist()


def test_cuda_with_gloo_collectives() -> None:
    res = run_ranks(cuda_mixed_string, 2, backend="cpu:gloo,cuda:aiomooncake", timeout=180).results
    assert res[0] == [6.0] * 8 and res[1] == [3.0] * 8
