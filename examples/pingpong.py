"""Two processes on localhost: ping-pong latency and one-way bandwidth over aiomooncake.

    python examples/pingpong.py                 # CPU tensors, sizes 8 B .. 64 MiB
    python examples/pingpong.py --device cuda   # CUDA tensors (same-host NVLink transport)

The parent process spawns the echo peer, then measures and prints a small table.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import statistics
import time

import torch

import aiomooncake

SIZES = [8, 1024, 64 * 1024, 1 << 20, 16 << 20, 64 << 20]


def echo_peer(port_q: mp.Queue, device: str, sizes: list[int], iters: int) -> None:  # type: ignore[type-arg]
    async def main() -> None:
        async with await aiomooncake.listen("127.0.0.1", 0) as lst:
            port_q.put(lst.port)
            async with await lst.accept() as peer:
                for n in sizes:
                    buf = torch.empty(n, dtype=torch.uint8, device=device)
                    for _ in range(iters):  # ping-pong: echo back
                        await peer.recv(buf, tag=1)
                        await peer.send(buf, tag=2)
                    for _ in range(iters):  # stream: receive, then acknowledge the batch
                        await peer.recv(buf, tag=3)
                    await peer.send(torch.zeros(1), tag=4)
    aiomooncake.run(main())


async def measure(port: int, device: str, sizes: list[int], iters: int) -> list[tuple[int, float, float]]:
    """Per size: (bytes, median round trip in us, messages per second streamed one way)."""
    rows = []
    async with await aiomooncake.connect("127.0.0.1", port) as peer:
        ack = torch.empty(1)
        for n in sizes:
            src = torch.randint(0, 256, (n,), dtype=torch.uint8, device=device)
            back = torch.empty_like(src)
            rtts = []
            for _ in range(iters):
                t = time.perf_counter()
                await peer.send(src, tag=1)
                await peer.recv(back, tag=2)
                rtts.append(time.perf_counter() - t)
            if not torch.equal(src, back):
                raise SystemExit(f"corrupted echo at {n} B")
            t = time.perf_counter()
            await asyncio.gather(*(peer.send(src, tag=3) for _ in range(iters)))
            await peer.recv(ack, tag=4)
            elapsed = time.perf_counter() - t
            rows.append((n, statistics.median(rtts) * 1e6, iters / elapsed))
    return rows


def human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n} {unit}"
        n //= 1024
    return f"{n} TiB"


def scaled(v: float, unit: str) -> str:
    """``v`` with the decimal prefix that leaves 1 to 999 in front (82900 -> '82.9 k<unit>',
    4.2e9 -> '4.20 G<unit>'), so small messages never print as 0.000 GB/s."""
    prefix = ""
    for prefix in ("", "k", "M", "G", "T"):
        if abs(v) < 999.5 or prefix == "T":
            break
        v /= 1000
    digits = 0 if abs(v) >= 99.95 else 1 if abs(v) >= 9.995 else 2
    return f"{v:.{digits}f} {prefix}{unit}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--max-size", type=int, default=64 << 20)
    args = ap.parse_args()
    sizes = [s for s in SIZES if s <= args.max_size]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    proc = ctx.Process(target=echo_peer, args=(q, args.device, sizes, args.iters), daemon=True)
    proc.start()
    try:
        rows = aiomooncake.run(measure(q.get(timeout=60), args.device, sizes, args.iters))
    finally:
        proc.join(30)
        if proc.is_alive():
            proc.kill()
    print(f"aiomooncake {aiomooncake.__version__}: two processes on localhost, {args.device} tensors, "
          f"median of {args.iters}")
    print(f"{'size':>10} | {'round trip (us)':>15} | {'one-way stream':>14} | {'messages/s':>10}")
    print(f"{'-' * 10}-+-{'-' * 15}-+-{'-' * 14}-+-{'-' * 10}")
    for n, rtt, msgs in rows:
        print(f"{human(n):>10} | {rtt:>15.1f} | {scaled(n * msgs, 'B/s'):>14} | {msgs:>10,.0f}")


if __name__ == "__main__":
    main()
