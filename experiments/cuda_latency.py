"""Small-message round trip between two processes on one GPU, for each setting of
``Options.inline_cuda``, alternating in the same two processes (one connection per setting).

    python experiments/cuda_latency.py --bytes 4096 --trips 300 --rounds 3

Public API only. Prints the median round trip per setting and round.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import statistics
import time
from typing import Any

import torch

import aiomooncake

SETTINGS: dict[str, bool | None] = {"default": None, "never-inline": False, "always-inline": True}


async def _serve(q: Any) -> None:
    listeners = {name: await aiomooncake.listen("127.0.0.1", 0, inline_cuda=v)
                 for name, v in SETTINGS.items()}
    q.put({name: lst.port for name, lst in listeners.items()})

    async def echo(lst: aiomooncake.Listener) -> None:
        async with await lst.accept() as peer:
            while True:
                try:
                    x = await peer.recv_tensor(tag=0, device="cuda")
                except aiomooncake.PeerClosed:
                    return
                await peer.send(x, tag=0)

    await asyncio.gather(*(echo(lst) for lst in listeners.values()))


def _server(q: Any) -> None:
    aiomooncake.run(_serve(q))


async def _client(ports: dict[str, int], args: argparse.Namespace) -> None:
    peers = {name: await aiomooncake.connect("127.0.0.1", ports[name], inline_cuda=SETTINGS[name])
             for name in SETTINGS}
    x = torch.randint(0, 256, (args.bytes,), dtype=torch.uint8, device="cuda")
    back = torch.empty_like(x)
    torch.cuda.synchronize()
    for r in range(args.rounds):
        for name, peer in peers.items():
            for _ in range(20):
                await peer.send(x, tag=0)
                await peer.recv(back, tag=0)
            times = []
            for _ in range(args.trips):
                t0 = time.perf_counter()
                await peer.send(x, tag=0)
                await peer.recv(back, tag=0)
                times.append(time.perf_counter() - t0)
            assert torch.equal(back, x)
            print(f"round {r} {name:14s} ({peer.data_path}): median {statistics.median(times) * 1e6:.0f} us",
                  flush=True)
    for peer in peers.values():
        await peer.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bytes", type=int, default=4096)
    p.add_argument("--trips", type=int, default=300)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    srv = ctx.Process(target=_server, args=(q,), daemon=True)
    srv.start()
    aiomooncake.run(_client(q.get(timeout=120), args))
    srv.join(10)
    if srv.is_alive():
        srv.kill()


if __name__ == "__main__":
    main()
