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
from aiomooncake import planes

CTX = multiprocessing.get_context("spawn")


def _echo(port_q: Any, opts: dict[str, Any], inline: bool | None) -> None:
    async def serve(peer: aiomooncake.Peer, done: asyncio.Event) -> None:
        async with peer:
            while True:
                try:
                    x = await peer.recv_tensor(tag=0, device="cuda")
                except aiomooncake.PeerClosed:
                    return
                except aiomooncake.AiomooncakeError:  # a message the test made fail: serve on
                    continue
                if x.numel() == 1 and x.dtype == torch.int64 and int(x.item()) == -1:
                    done.set()
                    return
                try:
                    await peer.send(x, tag=0)
                except aiomooncake.PeerClosed:
                    return
                except aiomooncake.AiomooncakeError:
                    continue

    async def main() -> None:
        done = asyncio.Event()
        async with await aiomooncake.listen("127.0.0.1", 0, inline_cuda=inline, **opts) as lst:
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


# An EPLB-like burst: mixed sizes (two weights and two small scales per expert), all in flight.
BURST_SIZES = [1_400_000, 700_000, 7168, 3584] * 16
BURST_ROUNDS = 3


def burst_pattern(side: int, i: int, n: int) -> torch.Tensor:
    return torch.full((n,), (7 * i + 3 * side) % 251, dtype=torch.uint8, device="cuda")


def _burst(port_q: Any) -> None:
    """Exchange BURST_SIZES both ways at once, BURST_ROUNDS times; report how many receives held
    the expected bytes and what this process's engine submitted."""
    async def main() -> None:
        async with await aiomooncake.listen("127.0.0.1", 0) as lst:
            port_q.put(lst.port)
            peer = await lst.accept()
            async with peer:
                outs = [burst_pattern(1, i, n) for i, n in enumerate(BURST_SIZES)]
                ins = [torch.empty(n, dtype=torch.uint8, device="cuda") for n in BURST_SIZES]
                good = 0
                eng = next(e for e in planes.existing() if e.kind == peer.transports["cuda"])
                for _ in range(BURST_ROUNDS):
                    for x in ins:
                        x.zero_()
                    await asyncio.gather(*(peer.recv(x, tag=i) for i, x in enumerate(ins)),
                                         *(peer.send(x, tag=i) for i, x in enumerate(outs)))
                    good += sum(bool(torch.equal(x, burst_pattern(0, i, x.numel())))
                                for i, x in enumerate(ins))
                st = eng.stats()
                await peer.send(torch.tensor([good, st.writes_submitted, st.batches_submitted]), tag=10_000)
                await peer.recv(torch.empty(1), tag=10_001)
    aiomooncake.run(main())


class BurstRemote:
    def __init__(self) -> None:
        self.proc, self.port = _start(_burst)

    def stop(self) -> None:
        _stop(self.proc)


class EchoRemote:
    """``inline``: the remote's ``Options.inline_cuda`` (None: its default)."""

    def __init__(self, inline: bool | None = None, **opts: Any) -> None:
        self.proc, self.port = _start(_echo, opts, inline)

    def stop(self) -> None:
        _stop(self.proc)


def _start(target: Any, *args: Any) -> tuple[Any, int]:
    """Spawn ``target(port_queue, *args)``; return the process and the port it listens on."""
    q = CTX.Queue()
    proc = CTX.Process(target=target, args=(q, *args), daemon=True)
    proc.start()
    port: int = q.get(timeout=120)
    return proc, port


def _stop(proc: Any) -> None:
    proc.join(10)
    if proc.is_alive():
        proc.kill()
        proc.join(5)
