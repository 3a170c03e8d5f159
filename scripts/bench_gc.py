#!/usr/bin/env python3
"""The collector pause (aiomooncake.gcpause) on against off: EPLB-shaped bursts (``--experts``
experts both ways at ``--scale``, all in flight) through the async core and through the torch
backend's ``batch_isend_irecv``, CPU tensors on loopback. Each launch runs one setting
(``AIOMOONCAKE_GC_PAUSE``) in two fresh processes; launches alternate on, off, on, off, ...

    python scripts/bench_gc.py                # 3 pairs of launches, 300 batches each
    python scripts/bench_gc.py --pairs 1 --iters 100

Prints per launch the median and mean batch time and the collections per generation (count,
total ms, longest ms) seen by ``gc.callbacks`` in rank 0. ``small``: one-expert bursts (a hold
each), the pause switched on and off every 50 bursts in the same processes (what a hold costs).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import gc
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import torch
import torch.multiprocessing as mp

OPTS: dict[str, Any] = {"shm_eager_threshold": 0, "eager_threshold": 0}  # every message a rendezvous


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _GcWatch:
    def __init__(self) -> None:
        self.pauses: dict[int, list[float]] = {0: [], 1: [], 2: []}
        self._t0 = 0.0

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._t0 = time.perf_counter()
        else:
            self.pauses[info["generation"]].append(time.perf_counter() - self._t0)

    def summary(self) -> str:
        return ", ".join(f"gen{g} {len(v)} / {sum(v) * 1e3:.0f} / {max(v, default=0) * 1e3:.1f}"
                         for g, v in self.pauses.items())


@contextlib.contextmanager
def _watched() -> Iterator[_GcWatch]:
    """Count the collections (after collecting what set-up left) while the block runs."""
    gc.collect()
    watch = _GcWatch()
    gc.callbacks.append(watch)
    try:
        yield watch
    finally:
        gc.callbacks.remove(watch)


def _seconds(fn: Callable[[], None]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _report(path: str, ts: list[float], watch: _GcWatch) -> None:
    label = f"{path} gc pause {os.environ['AIOMOONCAKE_GC_PAUSE']}"
    print(f"{label}: median {statistics.median(ts) * 1e3:.2f} ms, mean {statistics.mean(ts) * 1e3:.2f} ms;"
          f" collections (count / total ms / longest ms): {watch.summary()}", flush=True)


def _tensors(args: argparse.Namespace) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    from aiomooncake.bench.common import eplb_tensors

    out = eplb_tensors(args.experts, args.scale, torch.device("cpu"))
    return out, [torch.empty_like(x) for x in out]


def _pair(rank: int, port: int, opts: dict[str, Any], body: Callable[[Any], Awaitable[None]]) -> None:
    """Connect the two processes (rank 0 listens), run ``body(peer)`` in both, close."""
    import aiomooncake

    async def main() -> None:
        lst = None
        if rank == 0:
            lst = await aiomooncake.listen("127.0.0.1", port, **opts)
            peer = await lst.accept()
        else:
            for _ in range(100):
                try:
                    peer = await aiomooncake.connect("127.0.0.1", port, **opts)
                    break
                except aiomooncake.PeerClosed:
                    await asyncio.sleep(0.1)
        await body(peer)
        await asyncio.sleep(0.2)
        await peer.close()
        if lst is not None:
            await lst.close()
    aiomooncake.run(main())


def _core(rank: int, port: int, args: argparse.Namespace) -> None:
    async def body(peer: Any) -> None:
        out, inn = _tensors(args)

        async def burst() -> None:
            await asyncio.gather(*(peer.send(x, 1) for x in out), *(peer.recv(x, 1) for x in inn))
        for _ in range(5):
            await burst()
        ts: list[float] = []
        with _watched() as watch:
            for _ in range(args.iters):
                t = time.perf_counter()
                await burst()
                ts.append(time.perf_counter() - t)
        if rank == 0:
            _report("core ", ts, watch)
    _pair(rank, port, OPTS, body)


def _small(rank: int, port: int, args: argparse.Namespace) -> None:
    """Small bursts (one expert: 8 operations in flight, a hold each), the pause switched on and
    off every 50 bursts in the same processes: what a hold itself costs."""
    from aiomooncake import gcpause
    from aiomooncake.bench.common import eplb_tensors

    async def body(peer: Any) -> None:
        out = eplb_tensors(1, 0.0625, torch.device("cpu"))
        inn = [torch.empty_like(x) for x in out]
        res: dict[bool, list[float]] = {True: [], False: []}
        for block in range(-1, 40):
            gcpause.enabled = block % 2 == 0
            for _ in range(50):
                t = time.perf_counter()
                await asyncio.gather(*(peer.send(x, 1) for x in out), *(peer.recv(x, 1) for x in inn))
                if block >= 0:
                    res[gcpause.enabled].append(time.perf_counter() - t)
        if rank == 0:
            print("small bursts (1 expert, scale 0.0625), median / mean ms: pause on "
                  f"{statistics.median(res[True]) * 1e3:.3f} / {statistics.mean(res[True]) * 1e3:.3f}, off "
                  f"{statistics.median(res[False]) * 1e3:.3f} / {statistics.mean(res[False]) * 1e3:.3f}",
                  flush=True)
    _pair(rank, port, {}, body)


def _torch(rank: int, port: int, args: argparse.Namespace) -> None:
    import torch.distributed as dist

    import aiomooncake.torch  # noqa: F401  (registers the backend)

    dist.init_process_group("aiomooncake", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=120))
    out, inn = _tensors(args)
    other = 1 - rank

    def burst() -> None:
        ops = [dist.P2POp(dist.isend, x, other) for x in out]
        ops += [dist.P2POp(dist.irecv, x, other) for x in inn]
        for w in dist.batch_isend_irecv(ops):
            w.wait()
    for _ in range(5):
        burst()
    with _watched() as watch:
        ts = [_seconds(burst) for _ in range(args.iters)]
    if rank == 0:
        _report("torch", ts, watch)
    dist.barrier()
    dist.destroy_process_group()


def _child(args: argparse.Namespace) -> None:
    target = {"core": _core, "torch": _torch, "small": _small}[args.child]
    mp.spawn(target, args=(_port(), args), nprocs=2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--scale", type=float, default=0.001)
    ap.add_argument("--iters", type=int, default=300)
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--parts", default="core,torch,small")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        _child(args)
        return
    for part in args.parts.split(","):
        if part == "small":  # switched inside the processes
            for _ in range(args.pairs):
                subprocess.run([sys.executable, __file__, "--child", "small"], check=True,
                               env={**os.environ, "AIOMOONCAKE_GC_PAUSE": "1"})
            continue
        for _ in range(args.pairs):
            for setting in ("1", "0"):
                cmd = [sys.executable, __file__, "--child", part, "--experts", str(args.experts),
                       "--scale", str(args.scale), "--iters", str(args.iters)]
                subprocess.run(cmd, check=True, env={**os.environ, "AIOMOONCAKE_GC_PAUSE": setting})


if __name__ == "__main__":
    main()
