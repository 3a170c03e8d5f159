#!/usr/bin/env python3
"""A/B of the torch backend's ACK policy in the same processes: ACKs held two loop turns (the
core's default towards a sleeping remote) against sent at once (the backend's default).

Two spawned ranks join ``init_process_group("aiomooncake")`` and alternate the setting on their
live connections between rounds (ABBA order), so the machine's drift hits both alike.

    python scripts/ab_torch_acks.py                     # batch_isend_irecv of 256+256 x 7 KiB
    python scripts/ab_torch_acks.py --mode pingpong     # 8 B isend/irecv round trips
    python scripts/ab_torch_acks.py --ops 64 --bytes 65536 --rounds 10

Prints each round's median (ms per batch, or us per round trip) for both settings and the median
of the paired ratios (at once / held; below 1 means sending at once is faster).
"""

from __future__ import annotations

import argparse
import datetime
import socket
import statistics
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _batch(rank: int, out: list[torch.Tensor], inn: list[torch.Tensor]) -> float:
    other = 1 - rank
    ops = [dist.P2POp(dist.isend, t, other) for t in out] + [dist.P2POp(dist.irecv, t, other) for t in inn]
    t0 = time.perf_counter()
    for w in dist.batch_isend_irecv(ops):
        w.wait()
    return (time.perf_counter() - t0) * 1e3


def _pingpong(rank: int, t: torch.Tensor, iters: int) -> float:
    ts = []
    for _ in range(iters):
        t0 = time.perf_counter()
        if rank == 0:
            dist.isend(t, 1).wait()
            dist.irecv(t, 1).wait()
        else:
            dist.irecv(t, 0).wait()
            dist.isend(t, 0).wait()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e6


def _worker(rank: int, args: argparse.Namespace, port: int, q: Any) -> None:
    import aiomooncake.torch  # noqa: F401  (registers the backend)

    dist.init_process_group("aiomooncake", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=300))
    pg = dist.group.WORLD
    loop_thread, mesh = pg._loop, pg._mesh  # type: ignore[union-attr]

    async def peer_of() -> Any:
        return await mesh._send[1 - rank].ready

    peer = loop_thread.run(peer_of(), 60)

    async def set_ack_now(v: bool) -> None:
        peer._conn.ack_now = v

    out = [torch.full((args.bytes,), rank, dtype=torch.uint8) for _ in range(args.ops)]
    inn = [torch.empty(args.bytes, dtype=torch.uint8) for _ in range(args.ops)]
    small = torch.zeros(2)

    def one() -> float:
        if args.mode == "batch":
            return _batch(rank, out, inn)
        return _pingpong(rank, small, 300)

    for _ in range(5):
        one()
    res: dict[bool, list[float]] = {False: [], True: []}
    for r in range(args.rounds):
        for v in (False, True) if r % 2 == 0 else (True, False):
            loop_thread.run(set_ack_now(v), 10)
            dist.barrier()
            res[v].append(statistics.median(one() for _ in range(args.reps)))
    if rank == 0:
        q.put(res)
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mode", choices=("batch", "pingpong"), default="batch")
    ap.add_argument("--ops", type=int, default=256, help="sends (and as many recvs) per batch")
    ap.add_argument("--bytes", type=int, default=7168, help="bytes per tensor in a batch")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--reps", type=int, default=8, help="batches (or 300-trip runs) per round")
    args = ap.parse_args()
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, args, port, q)) for r in range(2)]
    for p in procs:
        p.start()
    res = q.get(timeout=900)
    for p in procs:
        p.join(60)
    unit = "ms per batch" if args.mode == "batch" else "us per round trip"
    for v, label in ((False, "held   "), (True, "at once")):
        xs = res[v]
        print(f"ACKs {label}: {unit} {[round(x, 2) for x in xs]}, median {statistics.median(xs):.2f}")
    ratios = [b / a for a, b in zip(res[False], res[True], strict=True)]
    print(f"paired ratio at once / held: median {statistics.median(ratios):.3f} "
          f"(range {min(ratios):.3f}-{max(ratios):.3f})")


if __name__ == "__main__":
    main()
