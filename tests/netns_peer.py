"""A peer process for the namespace tests (tests/netns.py starts it inside a network namespace,
maybe in its own PID namespace too): it does what JSON-line commands on stdin say and answers each
on stdout, with ``time.monotonic()`` of the moment it finished (CLOCK_MONOTONIC is one clock for
every namespace here, so the test compares these times with its own).

Commands run concurrently, one task each, so a test can leave a send and a receive pending while it
cuts the link. Tensors never cross the pipe: both sides rebuild them from a seed
(``harness.pattern``). Receive buffers are filled with a sentinel first and kept by name, so that
the test can ask afterwards whether bytes landed, and whether any landed after the receive failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import logging
import os
import signal
import sys
import time
import traceback
from collections.abc import Awaitable, Callable
from typing import Any

SENTINEL = 0xA5


def _private_stdout() -> Any:
    """The protocol keeps the real stdout; fd 1 goes to stderr, so that nothing the libraries print
    (the Transfer Engine logs natively) can corrupt a reply."""
    fd = os.dup(1)
    os.dup2(2, 1)
    return os.fdopen(fd, "w", buffering=1)


OUT = _private_stdout()


def _die_with_parent() -> None:
    """Never outlive the test process (or the ``unshare`` between it and us)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() == 1 and os.getpid() != 1:  # orphaned before the prctl
        os._exit(1)


_die_with_parent()
logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                    format=f"netns-peer {os.getpid()} %(name)s %(levelname)s: %(message)s")

import torch  # noqa: E402
from harness import pattern  # noqa: E402

import aiomooncake  # noqa: E402
from aiomooncake import planes  # noqa: E402
from aiomooncake.hostid import host_id  # noqa: E402
from aiomooncake.peer import quarantined_bytes  # noqa: E402
from aiomooncake.planes import shm  # noqa: E402


class State:
    def __init__(self) -> None:
        self.listeners: dict[str, aiomooncake.Listener] = {}
        self.peers: dict[str, aiomooncake.Peer] = {}
        self.bufs: dict[str, torch.Tensor] = {}
        self.snapshots: dict[str, torch.Tensor] = {}


def _peer_info(p: aiomooncake.Peer) -> dict[str, Any]:
    return {"data_path": p.data_path, "data_paths": p.data_paths, "address": p.address}


async def _listen(st: State, name: str, host: str, options: dict[str, Any]) -> dict[str, Any]:
    lst = await aiomooncake.listen(host, 0, **options)
    st.listeners[name] = lst
    return {"port": lst.port}


async def _accept(st: State, listener: str, peer: str, close_listener: bool = True) -> dict[str, Any]:
    lst = st.listeners[listener]
    p = await lst.accept()
    if close_listener:
        await lst.close()
        del st.listeners[listener]
    st.peers[peer] = p
    return _peer_info(p)


async def _connect(st: State, peer: str, host: str, port: int, options: dict[str, Any]) -> dict[str, Any]:
    p = await aiomooncake.connect(host, port, **options)
    st.peers[peer] = p
    return _peer_info(p)


async def _send(st: State, peer: str, tag: int, nbytes: int, seed: int,
                device: str = "cpu") -> dict[str, Any]:
    await st.peers[peer].send(pattern(nbytes, seed).to(device), tag)
    return {}


async def _recv(st: State, peer: str, tag: int, nbytes: int, seed: int, buf: str,
                device: str = "cpu") -> dict[str, Any]:
    dest = st.bufs[buf] = torch.full((nbytes,), SENTINEL, dtype=torch.uint8, device=device)
    got = await st.peers[peer].recv(dest, tag)
    return {"match": bool(torch.equal(got.cpu(), pattern(nbytes, seed)))}


async def _landed(st: State, buf: str, probe: int = 1 << 20, tail: bool = False) -> dict[str, Any]:
    """How many of the first (``tail``: last) ``probe`` bytes of ``buf`` differ from the sentinel:
    the engine writes a message front to back, so the head shows a transfer under way and the tail
    one that finished. Cheap: the loop must keep answering pings."""
    t = st.bufs[buf]
    return {"changed": int(((t[-probe:] if tail else t[:probe]) != SENTINEL).sum())}


async def _snapshot(st: State, buf: str) -> dict[str, Any]:
    """Keep a copy of ``buf`` as it is now, for :func:`_unchanged`."""
    st.snapshots[buf] = st.bufs[buf].clone()
    return {}


async def _unchanged(st: State, buf: str) -> dict[str, Any]:
    """Whether ``buf`` still equals its snapshot, and how many bytes differ."""
    a, b = st.bufs[buf], st.snapshots[buf]
    same = bool(torch.equal(a, b))
    return {"same": same, "differ": 0 if same else int((a != b).sum())}


async def _close(st: State, peer: str) -> dict[str, Any]:
    p = st.peers.pop(peer)
    await p.close()
    return {}


async def _info(st: State) -> dict[str, Any]:
    eng = next((p for p in planes.existing() if p.kind == shm.KIND), None)
    return {"pid": os.getpid(), "host_id": host_id(), "netns": os.stat("/proc/self/ns/net").st_ino,
            "pidns": os.stat("/proc/self/ns/pid").st_ino, "shm_pulls": getattr(eng, "pulls", 0),
            "shm": shm.unavailable(), "quarantined": quarantined_bytes()}


async def _drop(st: State, buf: str) -> dict[str, Any]:
    st.bufs.pop(buf, None)
    st.snapshots.pop(buf, None)
    return {}


COMMANDS: dict[str, Callable[..., Awaitable[dict[str, Any]]]] = {
    "listen": _listen, "accept": _accept, "connect": _connect, "send": _send, "recv": _recv,
    "landed": _landed, "snapshot": _snapshot, "unchanged": _unchanged, "close": _close, "info": _info,
    "drop": _drop,
}


def _reply(msg: dict[str, Any]) -> None:
    OUT.write(json.dumps(msg) + "\n")


async def _run(st: State, cmd: dict[str, Any]) -> None:
    cid = cmd.pop("id")
    op = cmd.pop("op")
    try:
        out = await COMMANDS[op](st, **cmd)
    except Exception as e:
        _reply({"id": cid, "ok": False, "t": time.monotonic(), "type": type(e).__name__,
                "mro": [c.__name__ for c in type(e).__mro__], "message": str(e),
                "traceback": "".join(traceback.format_exception(e))})
        return
    _reply({"id": cid, "ok": True, "t": time.monotonic(), **out})


async def main() -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    st = State()
    tasks: set[asyncio.Task[None]] = set()
    _reply({"id": 0, "ok": True, "t": time.monotonic(), "ready": True, "pid": os.getpid()})
    while line := await reader.readline():
        cmd = json.loads(line)
        if cmd.get("op") == "exit":
            break
        task = loop.create_task(_run(st, cmd))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    OUT.flush()
    os._exit(0)  # a peer may still wait for a dead link's engine writes: do not linger over them


if __name__ == "__main__":
    aiomooncake.run(main())
