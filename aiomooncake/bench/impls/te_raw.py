"""``te-raw``: the Mooncake Transfer Engine driven directly, the data-plane limit.

Each process initializes its own ``TransferEngine`` (P2PHANDSHAKE), the two exchange segment
names and buffer addresses through the store, register their buffers, and time blocking
``transfer_sync_write`` calls made one after another. A write returns once the bytes are in the
peer's memory; the receiver learns about it from an 8-byte sequence number written after the data
into a flag it polls, so a pingpong leg costs two writes (data, then flag), as any one-sided
protocol must.
"""

from __future__ import annotations

import os
import time
from typing import Any

import torch

from ...tensors import allocation_of
from ..common import MODES as ALL_MODES
from ..common import Iteration, Point, RankContext, Spinner, eplb_shapes, eplb_tensors, measure

NAME = "te-raw"
WORLD = 2
MODES = ALL_MODES


def available(device: str) -> str | None:
    try:
        from mooncake import engine as te
    except ImportError as e:
        return f"the Mooncake Transfer Engine is not installed ({e})"
    if device == "cuda":
        if not torch.cuda.is_available():
            return "CUDA is not available"
        if not getattr(te, "SUPPORT_INTRA_NVLINK", False):
            return "this Transfer Engine build has no intra-node NVLink transport (CPU wheel?)"
    return None


def child_env(device: str) -> dict[str, str]:
    # Same-host GPUs: the NVLink transport, which reads the switch from the environment at init.
    return {"MC_INTRANODE_NVLINK": "1"} if device == "cuda" else {}


def _protocol(device: str) -> str:
    if device == "cuda":
        os.environ["MC_INTRANODE_NVLINK"] = "1"
        return "tcp"  # ignored with MC_INTRANODE_NVLINK
    try:
        has_hca = bool(os.listdir("/sys/class/infiniband"))
    except OSError:
        has_hca = False
    if has_hca and not os.environ.get("MC_FORCE_TCP"):
        return "rdma"
    os.environ["MC_FORCE_TCP"] = "1"  # what aiomooncake's tcp engine does
    return "tcp"


class _Raw:
    def __init__(self, ctx: RankContext) -> None:
        from mooncake import engine as te

        self.ctx = ctx
        self.dev = ctx.device()
        self.te: Any = te.TransferEngine()
        host = ctx.host
        protocol = _protocol(ctx.cfg.device)
        rc = self.te.initialize(host, "P2PHANDSHAKE", protocol, "")
        if rc != 0:
            raise RuntimeError(f"TransferEngine.initialize({host!r}, P2PHANDSHAKE) failed: rc={rc}")
        ctx.notes["data_path"] = "te:nvlink" if ctx.cfg.device == "cuda" else f"te:{protocol}"
        self.peer_segment: str = ctx.exchange("segment", f"{host}:{self.te.get_rpc_port()}")
        # Flags: inbox[0] is written by the peer; outbox holds 1, 2, 3, ... so notifying never
        # has to modify memory first (which on CUDA would need a synchronize).
        self.regs: dict[int, tuple[int, int]] = {}  # registered base -> (users, size)
        total = sum(sum(ctx.cfg.counts(p)) for p in ctx.points) + 16
        self.inbox = torch.zeros(1, dtype=torch.int64, device=self.dev)
        self.outbox = torch.arange(1, total + 1, dtype=torch.int64, device=self.dev)
        # cheap polling of the CPU flag through a numpy view
        self._inbox_np: Any = self.inbox.numpy() if self.dev.type == "cpu" else None
        # Every buffer of the run is allocated and registered before the first write: a writer's
        # engine caches the peer's segment description when it first opens it, and the NVLink
        # transport does not see memory the peer registers afterwards.
        sizes = sorted({p.size for p in ctx.points if p.mode != "eplb"})
        experts = max((p.size for p in ctx.points if p.mode == "eplb"), default=0)
        self.src = {n: torch.ones(n, dtype=torch.uint8, device=self.dev) for n in sizes}
        self.dst = {n: torch.zeros(n, dtype=torch.uint8, device=self.dev) for n in sizes}
        self.esrc = eplb_tensors(experts, ctx.cfg.scale, self.dev)
        self.edst = [torch.zeros_like(t) for t in self.esrc]
        for t in (self.inbox, self.outbox, *self.src.values(), *self.dst.values(), *self.esrc, *self.edst):
            self._register(t)
        ctx.sync_device()
        peer = ctx.exchange("addrs", (self.inbox.data_ptr(), {n: t.data_ptr() for n, t in self.dst.items()},
                                      [t.data_ptr() for t in self.edst]))
        self.peer_inbox: int = peer[0]
        self.peer_dst: dict[int, int] = peer[1]
        self.peer_edst: list[int] = peer[2]
        self.sent = 0
        self.expect = 0
        self.spinner = Spinner(ctx.cfg.timeout)

    def _range(self, t: torch.Tensor) -> tuple[int, int]:
        if t.device.type == "cuda":
            # GPU memory is shared by IPC handle of its whole cudaMalloc block, as aiomooncake does
            a = allocation_of(t)
            return a.base, a.size
        st = t.untyped_storage()
        return st.data_ptr(), st.nbytes()

    def _register(self, t: torch.Tensor) -> None:
        base, size = self._range(t)
        held = self.regs.get(base)
        if held is not None:
            self.regs[base] = (held[0] + 1, held[1])
            return
        rc = self.te.register_memory(base, size, "*")
        if rc != 0:
            raise RuntimeError(f"register_memory of {size} B at 0x{base:x} failed: rc={rc}")
        self.regs[base] = (1, size)

    def write(self, src: torch.Tensor, dst: int) -> None:
        n = src.numel() * src.element_size()
        rc = self.te.transfer_sync_write(self.peer_segment, src.data_ptr(), dst, n)
        if rc != 0:
            raise RuntimeError(f"transfer_sync_write of {n} B to {self.peer_segment} failed: rc={rc}")

    def notify(self) -> None:
        src = self.outbox.data_ptr() + 8 * self.sent
        self.sent += 1
        rc = self.te.transfer_sync_write(self.peer_segment, src, self.peer_inbox, 8)
        if rc != 0:
            raise RuntimeError(f"flag write to {self.peer_segment} failed: rc={rc}")

    def _seen(self) -> int:
        return int(self._inbox_np[0]) if self._inbox_np is not None else int(self.inbox.item())

    def wait(self) -> None:
        self.expect += 1
        want = self.expect
        self.spinner.wait(lambda: self._seen() >= want, f"the peer's write #{want}")

    def run(self) -> None:
        ctx = self.ctx
        for p in ctx.points:
            ctx.begin(p)
            if p.mode == "eplb":
                n = p.size * len(eplb_shapes(ctx.cfg.scale))
                srcs, remote = self.esrc[:n], self.peer_edst[:n]
            else:
                srcs, remote = [self.src[p.size]], [self.peer_dst[p.size]]
            ctx.barrier(f"p{p.idx}")
            samples = measure(ctx, p, self._step(p, srcs, remote))
            ctx.finish(p, samples)
        ctx.barrier("end")  # the peer wrote its last byte into our buffers

    def _step(self, p: Point, srcs: list[torch.Tensor], remote: list[int]) -> Iteration:
        first = self.ctx.rank == 0
        window = self.ctx.cfg.window
        s, dst = srcs[0], remote[0]

        def pingpong() -> float:
            t0 = time.perf_counter()
            if first:
                self.write(s, dst)
                self.notify()
                self.wait()
            else:
                self.wait()
                self.write(s, dst)
                self.notify()
            return time.perf_counter() - t0

        def stream() -> float:
            t0 = time.perf_counter()
            if first:
                for _ in range(window):
                    self.write(s, dst)
                self.notify()
            else:
                self.wait()
            return time.perf_counter() - t0

        def bidir() -> float:
            t0 = time.perf_counter()
            for _ in range(window):
                self.write(s, dst)
            self.notify()
            self.wait()
            return time.perf_counter() - t0

        def eplb() -> float:
            t0 = time.perf_counter()
            for t, a in zip(srcs, remote, strict=True):
                self.write(t, a)
            self.notify()
            self.wait()
            return time.perf_counter() - t0

        return {"pingpong": pingpong, "stream": stream, "bidir": bidir, "eplb": eplb}[p.mode]


def run(ctx: RankContext) -> None:
    _Raw(ctx).run()

