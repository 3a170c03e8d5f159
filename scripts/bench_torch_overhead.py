#!/usr/bin/env python3
"""Overhead of the torch layer: ``dist.isend(t).wait()`` of a 64 MiB tensor next to the async core's
``await peer.send(t)`` over the very same connection, in the same run.

Two spawned ranks join ``init_process_group("aiomooncake")``. Rank 0 sends, rank 1 receives. Rounds
alternate the two ways (A: the core's ``await peer.send`` on the group's own Peer, timed on the loop
thread; B: ``dist.isend(...).wait()``, timed on the main thread), so drift on a busy machine hits
both alike. Before each transfer a 1-byte exchange lines the ranks up (the receiver then posts its
receive at once), so a timed send covers the rendezvous and the bytes, as a user would see it.

    python scripts/bench_torch_overhead.py                # 64 MiB, 3 rounds x 15 sends each way
    python scripts/bench_torch_overhead.py --mib 256 --rounds 5

Prints per-round medians, the overall medians and their ratio (B / A), and a ``RESULT {json}`` line.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import socket
import statistics
import sys
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

SYNC_TAG, CORE_TAG, TORCH_TAG = 9001, 9002, 9003


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _core_round(peer: Any, rank: int, t: torch.Tensor, iters: int) -> list[float]:
    one = torch.zeros(1, dtype=torch.uint8)
    times = []
    for _ in range(iters):
        if rank == 0:
            await peer.recv(one, SYNC_TAG)
            t0 = time.perf_counter()
            await peer.send(t, CORE_TAG)
            times.append(time.perf_counter() - t0)
        else:
            recv = asyncio.ensure_future(peer.recv(t, CORE_TAG))
            await peer.send(one, SYNC_TAG)
            await recv
    return times


def _torch_round(rank: int, t: torch.Tensor, iters: int) -> list[float]:
    one = torch.zeros(1, dtype=torch.uint8)
    times = []
    for _ in range(iters):
        if rank == 0:
            dist.recv(one, 1, tag=SYNC_TAG)
            t0 = time.perf_counter()
            dist.isend(t, 1, tag=TORCH_TAG).wait()
            times.append(time.perf_counter() - t0)
        else:
            w = dist.irecv(t, 0, tag=TORCH_TAG)
            dist.send(one, 0, tag=SYNC_TAG)
            w.wait()
    return times


def _worker(rank: int, args: argparse.Namespace, port: int) -> None:
    import aiomooncake.torch  # noqa: F401  (registers the backend)

    dist.init_process_group("aiomooncake", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=300))
    pg = dist.group.WORLD
    loop_thread = pg._loop  # type: ignore[union-attr]
    mesh = pg._mesh  # type: ignore[union-attr]
    other = 1 - rank

    async def peer_of() -> Any:
        return await mesh._send[other].ready

    peer = loop_thread.run(peer_of(), 60)
    n = args.mib * 1024 * 1024
    dev = torch.device(args.device)
    if dev.type == "cuda":
        torch.cuda.set_device(0)
    pattern = (torch.arange(n, dtype=torch.int64) % 251).to(torch.uint8)
    t = pattern.to(dev) if rank == 0 else torch.empty(n, dtype=torch.uint8, device=dev)

    # warm-up both paths (registration of the buffers, engine connections)
    loop_thread.run(_core_round(peer, rank, t, args.warmup), 300)
    _torch_round(rank, t, args.warmup)

    core: list[list[float]] = []
    torch_layer: list[list[float]] = []
    for _ in range(args.rounds):
        core.append(loop_thread.run(_core_round(peer, rank, t, args.iters), 600))
        torch_layer.append(_torch_round(rank, t, args.iters))
    if rank == 1:
        ok = torch.equal(t.cpu(), pattern)
        dist.send(torch.tensor([int(ok)]), 0, tag=SYNC_TAG + 10)
    else:
        flag = torch.zeros(1, dtype=torch.int64)
        dist.recv(flag, 1, tag=SYNC_TAG + 10)
        gb = n / 1e9
        print(f"{args.mib} MiB {args.device} tensors, {args.rounds} rounds x {args.iters} sends each way "
              f"(after {args.warmup} warm-up sends each)")
        for i, (a, b) in enumerate(zip(core, torch_layer, strict=True)):
            ma, mb = statistics.median(a), statistics.median(b)
            print(f"  round {i}: core await peer.send {ma * 1e3:8.2f} ms ({gb / ma:5.2f} GB/s)   "
                  f"torch isend+wait {mb * 1e3:8.2f} ms ({gb / mb:5.2f} GB/s)   ratio {mb / ma:.3f}")
        all_a = [x for r in core for x in r]
        all_b = [x for r in torch_layer for x in r]
        ma, mb = statistics.median(all_a), statistics.median(all_b)
        print(f"median: core {ma * 1e3:.2f} ms, torch layer {mb * 1e3:.2f} ms, ratio {mb / ma:.3f} "
              f"({(mb / ma - 1) * 100:+.1f} %); data verified: {bool(flag.item())}")
        print("RESULT " + json.dumps({"mib": args.mib, "device": args.device, "core_ms": ma * 1e3,
                                      "torch_ms": mb * 1e3, "ratio": mb / ma, "round_ratios": [
                                          statistics.median(b) / statistics.median(a)
                                          for a, b in zip(core, torch_layer, strict=True)],
                                      "verified": bool(flag.item())}), flush=True)
    dist.destroy_process_group()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mib", type=int, default=64)
    p.add_argument("--iters", type=int, default=15)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where the tensor lives")
    args = p.parse_args()
    os.environ.setdefault("GLOG_minloglevel", "2")
    mp.spawn(_worker, args=(args, _free_port()), nprocs=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
