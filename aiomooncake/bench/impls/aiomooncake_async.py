"""``aiomooncake``: the asyncio API (``Peer.send`` / ``Peer.recv``) between two processes.

A send completes only once its bytes are in the receiver's tensor, so the sender's clock already
includes the receiver's acknowledgement: no extra ack message is needed.
stream: ``window`` concurrent sends (``asyncio.gather``) against ``window`` posted receives.
eplb: every expert tensor of the batch sent and received in one ``Peer.batch()`` per rank.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import torch

import aiomooncake

from ..common import MODES as ALL_MODES
from ..common import AsyncIteration, Point, RankContext, ameasure, eplb_tensors

NAME = "aiomooncake"
WORLD = 2
MODES = ALL_MODES


def available(device: str) -> str | None:
    try:
        import mooncake.engine  # noqa: F401
    except ImportError as e:
        return f"the Mooncake Transfer Engine is not installed ({e})"
    if device == "cuda" and not torch.cuda.is_available():
        return "CUDA is not available"
    return None


def child_env(device: str) -> dict[str, str]:
    return {}


def run(ctx: RankContext) -> None:
    aiomooncake.run(_main(ctx))


async def _main(ctx: RankContext) -> None:
    dev = ctx.device()
    # The benchmark blocks its loop while it allocates big buffers: be patient with heartbeats.
    opts: dict[str, Any] = {"heartbeat_interval": 1.0, "heartbeat_timeout": max(30.0, ctx.cfg.timeout)}
    if ctx.rank == 1:
        lst = await aiomooncake.listen(ctx.host, 0, **opts)
        ctx.put("port", lst.port)
        peer = await lst.accept()
        await lst.close()
    else:
        port = await asyncio.to_thread(ctx.get, "port")
        peer = await aiomooncake.connect(ctx.peer_host, port, **opts)
    ctx.notes["data_path"] = peer.data_path
    try:
        for p in ctx.points:
            ctx.begin(p)
            await asyncio.to_thread(ctx.barrier, f"p{p.idx}")
            step = _prepare(ctx, peer, p, dev)
            samples = await ameasure(ctx, p, step)
            ctx.finish(p, samples)
        await asyncio.to_thread(ctx.barrier, "end")
    finally:
        await peer.close()


async def pingpong_once(peer: aiomooncake.Peer, first: bool, s: torch.Tensor, r: torch.Tensor) -> None:
    """One round trip: the first side sends ``s`` then receives into ``r`` (as the
    torch.distributed impls do), the other the reverse."""
    if first:
        await peer.send(s, tag=1)
        await peer.recv(r, tag=2)
    else:
        await peer.recv(r, tag=1)
        await peer.send(s, tag=2)


def _prepare(ctx: RankContext, peer: aiomooncake.Peer, p: Point, dev: torch.device) -> AsyncIteration:
    window = ctx.cfg.window
    first = ctx.rank == 0

    if p.mode == "eplb":
        mine = eplb_tensors(p.size, ctx.cfg.scale, dev)
        theirs = [torch.zeros_like(t) for t in mine]

        async def eplb() -> float:
            t0 = time.perf_counter()
            async with peer.batch() as b:  # what an asyncio EPLB exchange would use
                for i, t in enumerate(mine):
                    b.send(t, tag=100 + i)
                for i, t in enumerate(theirs):
                    b.recv(t, tag=100 + i)
            return time.perf_counter() - t0
        return eplb

    s = torch.ones(p.size, dtype=torch.uint8, device=dev)
    r = torch.zeros(p.size, dtype=torch.uint8, device=dev)

    async def pingpong() -> float:
        t0 = time.perf_counter()
        await pingpong_once(peer, first, s, r)
        return time.perf_counter() - t0

    async def stream() -> float:
        t0 = time.perf_counter()
        if first:
            await asyncio.gather(*(peer.send(s, tag=3) for _ in range(window)))
        else:
            await asyncio.gather(*(peer.recv(r, tag=3) for _ in range(window)))
        return time.perf_counter() - t0

    async def bidir() -> float:
        t0 = time.perf_counter()
        await asyncio.gather(*(peer.send(s, tag=4) for _ in range(window)),
                             *(peer.recv(r, tag=4) for _ in range(window)))
        return time.perf_counter() - t0

    steps: dict[str, AsyncIteration] = {"pingpong": pingpong, "stream": stream, "bidir": bidir}
    return steps[p.mode]

