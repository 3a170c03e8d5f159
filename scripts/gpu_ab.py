#!/usr/bin/env python3
"""Paired A/B of this tree's GPU-path switches, the variants alternating in the same two
processes (both on GPU 0, TE intra-node NVLink), so machine drift hits every variant alike.

    source .device/env.sh && python3 scripts/gpu_ab.py [--rounds 5] [--experts 64]

Variants (each both processes at once), against the defaults: "idle marks off" records a CUDA
event on the caller's stream even when it is idle (``tensors.skip_idle`` False), "inline on" sends
small ready CUDA tensors in the frame although the peers share the GPU (``Peer.inline_cuda``).
- EPLB exchange (``--experts`` DeepSeek-V3 experts both ways, 4 tensors each) posted with
  ``asyncio.gather`` of ``send``/``recv``, and through ``Peer.batch()``; every received byte is
  checked once per variant.
- 4 KiB ping-pong round trip.
- 16 x 100 MB streamed: ``gather`` of sends, and ``Peer.batch()``.
- The same EPLB exchange through the torch backend's ``batch_isend_irecv`` (``--no-torch``: not).
Prints per variant the median of each round and the median of those medians.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import statistics
import time
from collections.abc import Awaitable, Callable
from typing import Any

import torch

import aiomooncake as am
from aiomooncake import tensors
from aiomooncake.bench.common import eplb_tensors
from aiomooncake.bench.impls.aiomooncake_async import pingpong_once
from aiomooncake.peer import Peer

MB = 1_000_000
# (iteration, settings, iterations per round, value of one iteration's seconds)
Variant = tuple[Callable[[], Awaitable[float]], dict[str, Any], int, Callable[[float], float]]


def _fill(ts: list[torch.Tensor], side: int) -> None:
    for i, t in enumerate(ts):
        t.fill_((7 * i + 3 * side) % 251)


def _good(ts: list[torch.Tensor], side: int) -> bool:
    return all(bool((t == (7 * i + 3 * side) % 251).all()) for i, t in enumerate(ts))


async def _rank(rank: int, port: int, args: argparse.Namespace, q: Any) -> None:
    if rank == 0:
        lst = await am.listen("127.0.0.1", port)
        peer = await lst.accept()
    else:
        for _ in range(200):
            try:
                peer = await am.connect("127.0.0.1", port)
                break
            except am.PeerClosed:
                await asyncio.sleep(0.05)
    dev = torch.device("cuda", 0)
    out = eplb_tensors(args.experts, 1.0, dev)
    inn = [torch.empty_like(t) for t in out]
    _fill(out, rank)
    small_s = torch.ones(4096, dtype=torch.uint8, device=dev)
    small_r = torch.empty_like(small_s)
    big = torch.ones(100 * MB, dtype=torch.uint8, device=dev)
    bigr = torch.empty_like(big)
    torch.cuda.synchronize()

    async def eplb_gather() -> float:
        t = time.perf_counter()
        await asyncio.gather(*(peer.send(x, tag=100 + i) for i, x in enumerate(out)),
                             *(peer.recv(x, tag=100 + i) for i, x in enumerate(inn)))
        return time.perf_counter() - t

    async def eplb_batch() -> float:
        t = time.perf_counter()
        async with peer.batch() as b:
            for i, x in enumerate(out):
                b.send(x, tag=100 + i)
            for i, x in enumerate(inn):
                b.recv(x, tag=100 + i)
        return time.perf_counter() - t

    async def pingpong() -> float:
        t = time.perf_counter()
        await pingpong_once(peer, rank == 0, small_s, small_r)
        return time.perf_counter() - t

    async def stream_gather() -> float:
        t = time.perf_counter()
        if rank == 0:
            await asyncio.gather(*(peer.send(big, tag=3) for _ in range(16)))
        else:
            await asyncio.gather(*(peer.recv(bigr, tag=3) for _ in range(16)))
        return time.perf_counter() - t

    async def stream_batch() -> float:
        t = time.perf_counter()
        async with peer.batch() as b:
            for _ in range(16):
                if rank == 0:
                    b.send(big, tag=3)
                else:
                    b.recv(bigr, tag=3)
        return time.perf_counter() - t

    eplb_bytes = 2 * sum(t.nbytes for t in out)
    gbps = lambda s: eplb_bytes / s / 1e9  # noqa: E731
    sgbps = lambda s: 16 * big.nbytes / s / 1e9  # noqa: E731
    us = lambda s: s * 1e6  # noqa: E731
    off = {"skip_idle": False}
    inline = {"inline": True}
    variants: dict[str, Variant] = {
        "eplb gather, idle marks off (GB/s)": (eplb_gather, off, 5, gbps),
        "eplb gather (GB/s)": (eplb_gather, {}, 5, gbps),
        "eplb gather, inline on (GB/s)": (eplb_gather, inline, 5, gbps),
        "eplb batch (GB/s)": (eplb_batch, {}, 5, gbps),
        "4 KiB round trip, idle marks off (us)": (pingpong, off, 200, us),
        "4 KiB round trip (us)": (pingpong, {}, 200, us),
        "4 KiB round trip, inline on (us)": (pingpong, inline, 200, us),
        "16 x 100 MB stream, gather, idle marks off (GB/s)": (stream_gather, off, 6, sgbps),
        "16 x 100 MB stream, gather (GB/s)": (stream_gather, {}, 6, sgbps),
        "16 x 100 MB stream, batch (GB/s)": (stream_batch, {}, 6, sgbps),
    }
    res: dict[str, list[float]] = {k: [] for k in variants}
    checked: dict[str, bool] = {}
    for rnd in range(args.rounds + 1):  # round 0 warms up
        for name, (fn, settings, iters, value) in variants.items():
            _apply(settings)
            if name.startswith("eplb") and name not in checked:
                for t in inn:
                    t.zero_()
                torch.cuda.synchronize()
            vals = [value(await fn()) for _ in range(iters)]
            if name.startswith("eplb") and name not in checked:
                torch.cuda.synchronize()
                checked[name] = _good(inn, 1 - rank)
            if rnd:
                res[name].append(statistics.median(vals))
    _apply({})
    if args.profile:
        # where the CPU of each side goes in the default EPLB exchange (cProfile, both processes)
        import cProfile
        import io
        import pstats
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(5):
            await eplb_batch()
        prof.disable()
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(25)
        q.put(("profile", rank, peer._copier, buf.getvalue()))
    await peer.close()
    if rank == 0:
        await lst.close()
        q.put((res, checked))


def _apply(settings: dict[str, Any]) -> None:
    Peer.inline_cuda = settings.get("inline")
    tensors.skip_idle = settings.get("skip_idle", True)


def _torch_part(rank: int, port: int, args: argparse.Namespace, q: Any) -> None:
    """EPLB through the torch backend's batch_isend_irecv, idle marks off and on alternating."""
    import datetime

    import torch.distributed as dist

    import aiomooncake.torch  # noqa: F401  (registers the backend)

    dist.init_process_group("aiomooncake", init_method=f"tcp://127.0.0.1:{port + 1}", rank=rank,
                            world_size=2, timeout=datetime.timedelta(seconds=120))
    dev = torch.device("cuda", 0)
    torch.cuda.set_device(dev)
    out = eplb_tensors(args.experts, 1.0, dev)
    inn = [torch.empty_like(t) for t in out]
    _fill(out, rank)
    torch.cuda.synchronize()
    eplb_bytes = 2 * sum(t.nbytes for t in out)

    def burst() -> float:
        t = time.perf_counter()
        ops = [dist.P2POp(dist.isend, x, 1 - rank) for x in out]
        ops += [dist.P2POp(dist.irecv, x, 1 - rank) for x in inn]
        for w in dist.batch_isend_irecv(ops):
            w.wait()
        torch.cuda.current_stream().synchronize()
        return time.perf_counter() - t

    res: dict[str, list[float]] = {"torch eplb, idle marks off (GB/s)": [], "torch eplb (GB/s)": []}
    good = True
    for rnd in range(args.rounds + 1):
        for name, skip in zip(res, (False, True), strict=True):
            tensors.skip_idle = skip
            vals = [eplb_bytes / burst() / 1e9 for _ in range(5)]
            if rnd:
                res[name].append(statistics.median(vals))
    good = _good(inn, 1 - rank)
    dist.barrier()
    dist.destroy_process_group()
    if rank == 0:
        q.put((res, {name: good for name in res}))


def _main(rank: int, port: int, args: argparse.Namespace, q: Any) -> None:
    am.run(_rank(rank, port, args, q))
    if args.torch:
        _torch_part(rank, port, args, q)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--port", type=int, default=29517)
    ap.add_argument("--profile", action="store_true", help="cProfile 5 EPLB batches in both processes")
    ap.add_argument("--no-torch", dest="torch", action="store_false",
                    help="skip the torch backend part")
    args = ap.parse_args()
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    ps = [ctx.Process(target=_main, args=(r, args.port, args, q)) for r in (0, 1)]
    for p in ps:
        p.start()
    res, checked = None, None
    profiles = []
    while res is None:
        item = q.get(timeout=600)
        if item[0] == "profile":
            profiles.append(item)
        else:
            res, checked = item
    if args.profile:
        while len(profiles) < 2:
            profiles.append(q.get(timeout=120))
    if args.torch:
        more, more_checked = q.get(timeout=600)
        res.update(more)
        checked.update(more_checked)
    for p in ps:
        p.join(60)
    print(f"gpu_ab: {torch.cuda.get_device_name(0)}, {args.rounds} rounds, {args.experts} experts; "
          "per variant: median of each round, then the median of those")
    for _, rank, copier, text in sorted(profiles, key=lambda p: not p[2]):
        print(f"--- profile of rank {rank} ({'the copier' if copier else 'not the copier'}), 5 EPLB batches")
        print("\n".join(text.strip().splitlines()[:40]))
    for name, vals in res.items():
        ok = "" if name not in checked else ("  bytes ok" if checked[name] else "  BYTES WRONG")
        print(f"  {name:50s} {statistics.median(vals):10.1f}   [{', '.join(f'{v:.1f}' for v in vals)}]{ok}")


if __name__ == "__main__":
    main()
