#!/usr/bin/env python3
"""Kill -9 (or freeze) a peer in the middle of a transfer, again and again, and check the survivor.

Each trial runs between this process (the *survivor*) and a fresh *victim* process:

``receiver``  the survivor sends a large message; the victim, receiving it, is SIGKILLed mid-transfer.
``sender``    the victim sends a large message; the survivor is receiving it when the victim is
              SIGKILLed. The survivor's destination must not change after its recv failed.
``hang``      as ``sender``, but the victim is SIGSTOPped (alive, silent: what a hung process or a
              host that vanished from the network looks like), then woken (SIGCONT) and killed.
              Whether bytes landed after the wake-up is reported (one-sided writes the sleeper's
              engine had in flight cannot be revoked by the receiver; see docs/reliability.md).

For each trial the script records how long the survivor took to fail the pending operation (and to
mark the peer closed), then checks that the survivor still works: echo round trips of mixed sizes
with a *bystander* peer connected for the whole run, and with a restarted victim, listening on the
same port as the killed one (same identity) on even trials and on a new port on odd ones. Every
round trip compares the bytes that came back with the bytes sent. Children are always reaped.

    python tests/tools/stress_kill.py --trials 50 --kinds receiver,sender
    python tests/tools/stress_kill.py --trials 20 --kinds hang --json out.json

The default options are used unless given (heartbeat 0.5 s / 2 s), so detection times are those a
user gets. Exit status 0 only if every trial met every check.
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
from dataclasses import asdict, dataclass, field
from typing import Any

# Test the checkout this script lives in, whatever the environment has installed.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch

import aiomooncake
from aiomooncake import planes

HOST = "127.0.0.1"
MiB = 1 << 20
SENTINEL = 0xA5
FILL = 0x3C
BIG_TAG, ECHO_IN, ECHO_OUT = 7, 1, 2
log = logging.getLogger("stress_kill")


# =============================================================================== child side
def _die_with_parent() -> None:
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


async def _child_main() -> None:
    """Read one JSON command per line on stdin, answer JSON events on stdout."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)

    def emit(**ev: Any) -> None:
        sys.stdout.write(json.dumps(ev) + "\n")
        sys.stdout.flush()

    emit(ev="ready", pid=os.getpid())
    while True:
        line = await reader.readline()
        if not line:
            return
        cmd = json.loads(line)
        lst = await aiomooncake.listen(HOST, cmd["port"], **cmd.get("options", {}))
        emit(ev="listening", port=lst.port)
        try:
            peer = await asyncio.wait_for(lst.accept(), 60)
        finally:
            await lst.close()
        job = cmd["job"]
        try:
            if job == "recv_big":
                dest = torch.empty(cmd["nbytes"], dtype=torch.uint8)
                await peer.recv(dest, BIG_TAG)
                emit(ev="done", ok=True)
            elif job == "send_big":
                await peer.send(torch.full((cmd["nbytes"],), FILL, dtype=torch.uint8), BIG_TAG)
                emit(ev="done", ok=True)
            elif job == "echo":
                n = 0
                with contextlib.suppress(aiomooncake.PeerClosed):
                    while cmd.get("count") is None or n < cmd["count"]:
                        t = await peer.recv_tensor(ECHO_IN)
                        await peer.send(t, ECHO_OUT)
                        n += 1
                emit(ev="done", ok=True, echoed=n)
        except Exception as e:
            emit(ev="done", ok=False, error=f"{type(e).__name__}: {e}")
        finally:
            await peer.close()


# =============================================================================== parent side
class Child:
    """A victim or bystander process, started ahead of use (importing torch takes a while)."""

    def __init__(self, log_dir: str | None) -> None:
        self.log_dir = log_dir
        self.proc: asyncio.subprocess.Process | None = None
        self.port = 0
        self.inbox: list[dict[str, Any]] = []

    async def start(self) -> Child:
        err: Any = subprocess.DEVNULL
        if self.log_dir:
            err = open(os.path.join(self.log_dir, f"child-{time.monotonic_ns()}.log"), "wb")  # noqa: SIM115
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, os.path.abspath(__file__), "--child", stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=err, preexec_fn=_die_with_parent)
        if err is not subprocess.DEVNULL:
            err.close()
        await self.event("ready", 120)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    async def event(self, kind: str, timeout: float = 60) -> dict[str, Any]:
        assert self.proc is not None and self.proc.stdout is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            for i, ev in enumerate(self.inbox):
                if ev["ev"] == kind:
                    return self.inbox.pop(i)
            line = await asyncio.wait_for(self.proc.stdout.readline(), max(0.01, deadline - loop.time()))
            if not line:
                raise RuntimeError(f"child {self.pid} exited (code {self.proc.returncode}) before {kind!r}")
            self.inbox.append(json.loads(line))

    async def serve(self, job: str, port: int = 0, **kw: Any) -> int:
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write((json.dumps({"job": job, "port": port, **kw}) + "\n").encode())
        await self.proc.stdin.drain()
        self.port = (await self.event("listening"))["port"]
        return self.port

    def signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, sig)

    async def reap(self) -> None:
        """Kill (if need be) and wait for the process: no zombie, no orphan."""
        if self.proc is None:
            return
        if self.proc.returncode is None:
            self.signal(signal.SIGCONT)
            self.signal(signal.SIGKILL)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.proc.wait(), 30)
        self.proc = None


class Pool:
    """Keeps one victim warmed up ahead of the trial that needs it."""

    def __init__(self, log_dir: str | None) -> None:
        self.log_dir = log_dir
        self.next: asyncio.Task[Child] | None = None
        self.all: list[Child] = []

    def _spawn(self) -> asyncio.Task[Child]:
        c = Child(self.log_dir)
        self.all.append(c)
        return asyncio.ensure_future(c.start())

    async def take(self) -> Child:
        task = self.next or self._spawn()
        self.next = self._spawn()
        return await task

    async def close(self) -> None:
        if self.next is not None:
            self.next.cancel()
            with contextlib.suppress(BaseException):
                await self.next
        await asyncio.gather(*(c.reap() for c in self.all))


def writes_submitted() -> int:
    return sum(e.stats().writes_submitted for e in planes.existing())


async def wait_until(pred: Any, timeout: float, interval: float = 0.001) -> bool:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(interval)
    return True


def mixed_sizes(rng: random.Random, n: int) -> list[int]:
    """Sizes from empty through eager to rendezvous (up to 4 MiB)."""
    choices = [0, 1, 7, 512, 4096, 60_000, 65_536, 65_537, 300_000, 1 << 20, 4 << 20]
    return [rng.choice(choices) for _ in range(n)]


async def echo_check(peer: aiomooncake.Peer, sizes: list[int], seed: int) -> tuple[int, int]:
    """Round trip every size, pipelined four at a time; return (ok, corrupted)."""
    g = torch.Generator().manual_seed(seed)
    ok = bad = 0
    for i in range(0, len(sizes), 4):
        batch = [torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g) for n in sizes[i:i + 4]]
        # Receives posted first: a send returns only once its message is received, and the echo
        # sends each message back before it receives the next.
        backs = [asyncio.ensure_future(peer.recv_tensor(ECHO_OUT)) for _ in batch]
        for t in batch:
            await asyncio.wait_for(peer.send(t, ECHO_IN), 30)
        for t, fut in zip(batch, backs, strict=True):
            back = await asyncio.wait_for(fut, 30)
            if back.dtype == t.dtype and torch.equal(back, t):
                ok += 1
            else:
                bad += 1
    return ok, bad


@dataclass
class Trial:
    kind: str
    index: int
    missed: bool = False  # the transfer finished before the kill landed (not counted)
    error: str = ""  # the exception the pending operation failed with
    detect_s: float = -1.0  # signal -> pending operation failed
    closed_s: float = -1.0  # signal -> peer.closed
    late_bytes: bool = False  # the destination changed after the recv had failed
    completed: bool = False  # the receive finished (with every byte right) despite the signal
    bystander_ok: int = 0
    bystander_bad: int = 0
    restart_same_port: bool = False
    restart_ok: int = 0
    restart_bad: int = 0
    problems: list[str] = field(default_factory=list)


async def _fail_pending(trial: Trial, fut: asyncio.Future[Any], peer: aiomooncake.Peer, t0: float,
                        limit: float, whole: Any = None) -> None:
    try:
        await asyncio.wait_for(fut, limit)
        if whole is not None and whole():
            # A receive may legitimately finish after the signal: on the same-host path the
            # receiver pulls the bytes itself, which works from a stopped process and races a
            # dying one. Every byte must then be the sender's.
            trial.completed = True
            return
        trial.problems.append("the pending operation succeeded after the kill")
    except asyncio.TimeoutError:
        trial.problems.append(f"HANG: the pending operation did not fail within {limit:g} s")
        return
    except aiomooncake.AiomooncakeError as e:
        trial.detect_s = time.monotonic() - t0
        trial.error = type(e).__name__
    if await wait_until(lambda: peer.closed, limit):
        trial.closed_s = time.monotonic() - t0
    else:
        trial.problems.append(f"the peer was not marked closed within {limit:g} s")


async def one_trial(kind: str, index: int, pool: Pool, bystander: aiomooncake.Peer, args: Any,
                    rng: random.Random) -> Trial:
    trial = Trial(kind, index)
    opts = json.loads(args.options)
    nbytes = args.size * MiB
    slow = {"chunk_bytes": args.chunk, "window": 1}
    victim = await pool.take()
    log.debug("%s #%d: victim %d ready", kind, index, victim.pid)
    try:
        if kind == "receiver":
            port = await victim.serve("recv_big", nbytes=nbytes, options=opts)
            peer = await aiomooncake.connect(HOST, port, **{**opts, **slow})
            src = torch.full((nbytes,), FILL, dtype=torch.uint8)
            w0 = writes_submitted()
            at = rng.randint(2, max(2, nbytes // args.chunk // 2))  # kill after this many writes
            op: asyncio.Future[Any] = asyncio.ensure_future(peer.send(src, BIG_TAG))
            if peer.transports.get("cpu") == "shm":
                # the receiver pulls the bytes itself (nothing to count here): kill it a moment in
                await asyncio.sleep(rng.uniform(0.002, 0.006))
            else:
                await wait_until(lambda: writes_submitted() - w0 >= at or op.done(), 30)
        else:
            port = await victim.serve("send_big", nbytes=nbytes, options={**opts, **slow})
            peer = await aiomooncake.connect(HOST, port, **opts)
            dest = torch.full((nbytes,), SENTINEL, dtype=torch.uint8)
            at = rng.randint(0, max(0, nbytes // args.chunk // 2)) * args.chunk  # kill once this landed
            op = asyncio.ensure_future(peer.recv(dest, BIG_TAG))
            await wait_until(lambda: int(dest[at]) != SENTINEL or op.done(), 30)
        log.debug("%s #%d: transfer under way; signalling %d", kind, index, victim.pid)
        if op.done():
            trial.missed = True
            with contextlib.suppress(BaseException):
                op.result()
            await peer.close()
            return trial
        t0 = time.monotonic()
        victim.signal(signal.SIGSTOP if kind == "hang" else signal.SIGKILL)
        whole = None if kind == "receiver" else (lambda: bool((dest == FILL).all()))
        await _fail_pending(trial, op, peer, t0, args.limit, whole)
        if trial.completed and kind == "hang":
            victim.signal(signal.SIGCONT)
        log.debug("%s #%d: pending op failed (%s) after %.3f s", kind, index, trial.error, trial.detect_s)
        if kind != "receiver" and not trial.completed:
            # Nothing may land in the destination once its recv has failed.
            before = dest.clone()
            await asyncio.sleep(args.settle)
            if kind == "hang":
                victim.signal(signal.SIGCONT)  # the frozen sender wakes up: its engine resumes
                await asyncio.sleep(args.settle)
            trial.late_bytes = not torch.equal(before, dest)
            del before
        await peer.close()
        await victim.reap()
    finally:
        await victim.reap()

    log.debug("%s #%d: checking the survivor", kind, index)
    # The survivor keeps working with the peer it already had...
    trial.bystander_ok, trial.bystander_bad = await echo_check(
        bystander, mixed_sizes(rng, args.echoes), seed=index)
    # ... and with a restarted victim, at the same address or a new one.
    trial.restart_same_port = index % 2 == 0
    again = await pool.take()
    try:
        port2 = await again.serve("echo", port=port if trial.restart_same_port else 0,
                                  count=args.echoes, options=opts)
        peer2 = await aiomooncake.connect(HOST, port2, **opts)
        async with peer2:
            trial.restart_ok, trial.restart_bad = await echo_check(
                peer2, mixed_sizes(rng, args.echoes), seed=10_000 + index)
        await again.event("done", 30)
    finally:
        await again.reap()
    if trial.late_bytes and kind != "hang":
        # A frozen sender that wakes up finishes the writes its engine had in flight (one-sided
        # writes cannot be revoked by the receiver): measured and reported, not a failure here.
        trial.problems.append("bytes landed in the destination after its recv had failed")
    if trial.bystander_bad or trial.restart_bad or trial.bystander_ok < args.echoes \
            or trial.restart_ok < args.echoes:
        trial.problems.append("a survivor round trip was lost or corrupted")
    return trial


def summarize(trials: list[Trial]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kind in sorted({t.kind for t in trials}):
        ts = [t for t in trials if t.kind == kind]
        done = [t for t in ts if not t.missed]
        det = sorted(t.detect_s for t in done if t.detect_s >= 0)
        closed = sorted(t.closed_s for t in done if t.closed_s >= 0)

        def stats(xs: list[float]) -> dict[str, float]:
            if not xs:
                return {}
            return {"min": round(min(xs), 4), "median": round(statistics.median(xs), 4),
                    "p95": round(xs[min(len(xs) - 1, int(0.95 * len(xs)))], 4), "max": round(max(xs), 4)}

        errors: dict[str, int] = {}
        for t in done:
            errors[t.error or "none"] = errors.get(t.error or "none", 0) + 1
        out[kind] = {
            "trials": len(ts), "missed": len(ts) - len(done),
            "detect_s": stats(det), "closed_s": stats(closed), "errors": errors,
            "hangs": sum(any(p.startswith("HANG") for p in t.problems) for t in done),
            "late_bytes": sum(t.late_bytes for t in done),  # for "hang": after the sender woke up
            "completed": sum(t.completed for t in done),  # receives that finished, every byte right
            "bystander_roundtrips": sum(t.bystander_ok for t in ts),
            "bystander_corrupted_or_lost": sum(t.bystander_bad for t in ts),
            "restart_roundtrips": sum(t.restart_ok for t in ts),
            "restart_corrupted_or_lost": sum(t.restart_bad for t in ts),
            "restarts_same_port": sum(t.restart_same_port for t in ts),
            "failed_trials": sum(bool(t.problems) for t in ts),
        }
    return out


def _dump_tasks() -> None:
    for t in asyncio.all_tasks():
        t.print_stack(file=sys.stderr)


async def run(args: Any) -> dict[str, Any]:
    asyncio.get_running_loop().add_signal_handler(signal.SIGUSR2, _dump_tasks)
    rng = random.Random(args.seed)
    pool = Pool(args.log_dir)
    trials: list[Trial] = []
    opts = json.loads(args.options)
    by = Child(args.log_dir)
    try:
        await by.start()
        by_port = await by.serve("echo", options=opts)
        bystander = await aiomooncake.connect(HOST, by_port, **opts)
        kinds = args.kinds.split(",")
        for i in range(args.trials):
            for kind in kinds:
                t = await one_trial(kind, i, pool, bystander, args, rng)
                trials.append(t)
                log.info("%s #%d: %s detect=%.3fs closed=%.3fs late=%s by=%d/%d restart=%d/%d %s",
                         kind, i, "missed" if t.missed else t.error, t.detect_s, t.closed_s,
                         t.late_bytes, t.bystander_ok, t.bystander_bad, t.restart_ok, t.restart_bad,
                         "; ".join(t.problems))
        await bystander.close()
    finally:
        await pool.close()
        await by.reap()
    return {"summary": summarize(trials), "trials": [asdict(t) for t in trials],
            "args": {k: v for k, v in vars(args).items()}}


def parse_args(argv: list[str] | None = None) -> Any:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=50, help="trials per kind")
    p.add_argument("--kinds", default="receiver,sender", help="receiver,sender,hang")
    p.add_argument("--size", type=int, default=64, help="MiB in the killed transfer")
    p.add_argument("--chunk", type=int, default=64 * 1024, help="engine request size of that transfer")
    p.add_argument("--settle", type=float, default=0.5, help="how long to watch for late bytes (s)")
    p.add_argument("--limit", type=float, default=10.0, help="longer than this to fail = a hang (s)")
    p.add_argument("--echoes", type=int, default=12, help="round trips per survivor check")
    p.add_argument("--options", default="{}", help="aiomooncake Options as JSON, for every peer")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--json", help="write the summary and every trial here")
    p.add_argument("--log-dir", help="keep the children's stderr here")
    p.add_argument("-v", "--verbose", action="store_true")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main() -> int:
    args = parse_args()
    if args.child:
        aiomooncake.run(_child_main())
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    log.setLevel(logging.DEBUG if args.verbose else logging.INFO)
    import faulthandler

    faulthandler.register(signal.SIGUSR1)
    result = aiomooncake.run(run(args))
    print(json.dumps(result["summary"], indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0 if all(s["failed_trials"] == 0 for s in result["summary"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
