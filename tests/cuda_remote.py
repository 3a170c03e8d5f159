"""The remote side of the CUDA tests: a spawned process that echoes CUDA tensors back.

For every message it receives (``recv_tensor`` onto the GPU) it sends the same tensor back with
the same tag; tag -1 ends the session. Kept apart from the CPU harness so the CUDA tests stay small
and need nothing but a GPU.
"""

from __future__ import annotations

import asyncio
import multiprocessing
from typing import Any

import torch

import aiomooncake

CTX = multiprocessing.get_context("spawn")


def _echo(port_q: Any, opts: dict[str, Any]) -> None:
    async def serve(peer: aiomooncake.Peer, done: asyncio.Event) -> None:
        async with peer:
            while True:
                try:
                    x = await peer.recv_tensor(tag=0, device="cuda")
                except aiomooncake.PeerClosed:
                    return
                if x.numel() == 1 and x.dtype == torch.int64 and int(x.item()) == -1:
                    done.set()
                    return
                await peer.send(x, tag=0)

    async def main() -> None:
        done = asyncio.Event()
        async with await aiomooncake.listen("127.0.0.1", 0, **opts) as lst:
            port_q.put(lst.port)
            tasks = set()
            while not done.is_set():
                acc = asyncio.ensure_future(lst.accept())
                fin = asyncio.ensure_future(done.wait())
                await asyncio.wait({acc, fin}, return_when=asyncio.FIRST_COMPLETED)
                if acc.done():
                    tasks.add(asyncio.ensure_future(serve(acc.result(), done)))
                else:
                    acc.cancel()
                fin.cancel()
    aiomooncake.run(main())


class EchoRemote:
    def __init__(self, **opts: Any) -> None:
        q = CTX.Queue()
        self.proc = CTX.Process(target=_echo, args=(q, opts), daemon=True)
        self.proc.start()
        self.port: int = q.get(timeout=120)

    def stop(self) -> None:
        self.proc.join(10)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)
