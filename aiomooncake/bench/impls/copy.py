"""``copy``: one process copying between two buffers (``dst.copy_(src)``): a single-threaded CPU
memcpy, or a CUDA
device-to-device copy timed with CUDA events. No transport can beat it: the physical limit.

pingpong: copy there and back (rtt); stream: ``window`` copies; bidir: both directions' copies;
eplb: every expert tensor copied both ways.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from ..common import MODES as ALL_MODES
from ..common import Iteration, Point, RankContext, eplb_tensors, measure

NAME = "copy"
WORLD = 1
MODES = ALL_MODES


def available(device: str) -> str | None:
    if device == "cuda" and not torch.cuda.is_available():
        return "CUDA is not available"
    return None


def child_env(device: str) -> dict[str, str]:
    return {}


def _timed(dev: torch.device, body: Callable[[], None]) -> Iteration:
    if dev.type == "cuda":
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)

        def on_gpu() -> float:
            start.record()
            body()
            end.record()
            end.synchronize()
            return float(start.elapsed_time(end)) / 1e3
        return on_gpu

    def on_cpu() -> float:
        t0 = time.perf_counter()
        body()
        return time.perf_counter() - t0
    return on_cpu


def _body(ctx: RankContext, p: Point, dev: torch.device) -> Callable[[], None]:
    if p.mode == "eplb":
        a = eplb_tensors(p.size, ctx.cfg.scale, dev)
        b = [torch.zeros_like(t) for t in a]
        a2 = [torch.zeros_like(t) for t in a]
        b2 = [torch.ones_like(t) for t in a]

        def eplb() -> None:
            for x, y in zip(a, b, strict=True):
                y.copy_(x)
            for x, y in zip(b2, a2, strict=True):
                y.copy_(x)
        return eplb

    s = torch.ones(p.size, dtype=torch.uint8, device=dev)
    r = torch.zeros(p.size, dtype=torch.uint8, device=dev)
    window = ctx.cfg.window
    if p.mode == "pingpong":
        def pingpong() -> None:
            r.copy_(s)
            s.copy_(r)
        return pingpong
    if p.mode == "stream":
        def stream() -> None:
            for _ in range(window):
                r.copy_(s)
        return stream
    s2 = torch.ones(p.size, dtype=torch.uint8, device=dev)
    r2 = torch.zeros(p.size, dtype=torch.uint8, device=dev)

    def bidir() -> None:
        for _ in range(window):
            r.copy_(s)
            r2.copy_(s2)
    return bidir


def run(ctx: RankContext) -> None:
    # One copying thread: what one core moves, and no OpenMP wake-ups on a shared, busy machine.
    torch.set_num_threads(1)
    dev = ctx.device()
    for p in ctx.points:
        ctx.begin(p)
        samples = measure(ctx, p, _timed(dev, _body(ctx, p, dev)))
        ctx.finish(p, samples)
