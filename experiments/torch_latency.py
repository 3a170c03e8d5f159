#!/usr/bin/env python3
"""The small-message round trip through the ``"aiomooncake"`` torch backend, the async core and gloo,
measured in the same two processes, blocks interleaved (the figures in docs/torch.md).

    python experiments/torch_latency.py                        # 8 B, torch vs core vs gloo
    python experiments/torch_latency.py --size 4096 --device cuda --impls torch,core

Two spawned ranks hold three paths between them: a process group on the backend
(``isend(t).wait(); irecv(t).wait()`` against the mirror image), a gloo group (the same calls), and a
``Peer`` connection on an event loop of their own (``await peer.send(t); await peer.recv(t)``).
They run ``--trips`` round trips on one path, then on the next, the order rotating every round, so
a machine whose speed drifts (a shared VM) affects every path alike. Rank 0 prints each path's median
round trip over all rounds, each round's ratios (pairs from the same minutes), the median ratio,
and the median time of each of its four torch calls. Public API only.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _pair import core_connect, free_port, init_groups

import aiomooncake

IMPLS = ("torch", "core", "gloo")


def _torch_trips(rank: int, t: torch.Tensor, n: int, group: Any,
                 split: list[tuple[float, float, float, float]] | None = None) -> list[float]:
    peer = 1 - rank
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        if rank == 0:
            w = dist.isend(t, peer, group=group)
            ta = time.perf_counter()
            assert w is not None
            w.wait()
            tb = time.perf_counter()
            w = dist.irecv(t, peer, group=group)
            tc = time.perf_counter()
            assert w is not None
            w.wait()
            td = time.perf_counter()
            if split is not None:
                split.append((ta - t0, tb - ta, tc - tb, td - tc))
        else:
            w = dist.irecv(t, peer, group=group)
            assert w is not None
            w.wait()
            w = dist.isend(t, peer, group=group)
            assert w is not None
            w.wait()
        out.append(time.perf_counter() - t0)
    return out


async def _core_trips(rank: int, peer: aiomooncake.Peer, t: torch.Tensor, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        if rank == 0:
            await peer.send(t, 1)
            await peer.recv(t, 2)
        else:
            await peer.recv(t, 1)
            await peer.send(t, 2)
        out.append(time.perf_counter() - t0)
    return out


def _worker(rank: int, port: int, args: argparse.Namespace, q: Any) -> None:
    gloo, dev = init_groups(rank, port, args.device)
    t = torch.zeros(args.size, dtype=torch.uint8, device=dev)
    loop = aiomooncake.new_event_loop()
    impls: list[str] = args.impls.split(",")
    peer = loop.run_until_complete(core_connect(rank, gloo)) if "core" in impls else None
    split: list[tuple[float, float, float, float]] = []

    def block(impl: str, n: int) -> list[float]:
        if impl == "torch":
            return _torch_trips(rank, t, n, None, split)
        if impl == "gloo":
            return _torch_trips(rank, t.cpu() if dev.type == "cuda" else t, n, gloo)
        assert peer is not None
        return loop.run_until_complete(_core_trips(rank, peer, t, n))

    runs: dict[str, list[float]] = {i: [] for i in impls}  # each block's median round trip
    for impl in impls:
        block(impl, args.warmup)
    split.clear()
    for r in range(args.rounds):
        order = impls[r % len(impls):] + impls[:r % len(impls)]
        for impl in order:
            runs[impl].append(statistics.median(block(impl, args.trips)))
    if peer is not None:
        loop.run_until_complete(peer.close())
    loop.close()
    if rank == 0:
        q.put((runs, [statistics.median(p[i] for p in split) for i in range(4)] if split else []))
    dist.barrier(group=gloo)
    dist.destroy_process_group()


def _ratio(runs: dict[str, list[float]], a: str, b: str) -> tuple[list[float], float]:
    """Per-round throughput ratios a/b (round trip of b over round trip of a) and their median."""
    rs = [y / x for x, y in zip(runs[a], runs[b], strict=True)]
    return rs, statistics.median(rs)


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--impls", default=",".join(IMPLS), help="comma-separated, of " + ", ".join(IMPLS))
    ap.add_argument("--size", type=int, default=8, help="bytes per message")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--trips", type=int, default=300, help="round trips per block")
    ap.add_argument("--warmup", type=int, default=200, help="round trips per path before timing")
    args = ap.parse_args()
    for impl in args.impls.split(","):
        if impl not in IMPLS:
            ap.error(f"unknown impl {impl!r}")
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, port, args, q)) for r in range(2)]
    for p in procs:
        p.start()
    runs, split = q.get(timeout=900)
    for p in procs:
        p.join(60)
    us: Callable[[float], str] = lambda s: f"{s * 1e6:.1f}"  # noqa: E731
    print(f"{args.size} B {args.device} round trip, {args.rounds} rounds x {args.trips} trips, "
          f"median of the rounds' medians (us):", flush=True)
    for impl, vals in runs.items():
        print(f"  {impl:>5}: {us(statistics.median(vals))}  (rounds: {', '.join(us(v) for v in vals)})",
              flush=True)
    for a, b in (("torch", "core"), ("torch", "gloo"), ("core", "gloo")):
        if a in runs and b in runs:
            rs, med = _ratio(runs, a, b)
            print(f"  {a}/{b} speed: median {med:.2f}x  (rounds: {', '.join(f'{x:.2f}' for x in rs)})",
                  flush=True)
    if split:
        print("  rank 0's torch isend / wait / irecv / wait: " + " / ".join(us(x) for x in split) + " us",
              flush=True)


if __name__ == "__main__":
    main()
