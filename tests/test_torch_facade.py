"""The sync facade (aiomooncake.torch.init_group) without init_process_group."""

from __future__ import annotations

import datetime
from typing import Any

import torch
import torch.distributed as dist
from test_torch_harness import HOST, Ctx, no_children_left, run_ranks

from aiomooncake.torch import InvalidArgument, P2PGroup, init_group


def facade(ctx: Ctx) -> dict[str, Any]:
    out: dict[str, Any] = {}
    r, n = ctx.rank, ctx.world
    with init_group(r, n, master_addr=HOST, master_port=ctx.port,
                    timeout=datetime.timedelta(seconds=30)) as g:
        assert isinstance(g, P2PGroup) and g.rank == r and g.size == n
        out["initialized"] = dist.is_initialized()  # the facade leaves torch's global state alone
        nxt, prv = (r + 1) % n, (r - 1) % n
        # blocking ring (even ranks send first)
        b = torch.zeros(4)
        if r % 2 == 0:
            g.send(torch.full((4,), float(r)), nxt, tag=1)
            out["ring_src"] = g.recv(b, prv, tag=1)
        else:
            out["ring_src"] = g.recv(b, prv, tag=1)
            g.send(torch.full((4,), float(r)), nxt, tag=1)
        out["ring"] = b.tolist()
        # any source, complex tensors
        if r == 0:
            got = []
            for _ in range(n - 1):
                c = torch.zeros(2, dtype=torch.complex64)
                got.append((g.recv(c, tag=2), c.tolist()))
            out["any"] = sorted(got)
        else:
            g.send(torch.tensor([r + 1j, -r * 1j], dtype=torch.complex64), 0, tag=2)
        # batch with every accepted op spelling, in any order
        bufs = [torch.zeros(3) for _ in range(3)]
        works = g.batch_isend_irecv([
            ("irecv", bufs[0], prv, 3), (g.irecv, bufs[1], prv, 4), (dist.irecv, bufs[2], prv),
            ("isend", torch.full((3,), 10.0 + r), nxt, 3), (g.isend, torch.full((3,), 20.0 + r), nxt, 4),
            (dist.isend, torch.full((3,), 30.0 + r), nxt),
        ])
        for w in works:
            w.wait()
        out["batch"] = [b.tolist() for b in bufs]
        for bad in [("allreduce", bufs[0], 0), ("isend", bufs[0], n), ("isend", bufs[0], 0, -1), ("isend",)]:
            try:
                g.batch_isend_irecv([bad])
                out.setdefault("bad", []).append("no error")
            except InvalidArgument:
                out.setdefault("bad", []).append("InvalidArgument")
        try:
            g.send(bufs[0], r)
        except InvalidArgument:
            out["send_self"] = "InvalidArgument"
        g.barrier()
    return out


def test_facade() -> None:
    res = run_ranks(facade, 3, init="none").results
    for r in range(3):
        prv = (r - 1) % 3
        assert res[r]["initialized"] is False
        assert res[r]["ring_src"] == prv and res[r]["ring"] == [float(prv)] * 4
        assert res[r]["batch"] == [[10.0 + prv] * 3, [20.0 + prv] * 3, [30.0 + prv] * 3]
        assert res[r]["bad"] == ["InvalidArgument"] * 4
        assert res[r]["send_self"] == "InvalidArgument"
    assert res[0]["any"] == [(1, [(1 + 1j), -1j]), (2, [(2 + 1j), -2j])]
    assert no_children_left()
