#!/usr/bin/env python3
"""The torch backend's speed against the async core's, each benchmark mode measured in the same two
processes, blocks interleaved, so the ratio comes from the same minutes of a drifting machine.

    python experiments/torch_vs_core.py --mode eplb --size 1          # 1 expert, CPU, scale 1/16
    python experiments/torch_vs_core.py --mode stream --size 65536 --no-ack
    python experiments/torch_vs_core.py --mode pingpong --size 8 --device cuda

The modes are the benchmark's (``python -m aiomooncake.bench``), with the same calls on each side:
pingpong (``dist.send``/``dist.recv`` against ``await peer.send``/``recv``), stream (``window`` isends,
then waits, against ``gather`` of sends), bidir and eplb (``batch_isend_irecv`` of every send and
receive, against one ``Peer.batch()``). The benchmark's torch impls end stream, bidir and eplb with
a small acknowledgement (a completed gloo ``isend`` does not prove delivery); ``--no-ack`` leaves it
out, as the core needs none: the backend's sends, like the core's, complete on delivery. Rank 0
prints the median time per iteration of each path over all rounds and each round's ratio
(throughput, torch / core). Public API only.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _pair import core_connect, free_port, init_groups

import aiomooncake
from aiomooncake.bench.common import eplb_tensors
from aiomooncake.bench.impls.aiomooncake_async import pingpong_once


def _torch_step(args: argparse.Namespace, rank: int, dev: torch.device) -> Callable[[], None]:
    peer, first = 1 - rank, rank == 0
    ack = torch.zeros(1, dtype=torch.int64, device=dev)

    def acknowledge() -> None:
        if args.no_ack:
            return
        if first:
            dist.recv(ack, peer)
        else:
            dist.send(ack, peer)

    def wait(reqs: list[Any]) -> None:
        for r in reqs:
            r.wait()

    if args.mode == "eplb":
        mine = eplb_tensors(args.size, args.scale, dev)
        theirs = [torch.zeros_like(t) for t in mine]

        def eplb() -> None:
            ops = [dist.P2POp(dist.isend, t, peer) for t in mine]
            ops += [dist.P2POp(dist.irecv, t, peer) for t in theirs]
            wait(dist.batch_isend_irecv(ops))
            acknowledge()
        return eplb
    s = torch.ones(args.size, dtype=torch.uint8, device=dev)
    r = torch.zeros(args.size, dtype=torch.uint8, device=dev)

    def pingpong() -> None:
        if first:
            dist.send(s, peer)
            dist.recv(r, peer)
        else:
            dist.recv(r, peer)
            dist.send(s, peer)

    def stream() -> None:
        if first:
            wait([dist.isend(s, peer) for _ in range(args.window)])
        else:
            wait([dist.irecv(r, peer) for _ in range(args.window)])
        acknowledge()

    def bidir() -> None:
        ops = [dist.P2POp(dist.isend, s, peer) for _ in range(args.window)]
        ops += [dist.P2POp(dist.irecv, r, peer) for _ in range(args.window)]
        wait(dist.batch_isend_irecv(ops))
        acknowledge()
    steps: dict[str, Callable[[], None]] = {"pingpong": pingpong, "stream": stream, "bidir": bidir}
    return steps[args.mode]


def _core_step(args: argparse.Namespace, rank: int, dev: torch.device,
               peer: aiomooncake.Peer) -> Callable[[], Any]:
    first = rank == 0
    if args.mode == "eplb":
        mine = eplb_tensors(args.size, args.scale, dev)
        theirs = [torch.zeros_like(t) for t in mine]

        async def eplb() -> None:
            async with peer.batch() as b:
                for i, t in enumerate(mine):
                    b.send(t, tag=100 + i)
                for i, t in enumerate(theirs):
                    b.recv(t, tag=100 + i)
        return eplb
    s = torch.ones(args.size, dtype=torch.uint8, device=dev)
    r = torch.zeros(args.size, dtype=torch.uint8, device=dev)

    async def pingpong() -> None:
        await pingpong_once(peer, first, s, r)

    async def stream() -> None:
        if first:
            await asyncio.gather(*(peer.send(s, tag=3) for _ in range(args.window)))
        else:
            await asyncio.gather(*(peer.recv(r, tag=3) for _ in range(args.window)))

    async def bidir() -> None:
        await asyncio.gather(*(peer.send(s, tag=4) for _ in range(args.window)),
                             *(peer.recv(r, tag=4) for _ in range(args.window)))
    steps: dict[str, Callable[[], Any]] = {"pingpong": pingpong, "stream": stream, "bidir": bidir}
    return steps[args.mode]


def _worker(rank: int, port: int, args: argparse.Namespace, q: Any) -> None:
    gloo, dev = init_groups(rank, port, args.device)

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize()
    loop = aiomooncake.new_event_loop()
    peer = loop.run_until_complete(core_connect(rank, gloo))
    tstep = _torch_step(args, rank, dev)
    cstep = _core_step(args, rank, dev, peer)

    def block(impl: str, n: int) -> list[float]:
        out = []
        for _ in range(n):
            t0 = time.perf_counter()
            if impl == "torch":
                tstep()
            else:
                loop.run_until_complete(cstep())
            sync()
            out.append(time.perf_counter() - t0)
        return out

    runs: dict[str, list[float]] = {"torch": [], "core": []}
    for impl in runs:
        block(impl, args.warmup)
    for r in range(args.rounds):
        for impl in (("torch", "core") if r % 2 == 0 else ("core", "torch")):
            dist.barrier(group=gloo)
            runs[impl].append(statistics.median(block(impl, args.iters)))
    loop.run_until_complete(peer.close())
    loop.close()
    if rank == 0:
        q.put(runs)
    dist.barrier(group=gloo)
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--mode", default="pingpong", choices=["pingpong", "stream", "bidir", "eplb"])
    ap.add_argument("--size", type=int, default=8, help="bytes per message (eplb: experts)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--scale", type=float, default=None,
                    help="eplb: factor on the experts' weights (as the benchmark's: cpu 1/16, cuda 1)")
    ap.add_argument("--window", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--iters", type=int, default=50, help="iterations per block")
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--no-ack", action="store_true", help="no closing acknowledgement on the torch side")
    args = ap.parse_args()
    if args.scale is None:
        args.scale = 1.0 if args.device == "cuda" else 1 / 16
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, port, args, q)) for r in range(2)]
    for p in procs:
        p.start()
    runs = q.get(timeout=1800)
    for p in procs:
        p.join(60)
    ratios = [c / t for t, c in zip(runs["torch"], runs["core"], strict=True)]
    what = f"{args.size} experts" if args.mode == "eplb" else f"{args.size} B"
    print(f"{args.mode} {what} {args.device}{' (no ack)' if args.no_ack else ''}: {args.rounds} rounds x "
          f"{args.iters} iterations, us per iteration (median of the rounds' medians):", flush=True)
    for impl, vals in runs.items():
        print(f"  {impl:>5}: {statistics.median(vals) * 1e6:.1f}  "
              f"(rounds: {', '.join(f'{v * 1e6:.1f}' for v in vals)})", flush=True)
    print(f"  torch/core speed: median {statistics.median(ratios):.2f}x  "
          f"(rounds: {', '.join(f'{x:.2f}' for x in ratios)})", flush=True)


if __name__ == "__main__":
    main()
