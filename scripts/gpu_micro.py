"""Micro-costs on the GPU host that bound the per-message overhead (printed in microseconds)."""
import asyncio, os, time
import torch
import aiomooncake
from aiomooncake.tensors import allocation_of, record_ready


def per_call(fn, n=2000):
    fn()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t) / n * 1e6


x = torch.ones(1024, device="cuda")
h = torch.empty(1024)
ev = torch.cuda.Event(); ev.record()
side = torch.cuda.Stream()
print("sched_yield", per_call(os.sched_yield))
print("Event()+record", per_call(lambda: torch.cuda.Event().record()))
print("event.query", per_call(ev.query))
print("allocation_of(cuda) cached", per_call(lambda: allocation_of(x)))
print("D2H 4KiB .cpu()", per_call(lambda: x.cpu(), 500))
print("D2H 4KiB .cpu() on side stream", per_call(lambda: (side.__enter__ if False else None) or x.cpu(), 500))
print("H2D 4KiB copy_ pageable", per_call(lambda: x.copy_(h), 500))
print("current_stream", per_call(lambda: torch.cuda.current_stream()))


async def spin():
    t = time.perf_counter()
    for _ in range(20000):
        await asyncio.sleep(0)
    a = (time.perf_counter() - t) / 20000 * 1e6
    t = time.perf_counter()
    for _ in range(20000):
        os.sched_yield()
        await asyncio.sleep(0)
    b = (time.perf_counter() - t) / 20000 * 1e6
    print("uvloop sleep(0) turn", a, "with sched_yield", b)

aiomooncake.run(spin())
