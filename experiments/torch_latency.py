#!/usr/bin/env python3
"""Where the torch layer's small-message round trip goes: gloo against the "aiomooncake" backend,
and the bare cost of one thread hand-off on this machine (the figures in docs/torch.md).

    python experiments/torch_latency.py                      # both backends, 2,000 round trips each
    python experiments/torch_latency.py --backends aiomooncake --iters 600

Two spawned ranks exchange an 8 B CPU tensor (``isend(t).wait(); irecv(t).wait()`` against the
mirror image); rank 0 prints the median round trip after 200 warm-up trips and the median time of
each of its four calls. First it times ``call_soon_threadsafe`` onto an aiomooncake event loop
running in a thread, followed by ``concurrent.futures.Future.result()`` (main -> loop -> main, two
hand-offs: what the torch backend pays per operation). Public API only. For the core's own round
trip next to gloo and the backend, use the benchmark:

    python -m aiomooncake.bench --device cpu --impls aiomooncake,aiomooncake-torch,gloo \
        --modes pingpong --sizes 8
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import socket
import statistics
import threading
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import aiomooncake

WARMUP = 200


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def handoff_us(n: int = 3000) -> float:
    """Median of main -> event-loop thread -> main, as the torch layer does per operation."""
    loop = aiomooncake.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    ts = []
    for _ in range(n):
        f: concurrent.futures.Future[int] = concurrent.futures.Future()
        t0 = time.perf_counter()
        loop.call_soon_threadsafe(f.set_result, 1)
        f.result()
        ts.append(time.perf_counter() - t0)
    loop.call_soon_threadsafe(loop.stop)
    return statistics.median(ts[500:]) * 1e6


def _worker(rank: int, backend: str, port: int, iters: int, q: Any) -> None:
    if backend == "aiomooncake":
        import aiomooncake.torch  # noqa: F401  (registers the backend)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=120))
    t = torch.zeros(2, dtype=torch.float32)
    trips: list[float] = []
    parts: list[tuple[float, float, float, float]] = []
    for _ in range(iters + WARMUP):
        t0 = time.perf_counter()
        if rank == 0:
            w = dist.isend(t, 1)
            ta = time.perf_counter()
            assert w is not None
            w.wait()
            tb = time.perf_counter()
            w = dist.irecv(t, 1)
            tc = time.perf_counter()
            assert w is not None
            w.wait()
            td = time.perf_counter()
            parts.append((ta - t0, tb - ta, tc - tb, td - tc))
        else:
            w = dist.irecv(t, 0)
            assert w is not None
            w.wait()
            w = dist.isend(t, 0)
            assert w is not None
            w.wait()
        trips.append(time.perf_counter() - t0)
    if rank == 0:
        split = [statistics.median(p[i] for p in parts[WARMUP:]) * 1e6 for i in range(4)]
        q.put((statistics.median(trips[WARMUP:]) * 1e6, split))
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--backends", default="gloo,aiomooncake")
    ap.add_argument("--iters", type=int, default=2000)
    args = ap.parse_args()
    print(f"hand-off main -> loop -> main: {handoff_us():.1f} us (median)", flush=True)
    ctx = mp.get_context("spawn")
    for backend in args.backends.split(","):
        q = ctx.Queue()
        port = _free_port()
        procs = [ctx.Process(target=_worker, args=(r, backend, port, args.iters, q)) for r in range(2)]
        for p in procs:
            p.start()
        rtt, split = q.get(timeout=300)
        for p in procs:
            p.join(60)
        print(f"{backend}: round trip {rtt:.1f} us; rank 0's isend / wait / irecv / wait "
              f"{' / '.join(f'{x:.1f}' for x in split)} us", flush=True)


if __name__ == "__main__":
    main()
