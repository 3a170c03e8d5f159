"""Two spawned ranks holding three paths between them, for the experiments that compare them: a
process group on the ``"aiomooncake"`` backend, a gloo group beside it, and a core ``Peer``
connection whose address travels over gloo. Public API only."""

from __future__ import annotations

import datetime
import socket
from typing import Any

import torch
import torch.distributed as dist

import aiomooncake


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def init_groups(rank: int, port: int, device: str) -> tuple[Any, torch.device]:
    """The backend's group (the default one) and a gloo group of the two ranks; the device to use."""
    import aiomooncake.torch  # noqa: F401  (registers the backend)

    dist.init_process_group("aiomooncake", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=300))
    gloo = dist.new_group([0, 1], backend="gloo")
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(0)
    return gloo, dev


async def core_connect(rank: int, gloo: Any) -> aiomooncake.Peer:
    """A core connection beside the groups; its address travels over gloo."""
    # its loop runs only during the core's blocks: no heartbeat may expire in between
    opts: dict[str, Any] = {"heartbeat_interval": 300.0, "heartbeat_timeout": 600.0}
    port = torch.zeros(1, dtype=torch.int64)
    if rank == 1:
        lst = await aiomooncake.listen("127.0.0.1", 0, **opts)
        port[0] = lst.port
        dist.send(port, 0, group=gloo)
        peer = await lst.accept()
        await lst.close()
        return peer
    dist.recv(port, 1, group=gloo)
    return await aiomooncake.connect("127.0.0.1", int(port.item()), **opts)
