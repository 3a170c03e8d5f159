"""Finding each other through the c10d Store torch already set up: no second store, no extra port
the user must choose.

Every rank listens on a free port of one local address and publishes ``host:port`` under a key of
the group's (prefixed) store; then it reads everyone's. The address is, in order: ``$AIOMOONCAKE_HOST``,
the local address the store's master is reached from (so multi-host jobs pick the interface that
routes to ``MASTER_ADDR``), ``127.0.0.1`` when the master is this host's loopback, and the address
the host name resolves to.

The Transfer Engine segments are not published here: which transport a pair uses (and so which
segment) is negotiated per pair in the connection's handshake, where both segments travel.

The keys carry a generation number so that a group re-created after ``destroy_process_group()`` with
the same name and store never reads the previous incarnation's addresses.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import logging
import os
import socket
from typing import Any

from torch._C._distributed_c10d import HashStore, PrefixStore, Store, TCPStore

log = logging.getLogger(__name__)

_PREFIX = "aiomooncake"


def generation(store: Store, size: int) -> int:
    """The same number on every rank of one incarnation of the group, larger for the next one.

    Every rank adds one to a counter; the ranks of incarnation g all add before any of them can
    finish the address exchange, so no rank of g+1 adds before all of g did."""
    return (int(store.add(f"{_PREFIX}/generation", 1)) - 1) // size


def _underlying(store: Store) -> Store:
    while isinstance(store, PrefixStore):
        store = store.underlying_store
    return store


def master_host(store: Store) -> str | None:
    """The host of the TCPStore master behind ``store``, else $MASTER_ADDR, else None."""
    base = _underlying(store)
    host = getattr(base, "host", None) if isinstance(base, TCPStore) else None
    if isinstance(base, HashStore):
        return "127.0.0.1"  # one process: only loopback makes sense
    return host or os.environ.get("MASTER_ADDR") or None


def _is_loopback(host: str) -> bool:
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    for info in infos:
        try:
            if ipaddress.ip_address(str(info[4][0])).is_loopback:
                return True
        except ValueError:
            continue
    return False


def _route_to(host: str) -> str | None:
    """The local address the kernel would use to reach ``host`` (no packet is sent)."""
    try:
        family = socket.getaddrinfo(host, None)[0][0]
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.connect((host, 9))
            addr = s.getsockname()[0]
    except OSError:
        return None
    return str(addr)


def _hostname_address() -> str:
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"


def choose_host(store: Store, configured: str | None = None) -> str:
    if configured:
        return configured
    env = os.environ.get("AIOMOONCAKE_HOST")
    if env:
        return env
    master = master_host(store)
    if master is not None:
        if _is_loopback(master):
            return "127.0.0.1"
        routed = _route_to(master)
        if routed is not None:
            return routed
    return _hostname_address()


def _key(gen: int, rank: int) -> str:
    return f"{_PREFIX}/{gen}/addr/{rank}"


def publish(store: Store, gen: int, rank: int, host: str, port: int, extra: dict[str, Any]) -> None:
    store.set(_key(gen, rank), json.dumps({"host": host, "port": port, **extra}))


def gather(store: Store, gen: int, size: int, timeout: datetime.timedelta) -> list[dict[str, Any]]:
    """Everyone's published record, rank order; waits at most ``timeout`` for the slowest rank."""
    keys = [_key(gen, r) for r in range(size)]
    store.wait(keys, timeout)
    out = []
    for r, k in enumerate(keys):
        rec = json.loads(store.get(k).decode())
        if not isinstance(rec, dict) or "host" not in rec or "port" not in rec:
            raise RuntimeError(f"aiomooncake: rank {r}'s address record in the store is malformed: {rec!r}")
        out.append(rec)
    return out


__all__ = ["choose_host", "gather", "generation", "master_host", "publish"]
