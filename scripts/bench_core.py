"""The async core against the raw Transfer Engine, in one run (issue: core speed).

Two processes on loopback; CPU tensors over the engine's TCP transport (host_transport="te", so the
same-host shared-memory path is not used). Alternates, in the same processes and buffers:
  - raw ``TransferEngine.transfer_sync_write`` of N bytes into the receiver's registered buffer,
  - ``await peer.send`` of the same N bytes (the receiver awaiting ``peer.recv``),
and then measures the 8-byte ping-pong round trip. Prints medians and the ratio ours/raw.

    python scripts/bench_core.py [--size 64M] [--iters 9] [--rtt-iters 2000]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import time
from typing import Any

import torch

import aiomooncake
from aiomooncake.engine import Engine

OPTS: dict[str, Any] = {"host_transport": "te", "transport": "tcp"}


def receiver(port_q: Any, n: int, iters: int, rtt_iters: int) -> None:
    async def main() -> None:
        async with await aiomooncake.listen("127.0.0.1", 0, **OPTS) as lst:
            port_q.put(lst.port)
            peer = await lst.accept()
            buf = torch.empty(n, dtype=torch.uint8)
            eng = peer._links["cpu"].engine
            eng.acquire(buf, pin=True)  # the raw baseline writes here too
            await peer.send(torch.tensor([buf.data_ptr()], dtype=torch.int64), tag=100)
            for _ in range(iters):
                await peer.recv(buf, tag=1)
            small = torch.empty(1, dtype=torch.float64)
            await peer.send(small, tag=2)
            for _ in range(rtt_iters):
                await peer.recv(small)
                await peer.send(small)
            await peer.recv(small, tag=3)
            await peer.close()
    aiomooncake.run(main())


def sender(port: int, n: int, iters: int, rtt_iters: int, out: Any) -> None:
    async def main() -> None:
        peer = await aiomooncake.connect("127.0.0.1", port, **OPTS)
        src = torch.randint(0, 256, (n,), dtype=torch.uint8)
        addr = torch.empty(1, dtype=torch.int64)
        await peer.recv(addr, tag=100)
        link = peer._links["cpu"]
        eng: Engine = link.engine
        eng.acquire(src, pin=True)
        raw, ours = [], []
        for _ in range(iters):
            t = time.perf_counter()
            rc = eng.write_sync(link.remote_segment, src.data_ptr(), int(addr[0]), n)
            raw.append(time.perf_counter() - t)
            assert rc == 0, rc
            t = time.perf_counter()
            await peer.send(src, tag=1)
            ours.append(time.perf_counter() - t)
        small = torch.ones(1, dtype=torch.float64)
        await peer.recv(small, tag=2)
        rtts = []
        for _ in range(rtt_iters):
            t = time.perf_counter()
            await peer.send(small)
            await peer.recv(small)
            rtts.append(time.perf_counter() - t)
        await peer.send(small, tag=3)
        await peer.close()
        out.put((statistics.median(raw), statistics.median(ours), statistics.median(rtts), peer.transports))
    aiomooncake.run(main())


def parse_size(s: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(s[:-1]) * units[s[-1].upper()] if s[-1].upper() in units else int(s)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="64M")
    ap.add_argument("--iters", type=int, default=9)
    ap.add_argument("--rtt-iters", type=int, default=2000)
    args = ap.parse_args()
    n = parse_size(args.size)
    ctx = mp.get_context("spawn")
    q, out = ctx.Queue(), ctx.Queue()
    r = ctx.Process(target=receiver, args=(q, n, args.iters, args.rtt_iters))
    r.start()
    s = ctx.Process(target=sender, args=(q.get(timeout=120), n, args.iters, args.rtt_iters, out))
    s.start()
    raw, ours, rtt, transports = out.get(timeout=600)
    s.join(30)
    r.join(30)
    print(f"transports {transports}; {n} B one-way, median of {args.iters}")
    print(f"raw transfer_sync_write: {n / raw / 1e9:.3f} GB/s")
    print(f"await peer.send:         {n / ours / 1e9:.3f} GB/s   ratio ours/raw = {raw / ours:.3f}")
    print(f"8-byte ping-pong round trip: median {rtt * 1e6:.1f} us over {args.rtt_iters}")


if __name__ == "__main__":
    main()
