"""Setting up the data planes of one connection, at handshake time.

The handshake (:mod:`aiomooncake.handshake`) moves the messages; this module says what goes in
them and acts on the answer: what this side can do (:func:`local_info`), whether the same-host path
really reaches the other process (:func:`screen`, :func:`confirm`), which planes to start
(:func:`start`), and the resulting :class:`Link` of each kind of memory (:func:`links`), with who
copies on it. The choice itself is the pure :mod:`aiomooncake.core.negotiation`.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

from ..core.negotiation import plan_links, roles
from ..errors import HandshakeError, ProtocolError
from ..hostid import gpu_uuid, host_id
from ..options import Options
from . import cuda_ipc, shm, te
from .base import DataPlane

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Link:
    """How one kind of memory ("cpu" or "cuda") travels between this peer and the remote."""

    name: str  # "cpu" or "cuda"
    transport: str  # the plane's kind: "shm", "tcp", "rdma", "nvlink"
    plane: DataPlane
    remote_segment: str  # how the remote's plane is addressed
    offers: bool = False  # our rendezvous sends offer their source for the remote to pull
    pulls: bool = False  # we pull sources the remote offers (else the sender writes after a CTS)


@dataclass(frozen=True)
class Agreement:
    links: dict[str, Link]
    remote: dict[str, Any]  # what the remote advertised
    local: dict[str, Any]  # what this side advertised (its GPU's UUID, ...), as the peer saw it


def local_info(options: Options) -> dict[str, Any]:
    """What this side tells the other once both proved the secret: what it can do and wants."""
    caps = te.capabilities()
    info: dict[str, Any] = {"caps": caps, "transport": options.transport, "host_id": host_id(),
                            "pid": os.getpid(), "max_frame": options.max_frame,
                            "busy_poll": options.busy_poll, "one_copier": options.one_copier}
    if options.transport in ("auto", cuda_ipc.KIND):  # the same-host CUDA plane, where possible
        probe = cuda_ipc.probe_info()
        if probe is not None:
            caps.insert(0, cuda_ipc.KIND)
            info["ipc_probe"] = probe
    if "nvlink" in caps or cuda_ipc.KIND in caps:
        info["gpu"] = gpu_uuid()
    shm.advertise(info, options.host_transport)  # the same-host CPU path, where possible
    return info


def screen(mine: dict[str, Any], remote: Any, sockname: tuple[str, int], peername: str) -> None:
    """Server side, before planning: drop from ``mine`` what the client's process cannot be
    reached by (the same-host paths, unless they really work with the client: tried here)."""
    shm.screen(mine, remote, sockname, peername)
    caps = remote.get("caps") if isinstance(remote, dict) else None
    if (cuda_ipc.KIND in mine.get("caps", ()) and isinstance(caps, list) and cuda_ipc.KIND in caps
            and remote.get("host_id") == mine.get("host_id")):
        why = cuda_ipc.check_remote(remote.get("ipc_probe"))
        if why is not None:
            # The engine's NVLink transport maps memory through CUDA IPC too: it would fail the
            # same way (containers that hide each other), so CUDA tensors take its network path.
            log.info("CUDA IPC with %s does not work (%s): CUDA tensors take the Transfer Engine's "
                     "network transport", peername, why)
            mine["caps"] = [c for c in mine["caps"] if c not in (cuda_ipc.KIND, "nvlink")]


def plan(client: dict[str, Any], server: dict[str, Any]) -> dict[str, str]:
    """Which plane carries each link (HandshakeError if the two cannot agree)."""
    return plan_links(client, server)


def confirm(chosen: dict[str, str], remote: Any, sockname: tuple[str, int], peername: str) -> None:
    """Client side: check that the planes the server chose reach the server's process."""
    shm.confirm(chosen, remote, sockname, peername)
    if chosen.get("cuda") == cuda_ipc.KIND:
        why = cuda_ipc.check_remote(remote.get("ipc_probe") if isinstance(remote, dict) else None)
        if why is not None:
            raise HandshakeError(f"the server at {peername} chose CUDA IPC, but this process cannot map "
                                 f"its memory ({why}); connect with transport='nvlink' or 'tcp'")


async def start(chosen: dict[str, str], host: str) -> dict[str, DataPlane]:
    """This process's plane of each kind in ``chosen`` (started on first use)."""
    out: dict[str, DataPlane] = {}
    for kind in sorted(set(chosen.values())):
        if kind == shm.KIND:
            out[kind] = shm.ShmPlane.instance()
        elif kind == cuda_ipc.KIND:
            out[kind] = cuda_ipc.CudaIpcPlane.instance()
        else:
            out[kind] = await te.start(kind, host)
    return out


def segments(planes: dict[str, DataPlane]) -> dict[str, str]:
    """How the remote addresses each of our planes (sent in the handshake)."""
    return {kind: p.segment for kind, p in planes.items()}


async def links(chosen: dict[str, str], planes: dict[str, DataPlane], remote_segments: Any,
                agreement_local: dict[str, Any], remote: dict[str, Any], options: Options) -> Agreement:
    """The links of a connection whose handshake agreed on ``chosen``."""
    if not isinstance(remote_segments, dict) or not all(
            isinstance(remote_segments.get(t), str) for t in chosen.values()):
        raise ProtocolError(f"handshake: the peer sent no segment for each of {sorted(set(chosen.values()))}")
    one_copier = options.one_copier and remote.get("one_copier", True) is not False  # both must agree
    who = roles(chosen, agreement_local, remote, segments(planes), remote_segments, one_copier)
    out = {}
    for name, kind in chosen.items():
        offers, pulls = who[name]
        out[name] = Link(name, kind, planes[kind], remote_segments[kind], offers, pulls)
    await _forget_stale_segments(out, remote)
    return Agreement(out, remote, agreement_local)


# Remote segment name -> the process ("host_id/pid") that held it when we last linked to it.
_segment_owners: dict[str, str] = {}


async def _forget_stale_segments(links: dict[str, Link], remote: dict[str, Any]) -> None:
    """A segment name is ``host:rpc_port`` of the remote engine, and a restarted peer's engine can
    get the port a dead one had. The engine caches descriptors by name (the dead engine's data
    port and buffers): writes to the new peer then fail until the cache is refreshed. So when a
    name we linked to before now belongs to another process, make its plane forget what it cached."""
    owner = f"{remote.get('host_id')}/{remote.get('pid')}"
    stale = []
    for link in links.values():
        seg = link.remote_segment
        previous = _segment_owners.get(seg)
        _segment_owners[seg] = owner
        if previous is not None and previous != owner:
            stale.append(link)
    for link in stale:
        log.info("segment %s now belongs to another process (a restarted peer): refreshing the "
                 "%s plane's cached descriptors", link.remote_segment, link.transport)
        if not await link.plane.refresh_remote(link.remote_segment):
            log.warning("could not refresh the cached descriptor of %s: copies to this peer may fail",
                        link.remote_segment)
