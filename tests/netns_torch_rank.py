"""One rank of tests/test_netns.py's torch test, started in its own namespaces: it joins an
``"aiomooncake"`` process group through ``env://`` (``MASTER_ADDR`` is in another namespace, rank
0's), exchanges a tensor with every other rank in one ``batch_isend_irecv`` and prints one JSON
line on stdout: the address it published, the data plane to each rank, and whether what it
received is bit-exact."""

from __future__ import annotations

import datetime
import json
import os
import sys

OUT = os.fdopen(os.dup(1), "w", buffering=1)
os.dup2(2, 1)  # the protocol keeps stdout: whatever the libraries print goes to stderr

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from harness import pattern  # noqa: E402

import aiomooncake.torch  # noqa: E402

NBYTES = 3 * 1024 * 1024 + 7  # a rendezvous


def seed(src: int, dst: int) -> int:
    return 100 * src + dst


def main() -> None:
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("aiomooncake", timeout=datetime.timedelta(seconds=60))
    pg = dist.distributed_c10d._get_default_group()
    assert isinstance(pg, aiomooncake.torch.ProcessGroupAiomooncake), type(pg)
    others = [j for j in range(world) if j != rank]
    bufs = {j: torch.zeros(NBYTES, dtype=torch.uint8) for j in others}
    ops = [dist.P2POp(dist.isend, pattern(NBYTES, seed(rank, j)), j) for j in others]
    ops += [dist.P2POp(dist.irecv, bufs[j], j) for j in others]
    for w in dist.batch_isend_irecv(ops):
        w.wait()
    mesh = pg._mesh
    assert mesh is not None
    paths = {j: mesh._send[j].peer.data_paths for j in others}  # type: ignore[union-attr]
    exact = {j: bool(torch.equal(bufs[j], pattern(NBYTES, seed(j, rank)))) for j in others}
    dist.barrier()
    OUT.write(json.dumps({"rank": rank, "host": pg.host, "port": pg.port, "paths": paths,
                          "exact": exact}) + "\n")
    OUT.flush()
    dist.destroy_process_group()


if __name__ == "__main__":
    try:
        main()
    except BaseException as e:
        OUT.write(json.dumps({"error": f"{type(e).__name__}: {e}"}) + "\n")
        raise
    sys.exit(0)
