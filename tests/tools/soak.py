#!/usr/bin/env python3
"""Soak: many messages of mixed sizes through several peer processes, every byte checked.

This process (the hub) connects to ``--peers`` child processes and sends them ``--messages``
messages in total, keeping ``--inflight`` of them outstanding at once across all peers. Every
message has its own tag; its content is a slice of a fixed random block chosen by its index, so
both sides know what it must hold. A child checks what it received, then sends it back; the hub
checks the echo. A message is *lost* if its echo never comes back, *corrupted* if either check
fails. Sizes are mixed: empty (every 997th message), 1 B to 4 KiB (70 %), to 64 KiB (20 %, still
eager), to 1 MiB (9 %, rendezvous) and to 4 MiB (1 %).

Resident memory (RSS) of the hub and of every child is sampled at each percent of progress (from
1 %: before, nothing has moved yet); the growth reported is the mean over the last 10 % of the
samples against the mean over the first 10 %.

    python tests/tools/soak.py --messages 100000 --peers 4 --inflight 1000 --json soak.json

Exit status 0 only if nothing was lost or corrupted and every process grew less than --max-growth.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import random
import signal
import statistics
import subprocess
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch

import aiomooncake

HOST = "127.0.0.1"
BLOCK = 8 << 20
ECHO = 1 << 40  # echo tag = ECHO + message index
log = logging.getLogger("soak")


def block() -> torch.Tensor:
    return torch.randint(0, 256, (BLOCK,), dtype=torch.uint8, generator=torch.Generator().manual_seed(1234))


def content(blk: torch.Tensor, i: int, n: int) -> torch.Tensor:
    """Message ``i``'s bytes: a slice of the block at an offset that depends on ``i``."""
    off = (i * 7919) % (BLOCK - n + 1)
    return blk[off:off + n]


def size_of(i: int, seed: int) -> int:
    if i % 997 == 0:
        return 0  # empty messages too
    r = random.Random(seed * 1_000_003 + i)
    p = r.random()
    if p < 0.70:
        return r.randint(0, 4096)
    if p < 0.90:
        return r.randint(4097, 64 * 1024)
    if p < 0.99:
        return r.randint(64 * 1024 + 1, 1 << 20)
    return r.randint((1 << 20) + 1, 4 << 20)


def rss(pid: int | str = "self") -> int:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# ============================================================================= child
async def _child(index: int, peers: int, total: int, seed: int, window: int, opts: dict[str, Any]) -> None:
    lst = await aiomooncake.listen(HOST, 0, **opts)
    sys.stdout.write(json.dumps({"port": lst.port, "pid": os.getpid()}) + "\n")
    sys.stdout.flush()
    peer = await asyncio.wait_for(lst.accept(), 120)
    await lst.close()
    blk = block()
    mine = list(range(index, total, peers))
    received = corrupted = 0
    echoes: set[asyncio.Task[None]] = set()
    errors: list[str] = []

    async def echo(t: torch.Tensor, i: int) -> None:
        try:
            await peer.send(t, ECHO + i)
        except aiomooncake.AiomooncakeError as e:
            errors.append(f"echo {i}: {type(e).__name__}: {e}")

    async with peer:
        pending: list[tuple[int, asyncio.Future[torch.Tensor]]] = []
        nxt = 0
        while nxt < len(mine) or pending:
            while nxt < len(mine) and len(pending) < window:
                i = mine[nxt]
                pending.append((i, asyncio.ensure_future(peer.recv_tensor(i))))
                nxt += 1
            i, fut = pending.pop(0)
            try:
                t = await fut
            except aiomooncake.AiomooncakeError as e:
                errors.append(f"recv {i}: {type(e).__name__}: {e}")
                break
            received += 1
            if not torch.equal(t, content(blk, i, size_of(i, seed))):
                corrupted += 1
            task = asyncio.ensure_future(echo(t, i))
            echoes.add(task)
            task.add_done_callback(echoes.discard)
        if echoes:
            await asyncio.gather(*echoes)
        await asyncio.sleep(0.2)
    sys.stdout.write(json.dumps({"received": received, "corrupted": corrupted, "errors": errors[:10]}) + "\n")
    sys.stdout.flush()


# ============================================================================= hub
async def _read_json(stream: asyncio.StreamReader, timeout: float) -> dict[str, Any]:
    line = await asyncio.wait_for(stream.readline(), timeout)
    if not line:
        raise RuntimeError("a child exited early")
    return json.loads(line)  # type: ignore[no-any-return]


async def run(args: Any) -> dict[str, Any]:
    opts = json.loads(args.options)
    window = max(1, 2 * args.inflight // args.peers)
    procs: list[asyncio.subprocess.Process] = []
    try:
        for k in range(args.peers):
            procs.append(await asyncio.create_subprocess_exec(
                sys.executable, os.path.abspath(__file__), "--child", str(k), "--peers", str(args.peers),
                "--messages", str(args.messages), "--seed", str(args.seed), "--window", str(window),
                "--options", args.options, stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL if not args.log_dir else
                open(os.path.join(args.log_dir, f"soak-child-{k}.log"), "wb")))  # noqa: SIM115
        hellos = [await _read_json(p.stdout, 180) for p in procs]  # type: ignore[arg-type]
        peers = [await aiomooncake.connect(HOST, h["port"], **opts) for h in hellos]
        pids = [h["pid"] for h in hellos]
        blk = block()
        sem = asyncio.Semaphore(args.inflight)
        stats = {"sent": 0, "echoed": 0, "corrupted": 0, "lost": 0, "max_inflight": 0, "bytes": 0}
        errors: list[str] = []
        inflight = 0
        samples: list[dict[str, float]] = []
        step = max(1, args.messages // 100)

        async def one(i: int) -> None:
            nonlocal inflight
            peer = peers[i % args.peers]
            n = size_of(i, args.seed)
            src = content(blk, i, n)
            try:
                back = asyncio.ensure_future(peer.recv_tensor(ECHO + i))
                await asyncio.wait_for(peer.send(src, i), args.timeout)
                got = await asyncio.wait_for(back, args.timeout)
                stats["echoed"] += 1
                stats["bytes"] += 2 * n
                if not torch.equal(got, src):
                    stats["corrupted"] += 1
            except (aiomooncake.AiomooncakeError, asyncio.TimeoutError) as e:
                stats["lost"] += 1
                if len(errors) < 10:
                    errors.append(f"message {i}: {type(e).__name__}: {e}")
            finally:
                inflight -= 1
                sem.release()

        t0 = time.monotonic()
        tasks: set[asyncio.Task[None]] = set()
        for i in range(args.messages):
            await sem.acquire()
            inflight += 1
            stats["max_inflight"] = max(stats["max_inflight"], inflight)
            stats["sent"] += 1
            t = asyncio.ensure_future(one(i))
            tasks.add(t)
            t.add_done_callback(tasks.discard)
            if i % step == 0 and i:  # from the first percent on: before it nothing had moved yet
                samples.append({"i": i, "t": round(time.monotonic() - t0, 3), "hub": rss(),
                                **{f"child{k}": rss(pid) for k, pid in enumerate(pids)}})
                if i % (step * 10) == 0:
                    log.info("%d/%d messages, %d in flight, hub RSS %.0f MiB", i, args.messages, inflight,
                             samples[-1]["hub"] / 2**20)
        if tasks:
            await asyncio.gather(*tasks)
        elapsed = time.monotonic() - t0
        samples.append({"i": args.messages, "t": round(elapsed, 3), "hub": rss(),
                        **{f"child{k}": rss(pid) for k, pid in enumerate(pids)}})
        for peer in peers:
            await peer.close()
        children = [await _read_json(p.stdout, 60) for p in procs]  # type: ignore[arg-type]
    finally:
        for p in procs:
            if p.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    p.send_signal(signal.SIGKILL)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(p.wait(), 30)

    tenth = max(1, len(samples) // 10)
    growth = {}
    for key in samples[0]:
        if key in ("i", "t"):
            continue
        first = statistics.mean(s[key] for s in samples[:tenth])
        last = statistics.mean(s[key] for s in samples[-tenth:])
        growth[key] = {"first_mib": round(first / 2**20, 1), "last_mib": round(last / 2**20, 1),
                       "growth_pct": round(100 * (last - first) / first, 2)}
    return {
        "messages": args.messages, "peers": args.peers, "inflight_limit": args.inflight,
        "max_inflight": stats["max_inflight"], "echoed": stats["echoed"], "lost": stats["lost"],
        "corrupted_at_hub": stats["corrupted"],
        "received_by_children": sum(c["received"] for c in children),
        "corrupted_at_children": sum(c["corrupted"] for c in children),
        "child_errors": [e for c in children for e in c["errors"]][:10], "errors": errors,
        "seconds": round(elapsed, 1), "messages_per_s": round(args.messages / elapsed),
        "gib_moved": round(stats["bytes"] / 2**30, 2), "rss": growth, "options": opts,
        "samples": samples,
    }


def ok(r: dict[str, Any], max_growth: float) -> list[str]:
    bad = []
    if r["lost"] or r["echoed"] != r["messages"] or r["received_by_children"] != r["messages"]:
        bad.append(f"lost: {r['lost']} (echoed {r['echoed']}, received {r['received_by_children']} of "
                   f"{r['messages']})")
    if r["corrupted_at_hub"] or r["corrupted_at_children"]:
        bad.append(f"corrupted: {r['corrupted_at_hub']} at the hub, {r['corrupted_at_children']} at children")
    for who, g in r["rss"].items():
        if g["growth_pct"] >= max_growth:
            bad.append(f"{who} RSS grew {g['growth_pct']} % (>= {max_growth} %)")
    return bad


def parse_args(argv: list[str] | None = None) -> Any:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--messages", type=int, default=100_000)
    p.add_argument("--peers", type=int, default=4)
    p.add_argument("--inflight", type=int, default=1000, help="messages outstanding across all peers")
    p.add_argument("--seed", type=int, default=3)
    p.add_argument("--timeout", type=float, default=120.0, help="per message; longer counts as lost")
    p.add_argument("--max-growth", type=float, default=5.0, help="percent")
    p.add_argument("--options", default="{}", help="aiomooncake Options as JSON, for every peer")
    p.add_argument("--json")
    p.add_argument("--log-dir")
    p.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--window", type=int, default=500, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main() -> int:
    args = parse_args()
    if args.child is not None:
        with contextlib.suppress(Exception):
            import ctypes

            ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # die with the hub
        aiomooncake.run(_child(args.child, args.peers, args.messages, args.seed, args.window,
                               json.loads(args.options)))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    r = aiomooncake.run(run(args))
    problems = ok(r, args.max_growth)
    short = {k: v for k, v in r.items() if k != "samples"}
    print(json.dumps({**short, "problems": problems}, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**r, "problems": problems}, f, indent=2)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
