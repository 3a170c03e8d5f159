"""Separate hosts on one machine for the tests: network namespaces joined by veth pairs
(:class:`aiomooncake.bench.netns.Network`), and peer processes started inside them.

The ``hosts`` fixture (import ``hosts_fixture`` into a test module) gives a :class:`Hosts`:
``hosts.network(n)`` makes ``n`` namespaces on a bridge (each with its own address,
``10.231.<k>.<i>``), ``await hosts.peer(net, i)`` starts ``tests/netns_peer.py`` in host ``i``
(``own_pid_ns=True``: also in new PID, UTS and IPC namespaces, as in a container) and returns an
:class:`NsPeer` that sends it commands. At teardown, whatever the test did, every peer is killed
and every namespace deleted (and at exit, should teardown not run); namespaces left by a dead test
process are swept first. Where namespaces cannot be made (not root, no CAP_SYS_ADMIN, no ``ip``)
the tests skip and say why.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from aiomooncake.bench import netns
from aiomooncake.bench.netns import Network

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
STARTUP_TIMEOUT = 90.0  # importing torch and the engine on a loaded 2-core machine
CALL_TIMEOUT = 60.0


class PeerGone(AssertionError):
    """The peer process exited (or was killed) before answering."""


class CommandFailed(AssertionError):
    """A command raised in the peer; ``reply`` has its type, mro, message and traceback."""

    def __init__(self, reply: dict[str, Any]) -> None:
        super().__init__(f"{reply['type']}: {reply['message']}\n{reply.get('traceback', '')}")
        self.reply = reply


def _die_with_parent() -> None:
    """In the child between fork and exec: die with the test process (kept across the exec of
    ``ip`` and ``unshare``, which are not set-uid)."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class NsPeer:
    """A ``tests/netns_peer.py`` process in a namespace, driven by JSON-line commands."""

    def __init__(self, proc: asyncio.subprocess.Process, host: int, addr: str, label: str) -> None:
        self.proc = proc
        self.host = host
        self.addr = addr
        self.label = label
        self._ids = 0
        self._waiting: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._gone: str | None = None
        self._reader = asyncio.get_running_loop().create_task(self._read())
        self.pid: int = -1  # as the peer sees itself (1 in its own PID namespace)

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        while line := await self.proc.stdout.readline():
            msg = json.loads(line)
            fut = self._waiting.pop(msg["id"], None)
            if fut is not None and not fut.done():
                fut.set_result(msg)
        self._gone = f"{self.label} exited (status {await self.proc.wait()})"
        for fut in self._waiting.values():
            if not fut.done():
                fut.set_exception(PeerGone(self._gone))
                fut.exception()  # whoever awaits it still gets it; nobody need (no warning)
        self._waiting.clear()

    def post(self, op: str, **kw: Any) -> asyncio.Future[dict[str, Any]]:
        """Send a command; the future resolves to its reply (``ok`` False if it raised)."""
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        if self._gone is not None:
            fut.set_exception(PeerGone(self._gone))
            return fut
        self._ids += 1
        self._waiting[self._ids] = fut
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps({"id": self._ids, "op": op, **kw}) + "\n").encode())
        return fut

    async def call(self, op: str, timeout: float = CALL_TIMEOUT, **kw: Any) -> dict[str, Any]:
        """Run a command and return its reply; raises :class:`CommandFailed` if it raised."""
        reply = await asyncio.wait_for(self.post(op, **kw), timeout)
        if not reply["ok"]:
            raise CommandFailed(reply)
        return reply

    async def ready(self) -> None:
        self._waiting[0] = fut = asyncio.get_running_loop().create_future()
        reply = await asyncio.wait_for(fut, STARTUP_TIMEOUT)
        self.pid = reply["pid"]

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()

    async def stop(self) -> None:
        """Ask it to exit, kill it if it does not within a few seconds."""
        if self.proc.returncode is None and self._gone is None:
            with contextlib.suppress(Exception):
                self.post("exit")
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.proc.wait(), 5)
        self.kill()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.proc.wait(), 5)
        self._reader.cancel()


class Hosts:
    """What the ``hosts`` fixture yields: makes networks and peers, and owns them for cleanup."""

    def __init__(self) -> None:
        self.networks: list[Network] = []
        self.peers: list[NsPeer] = []

    def network(self, hosts: int = 2, *, bridge: bool = True) -> Network:
        net = Network(hosts, bridge=bridge)
        self.networks.append(net)
        return net

    async def peer(self, net: Network, i: int, *, own_pid_ns: bool = False,
                   env: dict[str, str] | None = None) -> NsPeer:
        """Start a peer process in host ``i`` of ``net`` and wait until it is ready."""
        if own_pid_ns:
            why = netns.unshare_unavailable()
            if why is not None:
                pytest.skip(f"cannot give a peer its own PID namespace: {why}")
        argv = net.argv(i, [sys.executable, os.path.join(HERE, "netns_peer.py")], own_pid_ns=own_pid_ns)
        pythonpath = os.pathsep.join(p for p in (ROOT, HERE, os.environ.get("PYTHONPATH")) if p)
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": pythonpath, **(env or {})}, preexec_fn=_die_with_parent)
        p = NsPeer(proc, i, net.addrs[i], f"peer in {net.names[i]}")
        self.peers.append(p)
        await p.ready()
        return p

    async def close(self) -> None:
        await asyncio.gather(*(p.stop() for p in self.peers), return_exceptions=True)
        for net in self.networks:
            net.close()


@pytest.fixture(name="hosts")
async def hosts_fixture() -> AsyncIterator[Hosts]:
    """Namespaced hosts and their peers, all removed at teardown; skips where none can be made."""
    why = netns.unavailable()
    if why is not None:
        pytest.skip(f"cannot make network namespaces: {why}")
    netns.sweep()
    h = Hosts()
    try:
        yield h
    finally:
        await h.close()


async def wait_until(cond: Any, timeout: float, step: float = 0.01) -> bool:
    """Await an async predicate until it holds or ``timeout`` seconds passed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await cond():
            return True
        await asyncio.sleep(step)
    return False
