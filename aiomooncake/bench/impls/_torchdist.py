"""The measurements shared by the torch.distributed backends (gloo, nccl, aiomooncake-torch,
mooncake-pg): one process group of two ranks, point-to-point ops only.

A completed ``isend`` does not prove the bytes arrived, so stream, bidir and eplb end with a small
acknowledgement from rank 1 that rank 0 receives before it stops its clock.
pingpong: rank 0 ``send`` then ``recv``; rank 1 ``recv`` then ``send``.
stream: ``window`` ``isend`` / ``irecv`` in flight, then the ack.
bidir, eplb: ``batch_isend_irecv`` of all sends and receives of both ranks, then the ack.
"""

from __future__ import annotations

import time
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch._C._distributed_c10d import PrefixStore

from ..common import Iteration, Point, RankContext, eplb_tensors, measure


def run_backend(ctx: RankContext, backend: str, pg_options: Any = None) -> None:
    dev = ctx.device()
    kwargs: dict[str, Any] = {}
    if pg_options is not None:
        kwargs["pg_options"] = pg_options
    dist.init_process_group(backend, store=PrefixStore("pg", ctx.store), rank=ctx.rank,
                            world_size=ctx.world, timeout=timedelta(seconds=ctx.cfg.timeout), **kwargs)
    try:
        ack = torch.zeros(1, dtype=torch.int64, device=dev)
        for p in ctx.points:
            ctx.begin(p)
            step = _prepare(ctx, p, dev, ack)
            ctx.barrier(f"p{p.idx}")
            samples = measure(ctx, p, step)
            ctx.finish(p, samples)
        ctx.barrier("end")
    finally:
        dist.destroy_process_group()


def _wait(reqs: list[Any]) -> None:
    for r in reqs:
        r.wait()


def _prepare(ctx: RankContext, p: Point, dev: torch.device, ack: torch.Tensor) -> Iteration:
    first = ctx.rank == 0
    peer = ctx.peer
    window = ctx.cfg.window
    sync = ctx.sync_device

    def acknowledge() -> None:
        if first:
            dist.recv(ack, peer)
        else:
            dist.send(ack, peer)

    if p.mode == "eplb":
        mine = eplb_tensors(p.size, ctx.cfg.scale, dev)
        theirs = [torch.zeros_like(t) for t in mine]

        def eplb() -> float:
            t0 = time.perf_counter()
            ops = [dist.P2POp(dist.isend, t, peer) for t in mine]
            ops += [dist.P2POp(dist.irecv, t, peer) for t in theirs]
            _wait(dist.batch_isend_irecv(ops))
            acknowledge()
            sync()
            return time.perf_counter() - t0
        return eplb

    s = torch.ones(p.size, dtype=torch.uint8, device=dev)
    r = torch.zeros(p.size, dtype=torch.uint8, device=dev)

    def pingpong() -> float:
        t0 = time.perf_counter()
        if first:
            dist.send(s, peer)
            dist.recv(r, peer)
        else:
            dist.recv(r, peer)
            dist.send(s, peer)
        sync()
        return time.perf_counter() - t0

    def stream() -> float:
        t0 = time.perf_counter()
        if first:
            _wait([dist.isend(s, peer) for _ in range(window)])
        else:
            _wait([dist.irecv(r, peer) for _ in range(window)])
        acknowledge()
        sync()
        return time.perf_counter() - t0

    def bidir() -> float:
        t0 = time.perf_counter()
        ops = [dist.P2POp(dist.isend, s, peer) for _ in range(window)]
        ops += [dist.P2POp(dist.irecv, r, peer) for _ in range(window)]
        _wait(dist.batch_isend_irecv(ops))
        acknowledge()
        sync()
        return time.perf_counter() - t0

    return {"pingpong": pingpong, "stream": stream, "bidir": bidir}[p.mode]
