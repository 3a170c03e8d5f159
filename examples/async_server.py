"""An asyncio service that receives tensors from several clients and answers each one.

The server accepts any number of peers; for each it loops: ``recv_tensor`` (shape and dtype come
from the sender), computes a reply (here: the tensor's per-row sum, as float64), sends it back.
Clients run concurrently in their own processes.

    python examples/async_server.py --clients 4 --requests 50
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import multiprocessing as mp
import time

import torch

import aiomooncake

log = logging.getLogger("async_server")


async def serve_peer(peer: aiomooncake.Peer, stats: dict[str, int]) -> None:
    async with peer:
        while True:
            try:
                x = await peer.recv_tensor(tag=1)
            except aiomooncake.PeerClosed:
                return  # the client said goodbye
            reply = x.to(torch.float64).reshape(x.shape[0], -1).sum(dim=1)
            await peer.send(reply, tag=2)
            stats["requests"] += 1


async def server(port_q: mp.Queue, clients: int) -> None:  # type: ignore[type-arg]
    stats = {"requests": 0}
    async with await aiomooncake.listen("127.0.0.1", 0) as lst:
        port_q.put(lst.port)
        tasks = [asyncio.create_task(serve_peer(await lst.accept(), stats)) for _ in range(clients)]
        await asyncio.gather(*tasks)
    log.info("served %d requests from %d clients", stats["requests"], clients)


def client(port: int, idx: int, requests: int, out: mp.Queue) -> None:  # type: ignore[type-arg]
    async def main() -> None:
        gen = torch.Generator().manual_seed(idx)
        async with await aiomooncake.connect("127.0.0.1", port) as peer:
            t = time.perf_counter()
            for i in range(requests):
                rows = 1 + (i * 7 + idx) % 64
                x = torch.randn(rows, 1024, generator=gen, dtype=torch.float32)
                await peer.send(x, tag=1)
                got = await peer.recv_tensor(tag=2)
                want = x.to(torch.float64).sum(dim=1)
                if not torch.allclose(got, want):
                    raise SystemExit(f"client {idx}: wrong answer at request {i}")
            out.put((idx, requests, time.perf_counter() - t))
    aiomooncake.run(main())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--requests", type=int, default=50)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    ctx = mp.get_context("spawn")
    port_q, out = ctx.Queue(), ctx.Queue()

    async def run_all() -> None:
        srv = asyncio.create_task(server(port_q, args.clients))
        port = await asyncio.get_running_loop().run_in_executor(None, port_q.get, True, 60)
        procs = [ctx.Process(target=client, args=(port, i, args.requests, out)) for i in range(args.clients)]
        for p in procs:
            p.start()
        await srv
        for p in procs:
            p.join(30)
        for _ in procs:
            idx, n, secs = out.get(timeout=5)
            print(f"client {idx}: {n} requests answered correctly, {secs / n * 1e3:.2f} ms per request")

    aiomooncake.run(run_all())


if __name__ == "__main__":
    main()
