"""The versioned handshake: agree on the protocol version and the data-plane links.

::

    client                                   server
      HELLO {version, caps, transport, host} ->
                                             <- WELCOME {version, links, segments} | REFUSE {reason}
      READY {segments}                       ->

Engines are created only once both sides agreed on the transports, and each side learns the
other's engine segment name for every link.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Any

from ..core.messages import PROTOCOL_VERSION, Hello, Ready, Refuse, Welcome
from ..core.negotiation import plan_links
from ..engine import Engine, capabilities
from ..errors import HandshakeError, ProtocolError
from ..options import Options
from .connection import Connection


@dataclass(frozen=True)
class Link:
    name: str  # "cpu" or "cuda"
    transport: str
    engine: Engine
    remote_segment: str


@dataclass(frozen=True)
class Agreement:
    links: dict[str, Link]
    remote: dict[str, Any]


def host_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = ""
    return f"{socket.gethostname()}/{boot}"


def _local_info(options: Options) -> dict[str, Any]:
    return {"caps": capabilities(), "transport": options.transport, "host_id": host_id(),
            "pid": os.getpid(), "max_frame": options.max_frame}


async def _engines(plan: dict[str, str], host: str) -> dict[str, Engine]:
    return {t: await Engine.get(t, host) for t in sorted(set(plan.values()))}


def _engine_host(conn: Connection, options: Options) -> str:
    return options.engine_host or conn.sockname[0] or "127.0.0.1"


def _links(plan: dict[str, str], engines: dict[str, Engine], segments: Any) -> dict[str, Link]:
    if not isinstance(segments, dict):
        raise ProtocolError("handshake: segments must be a map")
    out = {}
    for name, t in plan.items():
        seg = segments.get(t)
        if not isinstance(seg, str):
            raise ProtocolError(f"handshake: the peer sent no segment for transport {t!r}")
        out[name] = Link(name, t, engines[t], seg)
    return out


async def client_handshake(conn: Connection, options: Options) -> Agreement:
    mine = _local_info(options)
    conn.send(Hello(PROTOCOL_VERSION, mine))
    msg = await conn.next_handshake_message(options.handshake_timeout)
    if isinstance(msg, Refuse):
        raise HandshakeError(f"{conn.peername} refused the connection: {msg.reason}")
    if not isinstance(msg, Welcome):
        raise ProtocolError(f"expected WELCOME, got {type(msg).__name__}")
    if msg.version != PROTOCOL_VERSION:
        raise HandshakeError(f"{conn.peername} speaks protocol version {msg.version}, this client "
                             f"speaks {PROTOCOL_VERSION}; install matching aiomooncake versions")
    plan = msg.info.get("links")
    if not isinstance(plan, dict):
        raise ProtocolError("WELCOME without links")
    expected = plan_links(mine, msg.info.get("self", {}))
    if plan != expected:
        raise HandshakeError(f"the peers disagree on transports: server chose {plan}, the client "
                             f"computes {expected}")
    engines = await _engines(plan, _engine_host(conn, options))
    conn.send(Ready({"segments": {t: e.segment for t, e in engines.items()}}))
    return Agreement(_links(plan, engines, msg.info.get("segments")), msg.info.get("self", {}))


async def server_handshake(conn: Connection, options: Options) -> Agreement:
    msg = await conn.next_handshake_message(options.handshake_timeout)
    if not isinstance(msg, Hello):
        raise ProtocolError(f"expected HELLO, got {type(msg).__name__}")
    if msg.version != PROTOCOL_VERSION:
        reason = (f"protocol version {msg.version} is not supported: this server speaks "
                  f"{PROTOCOL_VERSION}; install matching aiomooncake versions")
        conn.send(Refuse(reason))
        raise HandshakeError(f"refused {conn.peername}: client speaks protocol version {msg.version}, "
                             f"this server speaks {PROTOCOL_VERSION}")
    mine = _local_info(options)
    try:
        plan = plan_links(msg.info, mine)
    except HandshakeError as e:
        conn.send(Refuse(str(e)))
        raise
    engines = await _engines(plan, _engine_host(conn, options))
    conn.send(Welcome(PROTOCOL_VERSION, {"self": mine, "links": plan,
                                         "segments": {t: e.segment for t, e in engines.items()}}))
    ready = await conn.next_handshake_message(options.handshake_timeout)
    if not isinstance(ready, Ready):
        raise ProtocolError(f"expected READY, got {type(ready).__name__}")
    return Agreement(_links(plan, engines, ready.info.get("segments")), msg.info)
