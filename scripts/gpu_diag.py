"""GPU diagnostics (two processes on GPU 0): stream order on the core, a traced 100 MiB stream,
micro-costs, engine submit/completion probes, a traced 4 KiB round trip on one clock, the floor of
a control message between two processes. Exploratory, for the lent device; prints what it finds.

    source .device/env.sh && python3 scripts/gpu_diag.py [--parts order,stream,micro,latency]
    parts: order order2 stream ab submit latency micro torch torcheplb ipc prof batch (ipc needs no GPU)
"""
from __future__ import annotations

import argparse
import asyncio
import itertools
import mmap
import multiprocessing as mp
import os
import queue
import socket
import statistics
import time
from typing import Any

import torch

import aiomooncake as am
from aiomooncake import _trace
from aiomooncake.bench.common import eplb_tensors
from aiomooncake.peer import Peer

SPIN = 200_000_000
CONFIGS = {"one copier": True, "both copy": False}
_ELECTED: dict[int, tuple[bool, bool]] = {}


def _configure(name: str, peer: Peer) -> None:
    """Switch the one-copier election of ``peer`` on (as elected at connect) or off."""
    saved = _ELECTED.setdefault(id(peer), (peer._copier, peer._offer_gpu))
    peer._copier, peer._offer_gpu = saved if CONFIGS[name] else (False, False)
EP_EXPERTS = 16
ORDER2 = ("base", "sender-sync", "alloc-once", "sync-zeros", "recv-default")
MiB = 1 << 20


def _cts_logger(log: list[Any]) -> None:
    orig = Peer._start_write

    def start_write(self: Peer, op: Any) -> None:
        ctx = op.context
        log.append(("cts", None if ctx.ready is None else bool(ctx.ready.query()), time.perf_counter()))
        orig(self, op)
    Peer._start_write = start_write  # type: ignore[method-assign]


async def _exchange(peer: Peer, out: list[torch.Tensor], inn: list[torch.Tensor], tag0: int = 100) -> float:
    """One EPLB-shaped exchange: every tensor of ``out`` sent and of ``inn`` received at once, tag by
    position; returns the seconds it took."""
    t = time.perf_counter()
    await asyncio.gather(*(peer.send(x, tag=tag0 + i) for i, x in enumerate(out)),
                         *(peer.recv(x, tag=tag0 + i) for i, x in enumerate(inn)))
    return time.perf_counter() - t


PROF_EXPERTS = 64


async def _prof_eplb(peer: Peer, rq: Any, who: str, full: bool = True) -> None:
    """An EPLB exchange of PROF_EXPERTS experts both ways under cProfile: where a message's CPU goes."""
    import cProfile
    import io
    import pstats
    out = eplb_tensors(PROF_EXPERTS, 1.0, torch.device("cuda"))
    inn = [torch.empty_like(x) for x in out]
    torch.cuda.synchronize()
    from aiomooncake import engine as am_engine
    big_out = [torch.full((100_000_000,), 3, dtype=torch.uint8, device="cuda") for _ in range(16)]
    big_in = [torch.empty(100_000_000, dtype=torch.uint8, device="cuda") for _ in range(16)]
    ab: dict[str, list[float]] = {}
    for _rnd in range(3):  # engine batches on (32) and off (1), alternating
        for mg in (32, 1):
            rts = []
            for _ in range(60):  # 7 KB round trips (one frame per read: nothing to batch)
                t = time.perf_counter()
                await peer.send(out[2], tag=95) if who == "cli" else await peer.recv(inn[2], tag=95)
                await peer.recv(inn[2], tag=96) if who == "cli" else await peer.send(out[2], tag=96)
                rts.append(time.perf_counter() - t)
            ab.setdefault(f"7 KB rtt us max_group={mg}", []).append(round(statistics.median(rts[10:]) * 1e6))
            am_engine._Poller.max_group = mg
            ts = [await _exchange(peer, out, inn) for _ in range(5)]
            ab.setdefault(f"eplb {PROF_EXPERTS} GB/s max_group={mg}", []).append(
                round(2 * sum(x.nbytes for x in out) / statistics.median(ts[1:]) / 1e9))
            ts = []
            for _ in range(5):
                t = time.perf_counter()
                if who == "srv":
                    await asyncio.gather(*(peer.send(x, tag=90) for x in big_out))
                else:
                    await asyncio.gather(*(peer.recv(x, tag=90) for x in big_in))
                ts.append(time.perf_counter() - t)
            ab.setdefault(f"16x100MB srv->cli GB/s max_group={mg}", []).append(
                round(16e8 / statistics.median(ts[1:]) / 1e9))
    am_engine._Poller.max_group = 32
    eng = peer._links["cuda"].engine
    rq.put((f"AB {who} copier={peer._copier}", ab, eng.stats()))
    del big_out, big_in
    if not full:
        return
    prof = cProfile.Profile()
    ts = []
    for it in range(8):
        if it == 3:
            prof.enable()
        ts.append(await _exchange(peer, out, inn))
    prof.disable()
    import gc
    gcs: list[float] = []
    gc_t = [0.0]

    def cb(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            gc_t[0] = time.perf_counter()
        else:
            gcs.append(time.perf_counter() - gc_t[0])
    for label, frozen, n in (("unprofiled", False, 6), ("after gc.freeze", True, 8)):
        if frozen:
            gc.collect()
            gc.freeze()  # what serving stacks do after loading the model: long-lived objects leave its scans
        gcs.clear()
        gc.callbacks.append(cb)
        plain = [await _exchange(peer, out, inn) for _ in range(n)]
        gc.callbacks.remove(cb)
        gc.unfreeze()
        rq.put((f"PROF {who} {label} ms/iter", [round(x * 1e3, 2) for x in plain], "gc runs", len(gcs),
                "gc ms total", round(sum(gcs) * 1e3, 2), "max", round(max(gcs, default=0) * 1e3, 2)))
    _trace.on = True
    for it in range(3):
        _trace.take()
        t = time.perf_counter()
        t_end = t + await _exchange(peer, out, inn)
        marks = _trace.take()
        summ: dict[str, list[float]] = {}
        for nm, x in marks:
            summ.setdefault(nm, []).append((x - t) * 1e3)
        rq.put((f"EPTRACE {who} #{it} iteration {(t_end - t) * 1e3:.1f} ms;"
                " mark: count first median last (ms)",
                {k: (len(v), round(v[0], 2), round(statistics.median(v), 2), round(v[-1], 2))
                 for k, v in summ.items()}))
    _trace.on = False
    buf = io.StringIO()
    st = pstats.Stats(prof, stream=buf)
    st.sort_stats("tottime").print_stats(28)
    st.sort_stats("cumulative").print_stats(22)
    rq.put((f"PROF {who} copier={peer._copier} ms/iter", [round(x * 1e3, 2) for x in ts],
            "GB/s both ways", round(2 * sum(x.nbytes for x in out) / statistics.median(ts[3:]) / 1e9)))
    rq.put((f"PROF-{who}", buf.getvalue()))


# ------------------------------------------------------------------ receiver (server)
def server(portq: Any, rq: Any, parts: list[str]) -> None:
    torch.cuda.set_device(0)

    async def main() -> None:
        lst = await am.listen("127.0.0.1", 0)
        portq.put(lst.port)
        peer = await lst.accept()
        rq.put(("transports", peer.transports))
        if "order" in parts:
            for variant in ("fresh", "reuse"):
                means = []
                side0 = torch.cuda.Stream()
                for _ in range(6):
                    side = torch.cuda.Stream() if variant == "fresh" else side0
                    buf = torch.empty(8 * MiB // 4, device="cuda")
                    with torch.cuda.stream(side):
                        buf.fill_(-7.0)
                        await peer.recv(buf, tag=99)
                        total = buf.sum()
                    means.append(round(float(total.item()) / buf.numel(), 3))
                rq.put((f"order[{variant}] receiver means (want 1..6)", means))
            # eager-size cuda and a no-sleep control
            means = []
            for _ in range(4):
                buf = torch.empty(8 * MiB // 4, device="cuda")
                await peer.recv(buf, tag=98)
                means.append(round(float(buf.mean().item()), 3))
            rq.put(("order[control, sender synchronizes] means (want 1..4)", means))
        if "order2" in parts:
            for variant in ORDER2:
                rows = []
                for _ in range(6):
                    side = torch.cuda.Stream()
                    buf = torch.empty(8 * MiB // 4, device="cuda")
                    if variant == "recv-default":
                        buf.fill_(-7.0)
                        await peer.recv(buf, tag=97)
                        torch.cuda.synchronize()
                    else:
                        with torch.cuda.stream(side):
                            buf.fill_(-7.0)
                            await peer.recv(buf, tag=97)
                        torch.cuda.synchronize()
                    rows.append((round(float(buf.min())), round(float(buf.max())), hex(buf.data_ptr())[-7:]))
                rq.put((f"order2[{variant}] recv (min,max,ptr), want 1..6", rows))
        if "stream" in parts:
            n, win = 100_000_000, 16
            bufs = [torch.empty(n, dtype=torch.uint8, device="cuda") for _ in range(win)]
            for variant in ("gather", "preposted", "w1"):
                _trace.take()
                iters = 8
                for _it in range(iters):
                    if variant == "w1":
                        for b in bufs[:4]:
                            await peer.recv(b, tag=7)
                    else:
                        await asyncio.gather(*(peer.recv(b, tag=7) for b in bufs))
                    if variant == "preposted":
                        await peer.send(torch.zeros(1, device="cuda"), tag=8)
                rq.put((f"TRACE-S-{variant}", _trace.take()))
            ok = all(int(b[:16].sum()) == 16 * 3 for b in bufs)
            rq.put(("stream bytes ok", ok))
        if "ab" in parts:
            n, win = 100_000_000, 16
            bufs = [torch.empty(n, dtype=torch.uint8, device="cuda") for _ in range(win)]
            small = torch.empty(1024, dtype=torch.float32, device="cuda")
            ex_out = [torch.full((44_000_000,), 5, dtype=torch.uint8, device="cuda") for _ in range(8)]
            ex_in = [torch.empty(44_000_000, dtype=torch.uint8, device="cuda") for _ in range(8)]
            ep_out = eplb_tensors(EP_EXPERTS, 1.0, torch.device("cuda"))
            ep_in = [torch.empty_like(x) for x in ep_out]
            rq.put(("receiver elected", peer._copier, peer._offer_gpu))
            for _rnd in range(3):
                for name in CONFIGS:
                    _configure(name, peer)
                    for _it in range(6):
                        await asyncio.gather(*(peer.recv(b, tag=60) for b in bufs))
                    for _ in range(120):
                        await peer.recv(small, tag=61)
                        await peer.send(small, tag=62)
                    for _it in range(6):
                        await asyncio.gather(*(peer.send(x, tag=63) for x in ex_out),
                                             *(peer.recv(x, tag=63) for x in ex_in))
                    for _ in range(5):
                        await asyncio.gather(*(peer.send(x, tag=100 + i) for i, x in enumerate(ep_out)),
                                             *(peer.recv(x, tag=100 + i) for i, x in enumerate(ep_in)))
            rq.put(("receiver exchange bytes ok", all(int(x[:8].sum()) == 8 * 6 for x in ex_in)))
        if "prof" in parts or "batch" in parts:
            await _prof_eplb(peer, rq, "srv", "prof" in parts)
        if "submit" in parts:
            target = torch.zeros(100_000_000, dtype=torch.uint8, device="cuda")
            peer._links["cuda"].engine.acquire(target)
            await peer.send(torch.tensor([target.data_ptr()], dtype=torch.int64), tag=50)
            await peer.recv(torch.zeros(1, dtype=torch.int64), tag=51)
        if "latency" in parts:
            s = torch.empty(1024, dtype=torch.float32, device="cuda")
            for i in range(300):
                await peer.recv(s, tag=3)
                await peer.send(s, tag=4)
                if i in (200, 201, 202):
                    rq.put(("LAT srv", i, _trace.take()))
                else:
                    _trace.take()
        await asyncio.sleep(0.5)
        await peer.close()
        await lst.close()
    am.run(main())


# -------------------------------------------------------------------- sender (client)
def client(port: int, rq: Any, parts: list[str]) -> None:
    torch.cuda.set_device(0)
    ctslog: list[Any] = []
    _cts_logger(ctslog)

    async def main() -> None:
        peer = await am.connect("127.0.0.1", port)
        if "order" in parts:
            for variant in ("fresh", "reuse"):
                side0 = torch.cuda.Stream()
                for i in range(6):
                    side = torch.cuda.Stream() if variant == "fresh" else side0
                    src = torch.zeros(8 * MiB // 4, device="cuda")
                    side.wait_stream(torch.cuda.current_stream())
                    with torch.cuda.stream(side):
                        torch.cuda._sleep(SPIN)
                        src.fill_(float(i + 1))
                        t = time.perf_counter()
                        await peer.send(src, tag=99)
                        dt = time.perf_counter() - t
                    rq.put((f"order[{variant}] send {i}", f"{dt * 1e3:.1f} ms", "ready at CTS:",
                            [c[1] for c in ctslog]))
                    ctslog.clear()
            for i in range(4):
                src = torch.full((8 * MiB // 4,), float(i + 1), device="cuda")
                torch.cuda.synchronize()
                await peer.send(src, tag=98)
        if "order2" in parts:
            for variant in ORDER2:
                info = []
                once = torch.zeros(8 * MiB // 4, device="cuda")
                for i in range(6):
                    side = torch.cuda.Stream()
                    src = once if variant == "alloc-once" else torch.zeros(8 * MiB // 4, device="cuda")
                    if variant == "alloc-once":
                        src.zero_()
                    if variant == "sync-zeros":
                        torch.cuda.synchronize()
                    side.wait_stream(torch.cuda.current_stream())
                    with torch.cuda.stream(side):
                        torch.cuda._sleep(SPIN)
                        src.fill_(float(i + 1))
                        if variant == "sender-sync":
                            side.synchronize()
                        ev = torch.cuda.Event()
                        ev.record()
                        await peer.send(src, tag=97)
                        info.append((hex(src.data_ptr())[-7:], ev.query(), [c[1] for c in ctslog]))
                    ctslog.clear()
                rq.put((f"order2[{variant}] send (ptr, ev done after send, ready at CTS)", info))
        if "stream" in parts:
            n, win = 100_000_000, 16
            srcs = [torch.full((n,), 3, dtype=torch.uint8, device="cuda") for _ in range(win)]
            link = peer._links["cuda"]
            torch.cuda.synchronize()
            for variant in ("gather", "preposted", "w1"):
                _trace.take()
                times = []
                for _it in range(8):
                    if variant == "preposted":
                        await asyncio.sleep(0.005)  # the receiver's 16 recvs are posted by now
                    t = time.perf_counter()
                    if variant == "w1":
                        for s in srcs[:4]:
                            await peer.send(s, tag=7)
                        nb = 4 * n
                    else:
                        await asyncio.gather(*(peer.send(s, tag=7) for s in srcs))
                        nb = win * n
                    times.append(time.perf_counter() - t)
                    if variant == "preposted":
                        await peer.recv(torch.zeros(1, device="cuda"), tag=8)
                rq.put((f"TRACE-C-{variant}", _trace.take()))
                med = statistics.median(times[1:])
                rq.put((f"stream[{variant}] GB/s", round(nb / med / 1e9, 1), "ms/iter", round(med * 1e3, 3)))
            # te-raw in the same process: sequential sync writes of 100 MB into a pre-registered
            # remote buffer is not available here (needs the receiver's address); time one write
            # through our engine's submit/poll path with the peer's own rendezvous instead.
            eng = link.engine
            rq.put(("engine stats", eng.stats()))
        if "ab" in parts:
            n, win = 100_000_000, 16
            srcs = [torch.full((n,), 3, dtype=torch.uint8, device="cuda") for _ in range(win)]
            small = torch.ones(1024, dtype=torch.float32, device="cuda")
            torch.cuda.synchronize()
            ex_out = [torch.full((44_000_000,), 6, dtype=torch.uint8, device="cuda") for _ in range(8)]
            ex_in = [torch.empty(44_000_000, dtype=torch.uint8, device="cuda") for _ in range(8)]
            ep_out = eplb_tensors(EP_EXPERTS, 1.0, torch.device("cuda"))
            ep_in = [torch.empty_like(x) for x in ep_out]
            torch.cuda.synchronize()
            rq.put(("sender elected", peer._copier, peer._offer_gpu))
            res: dict[str, list[float]] = {}
            for _rnd in range(3):
                for name in CONFIGS:
                    _configure(name, peer)
                    ts = []
                    for _it in range(6):
                        t = time.perf_counter()
                        await asyncio.gather(*(peer.send(s, tag=60) for s in srcs))
                        ts.append(time.perf_counter() - t)
                    rts = []
                    for _ in range(120):
                        t = time.perf_counter()
                        await peer.send(small, tag=61)
                        await peer.recv(small, tag=62)
                        rts.append(time.perf_counter() - t)
                    xs = []
                    for _it in range(6):
                        t = time.perf_counter()
                        await asyncio.gather(*(peer.send(x, tag=63) for x in ex_out),
                                             *(peer.recv(x, tag=63) for x in ex_in))
                        xs.append(time.perf_counter() - t)
                    eps = [await _exchange(peer, ep_out, ep_in) for _ in range(5)]
                    res.setdefault(f"{name} eplb {EP_EXPERTS} experts both ways GB/s", []).append(
                        round(2 * sum(x.nbytes for x in ep_out) / statistics.median(eps[1:]) / 1e9))
                    res.setdefault(name + " GB/s", []).append(
                        round(win * n / statistics.median(ts[1:]) / 1e9))
                    res.setdefault(name + " 4K rtt us", []).append(round(statistics.median(rts[20:]) * 1e6))
                    res.setdefault(name + " exchange 8x44MB each way GB/s", []).append(
                        round(2 * 8 * 44e6 / statistics.median(xs[1:]) / 1e9))
            rq.put(("sender exchange bytes ok", all(int(x[:8].sum()) == 8 * 5 for x in ex_in)))
            rq.put(("A/B (3 rounds each)", res))
        if "prof" in parts or "batch" in parts:
            await _prof_eplb(peer, rq, "cli", "prof" in parts)
        if "submit" in parts:
            addr = torch.zeros(1, dtype=torch.int64)
            await peer.recv(addr, tag=50)
            link = peer._links["cuda"]
            eng = link.engine
            src = torch.ones(100_000_000, dtype=torch.uint8, device="cuda")
            eng.acquire(src)
            torch.cuda.synchronize()
            seg = eng.target(link.remote_segment, 10**9, 0)
            res = {}
            for rd in (False, True):  # a burst of 16 x 100 MB: when does each report done?
                for rep in range(3):
                    t = time.perf_counter()
                    subs, ids = [], []
                    for _ in range(16):
                        if rd:
                            ids.append(eng._submit_read(seg, src.data_ptr(), int(addr[0]), 100_000_000))
                        else:
                            ids.append(eng._submit(seg, src.data_ptr(), int(addr[0]), 100_000_000))
                        subs.append(time.perf_counter() - t)
                    seen = []
                    for b in ids:
                        while eng._check(b) == 0:
                            pass
                        seen.append(time.perf_counter() - t)
                    what = f"burst {'read' if rd else 'write'} #{rep}"
                    res[f"{what} submits us"] = [round(x * 1e6) for x in subs]
                    res[f"{what} done us"] = [round(x * 1e6) for x in seen]
            for n in (64, 4096, 1 << 20, 100_000_000):
                ts = []
                for _ in range(300):
                    t = time.perf_counter()
                    eng.write_sync(seg, src.data_ptr(), int(addr[0]), n)
                    ts.append(time.perf_counter() - t)
                res[f"write_sync {n} B"] = round(statistics.median(ts[50:]) * 1e6, 1)
                ts, sub, polls = [], [], []
                for _ in range(300):
                    t = time.perf_counter()
                    b = eng._submit(seg, src.data_ptr(), int(addr[0]), n)
                    t1 = time.perf_counter()
                    k = 0
                    while eng._check(b) == 0:
                        k += 1
                    ts.append(time.perf_counter() - t)
                    sub.append(t1 - t)
                    polls.append(k)
                res[f"submit+spin {n} B"] = round(statistics.median(ts[50:]) * 1e6, 1)
                res[f"  of which submit {n} B"] = round(statistics.median(sub[50:]) * 1e6, 1)
                res[f"  polls {n} B"] = statistics.median(polls[50:])
                # through the asyncio poller
                ts = []
                for _ in range(300):
                    t = time.perf_counter()
                    await eng.write(seg, [(src.data_ptr(), int(addr[0]), n)], 4, 0)
                    ts.append(time.perf_counter() - t)
                res[f"engine.write (poller) {n} B"] = round(statistics.median(ts[50:]) * 1e6, 1)
            rq.put(("submit probe us", res))
            await peer.send(torch.zeros(1, dtype=torch.int64), tag=51)
        if "latency" in parts:
            s = torch.ones(1024, dtype=torch.float32, device="cuda")
            ts = []
            for i in range(300):
                _trace.take()
                t = time.perf_counter()
                await peer.send(s, tag=3)
                await peer.recv(s, tag=4)
                ts.append(time.perf_counter() - t)
                if i in (200, 201, 202):
                    rq.put(("LAT cli", i, t, _trace.take()))
            rq.put(("4KiB cuda rtt us", round(statistics.median(ts[50:]) * 1e6, 1)))
        await peer.close()
    am.run(main())


def micro(rq: Any) -> None:
    torch.cuda.set_device(0)

    def per_call(fn: Any, n: int = 3000) -> float:
        fn()
        t = time.perf_counter()
        for _ in range(n):
            fn()
        return round((time.perf_counter() - t) / n * 1e6, 2)

    x = torch.empty(4, device="cuda")
    ev = torch.cuda.Event()
    ev.record()
    st = torch.cuda.current_stream()
    out = {
        "Event()": per_call(torch.cuda.Event),
        "Event()+record()": per_call(lambda: torch.cuda.Event().record()),
        "ev.record(st)": per_call(lambda: ev.record(st)),
        "ev.query": per_call(ev.query),
        "current_stream()": per_call(torch.cuda.current_stream),
        "current_stream(dev)": per_call(lambda: torch.cuda.current_stream(torch.device("cuda", 0))),
        "_cuda_getCurrentRawStream(0)": per_call(lambda: torch._C._cuda_getCurrentRawStream(0)),
        "_cuda_getCurrentStream(0)": per_call(lambda: torch._C._cuda_getCurrentStream(0)),
        "t.device": per_call(lambda: x.device),
        "t.is_cuda": per_call(lambda: x.is_cuda),
        "t.get_device()": per_call(lambda: x.get_device()),
    }
    try:
        from cuda.bindings import runtime as rt
        _err, e2 = rt.cudaEventCreateWithFlags(rt.cudaEventDisableTiming)
        raw = torch._C._cuda_getCurrentRawStream(0)
        out["cudart.cudaEventRecord"] = per_call(lambda: rt.cudaEventRecord(e2, raw))
        out["cudart.cudaEventQuery"] = per_call(lambda: rt.cudaEventQuery(e2))
        out["cudart.cudaEventCreate+Destroy"] = per_call(
            lambda: rt.cudaEventDestroy(rt.cudaEventCreateWithFlags(rt.cudaEventDisableTiming)[1]))
    except Exception as e:
        out["cudart"] = repr(e)
    rq.put(("micro us/call", out))


def torch_rank(rank: int, port: int, rq: Any) -> None:
    for rnd in range(2):
        for k, gap in enumerate((30e-6, 0.0)):
            torch_run(rank, port + 1 + rnd * 2 + k, rq, gap, rnd == 0 and gap > 0)


def torch_run(rank: int, port: int, rq: Any, gap: float, trace: bool) -> None:
    """The torch backend: 16 x 100 MB isends per iteration (batch_isend_irecv), traced; then an
    EPLB-like exchange of 2 x 32 tensors; ``gap``: the loop thread's burst wait (0: off)."""
    import torch.distributed as dist

    import aiomooncake.torch  # noqa: F401
    import aiomooncake.torch.loop as tl

    tl.BURST_GAP_S = gap
    torch.cuda.set_device(0)
    dist.init_process_group("cpu:gloo,cuda:aiomooncake", init_method=f"tcp://127.0.0.1:{port}",
                            rank=rank, world_size=2)
    n, win = 100_000_000, 16
    bufs = [torch.full((n,), 3 if rank == 0 else 0, dtype=torch.uint8, device="cuda") for _ in range(win)]
    small_sizes = [2_000_000 if i % 2 else 7168 for i in range(32)]
    small_out = [torch.ones(k, dtype=torch.uint8, device="cuda") for k in small_sizes]
    small_in = [torch.empty(k, dtype=torch.uint8, device="cuda") for k in small_sizes]
    torch.cuda.synchronize()
    times = []
    for it in range(10):
        dist.barrier()
        _trace.take()
        t = time.perf_counter()
        kind = dist.isend if rank == 0 else dist.irecv
        works = dist.batch_isend_irecv([dist.P2POp(kind, b, 1 - rank, tag=7) for b in bufs])
        for w in works:
            w.wait()
        if rank == 1:
            torch.cuda.current_stream().synchronize()
        times.append(time.perf_counter() - t)
        marks = _trace.take()
        if it == 6 and trace:
            out: list[Any] = []
            for nm, x in marks:
                us = round((x - t) * 1e6)
                if out and out[-1][0] == nm:
                    out[-1] = (nm, out[-1][1], us, out[-1][3] + 1)
                else:
                    out.append((nm, us, us, 1))
            rq.put((f"torch rank {rank} trace (name, first us, last us, count)", out))
    ops = []
    for _ in range(8):
        dist.barrier()
        t = time.perf_counter()
        p2p = [dist.P2POp(dist.isend, x, 1 - rank, tag=8) for x in small_out]
        p2p += [dist.P2POp(dist.irecv, x, 1 - rank, tag=8) for x in small_in]
        for w in dist.batch_isend_irecv(p2p):
            w.wait()
        ops.append(time.perf_counter() - t)
    rts = []
    one = torch.ones(1024, device="cuda")
    for _ in range(60):
        t = time.perf_counter()
        if rank == 0:
            dist.send(one, 1)
            dist.recv(one, 1)
        else:
            dist.recv(one, 0)
            dist.send(one, 0)
        rts.append(time.perf_counter() - t)
    if rank == 0:
        rq.put((f"burst gap {gap * 1e6:.0f} us: 16x100MB GB/s",
                round(win * n / statistics.median(times[2:]) / 1e9),
                "exchange 2x32 tensors ms", round(statistics.median(ops[2:]) * 1e3, 2),
                "4K send+recv rtt us", round(statistics.median(rts[10:]) * 1e6)))
    if rank == 1:
        rq.put(("torch bytes ok", all(int(b[:16].sum()) == 48 for b in bufs)))
    dist.destroy_process_group()


def torch_eplb(rank: int, port: int, rq: Any) -> None:
    """EPLB 64 experts both ways through batch_isend_irecv: how long posting takes (the call's
    return) against the whole batch, under variants of the GIL switch interval and the loop
    thread's burst wait, alternating; then one traced batch summarized per mark on both ranks."""
    import torch.distributed as dist

    import aiomooncake.torch  # noqa: F401

    torch.cuda.set_device(0)
    dist.init_process_group("cpu:gloo,cuda:aiomooncake", init_method=f"tcp://127.0.0.1:{port}",
                            rank=rank, world_size=2)
    out = eplb_tensors(PROF_EXPERTS, 1.0, torch.device("cuda"))
    inn = [torch.empty_like(x) for x in out]
    torch.cuda.synchronize()
    import aiomooncake.torch.backend as tb
    import aiomooncake.torch.mesh as tm
    pooled, recycle = tb.record_ready, tm.recycle

    def fresh(t: torch.Tensor) -> Any:
        ev = torch.cuda.Event()
        ev.record(torch.cuda.current_stream(t.device))
        return ev
    variants = {"pooled events": (pooled, recycle), "fresh events": (fresh, lambda ev: None)}

    def batch(trace: bool = False) -> tuple[float, float]:
        dist.barrier()
        _trace.on = trace
        _trace.take()
        t = time.perf_counter()
        p2p = [dist.P2POp(dist.isend, x, 1 - rank, tag=i) for i, x in enumerate(out)]
        p2p += [dist.P2POp(dist.irecv, x, 1 - rank, tag=i) for i, x in enumerate(inn)]
        works = dist.batch_isend_irecv(p2p)
        t1 = time.perf_counter()
        for w in works:
            w.wait()
        torch.cuda.current_stream().synchronize()
        t2 = time.perf_counter()
        _trace.on = False
        if trace:
            summ: dict[str, list[float]] = {}
            for nm, x in _trace.take():
                summ.setdefault(nm, []).append((x - t) * 1e3)
            rq.put((f"TEPLB rank {rank} traced batch {(t2 - t) * 1e3:.1f} ms"
                    f" (posted by {(t1 - t) * 1e3:.1f});"
                    " mark: count first median last (ms)",
                    {k: (len(v), round(v[0], 2), round(statistics.median(v), 2), round(v[-1], 2))
                     for k, v in summ.items()}))
        return t1 - t, t2 - t

    for _ in range(2):
        batch()
    res: dict[str, list[Any]] = {}
    for _rnd in range(3):
        for name, (rec, rcy) in variants.items():
            tb.record_ready, tm.recycle = rec, rcy
            got = [batch() for _ in range(4)]
            res.setdefault(name, []).append(
                (round(statistics.median(g[0] for g in got) * 1e3, 1),
                 round(2 * sum(x.nbytes for x in out) / statistics.median(g[1] for g in got) / 1e9)))
    tb.record_ready, tm.recycle = pooled, recycle
    rq.put((f"TEPLB rank {rank} (posting ms, GB/s both ways) per round", res))
    batch(trace=True)
    dist.destroy_process_group()


def timeline(rq_items: dict[str, Any], variant: str) -> None:
    c = rq_items.get(f"TRACE-C-{variant}")
    s = rq_items.get(f"TRACE-S-{variant}")
    if not c or not s:
        return
    allm = sorted([("C " + n, t) for n, t in c[0]] + [("S " + n, t) for n, t in s[0]], key=lambda m: m[1])
    # split into iterations at each first send:post after a gap
    posts = [t for n, t in allm if n == "C send:post"]
    starts = [posts[0]] + [b for a, b in itertools.pairwise(posts) if b - a > 0.0005]
    for k, t0 in enumerate(starts[1:4], 1):
        t1 = starts[k + 1] if k + 1 < len(starts) else float("inf")
        seg = [(n, t) for n, t in allm if t0 - 0.002 <= t < t1]
        kinds: dict[str, list[float]] = {}
        for n, t in seg:
            kinds.setdefault(n, []).append((t - t0) * 1e6)
        print(f"  [{variant}] iteration {k}:")
        for n, ts in sorted(kinds.items(), key=lambda kv: kv[1][0]):
            print(f"    {n:18s} n={len(ts):2d} first {ts[0]:8.0f} us  last {ts[-1]:8.0f} us")
        if variant == "preposted" and k == 2:  # every mark of one iteration, runs collapsed
            rows: list[list[Any]] = []
            for n, t in seg:
                if t < t0:
                    continue
                if rows and rows[-1][0] == n:
                    rows[-1][2] += 1
                else:
                    rows.append([n, (t - t0) * 1e6, 1])
            for n, us, cnt in rows:
                print(f"      {us:8.1f} us {n}" + (f" x{cnt}" if cnt > 1 else ""))


# ------------------------------------------------------------ control-message floor ("ipc")
# What one 8-byte control message costs one way (half a round trip) between two processes of this
# host without aiomooncake: TCP sockets blocking or spinning, uvloop sleeping or spinning, and a
# flag in shared memory. The floor under every frame of the protocol.
IPC_N = 2000


def _one_way_us(ts: list[float]) -> float:
    return round(statistics.median(ts[200:]) / 2 * 1e6, 1)


def _sock_side(port_q: Any, role: str, mode: str, rq: Any) -> None:
    if role == "srv":
        ls = socket.socket()
        ls.bind(("127.0.0.1", 0))
        ls.listen(1)
        port_q.put(ls.getsockname()[1])
        so, _ = ls.accept()
    else:
        so = socket.create_connection(("127.0.0.1", port_q.get()))
    so.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    so.setblocking(mode != "spin")

    def recv() -> bytes:
        while True:
            try:
                return so.recv(64)
            except BlockingIOError:
                pass

    ts = []
    for _ in range(IPC_N):
        t = time.perf_counter()
        if role == "cli":
            so.send(b"x" * 8)
            recv()
        else:
            recv()
            so.send(b"x" * 8)
        ts.append(time.perf_counter() - t)
    if role == "cli":
        rq.put((f"ipc: tcp socket, {mode}, one way us", _one_way_us(ts)))


def _uvloop_side(port_q: Any, role: str, mode: str, rq: Any) -> None:
    async def main() -> None:
        inbox: asyncio.Queue[bytes] = asyncio.Queue()
        made: asyncio.Future[asyncio.Transport] = asyncio.get_running_loop().create_future()

        class Proto(asyncio.Protocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                made.set_result(transport)  # type: ignore[arg-type]

            def data_received(self, data: bytes) -> None:
                inbox.put_nowait(data)

        loop = asyncio.get_running_loop()
        if role == "srv":
            srv = await loop.create_server(Proto, "127.0.0.1", 0)
            port_q.put(srv.sockets[0].getsockname()[1])
        else:
            await loop.create_connection(Proto, "127.0.0.1", port_q.get())
        tr = await made
        spinning = mode == "spin"

        async def spin() -> None:
            while spinning:
                await asyncio.sleep(0)

        spinner = asyncio.ensure_future(spin())
        ts = []
        for _ in range(IPC_N):
            t = time.perf_counter()
            if role == "cli":
                tr.write(b"x" * 8)
                await inbox.get()
            else:
                await inbox.get()
                tr.write(b"x" * 8)
            ts.append(time.perf_counter() - t)
        spinning = False
        await spinner
        if role == "cli":
            rq.put((f"ipc: uvloop, {mode}, one way us", _one_way_us(ts)))
        await asyncio.sleep(0.05)

    am.run(main())


def _shm_side(path: str, role: str, rq: Any) -> None:
    fd = os.open(path, os.O_RDWR)
    m = mmap.mmap(fd, 4096)
    os.close(fd)
    flags = memoryview(m).cast("q")
    mine, theirs = (0, 8) if role == "cli" else (8, 0)
    ts = []
    for i in range(1, IPC_N + 1):
        t = time.perf_counter()
        if role == "cli":
            flags[mine] = i
        while flags[theirs] < i:
            pass
        if role == "srv":
            flags[mine] = i
        ts.append(time.perf_counter() - t)
    if role == "cli":
        rq.put(("ipc: shared-memory flag, spin, one way us", _one_way_us(ts)))
    flags.release()
    m.close()


def ipc_floor(rq: Any) -> None:
    path = "/dev/shm/aiomooncake-ipc-probe"
    for _ in range(2):
        for target, mode in ((_sock_side, "block"), (_sock_side, "spin"),
                             (_uvloop_side, "sleep"), (_uvloop_side, "spin"), (_shm_side, "")):
            if target is _shm_side:
                with open(path, "wb") as f:
                    f.write(bytes(4096))
                sides = [mp.Process(target=_shm_side, args=(path, r, rq)) for r in ("srv", "cli")]
            else:
                q = mp.Queue()
                sides = [mp.Process(target=target, args=(q, r, mode, rq)) for r in ("srv", "cli")]
            for p in sides:
                p.start()
            for p in sides[::-1]:
                p.join(60)
    os.unlink(path)

if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--parts", default="order,stream,micro,latency")
    a = ap.parse_args()
    parts = a.parts.split(",")
    if not set(parts) <= {"prof", "batch", "torcheplb"}:
        os.environ["AIOMOONCAKE_TRACE"] = "1"
    mp.set_start_method("spawn")
    portq, rq = mp.Queue(), mp.Queue()
    if "ipc" in parts:
        ipc_floor(rq)
    if "micro" in parts:
        m = mp.Process(target=micro, args=(rq,))
        m.start()
        m.join(120)
    for part, target in (("torcheplb", torch_eplb), ("torch", torch_rank)):
        if part in parts:  # two torch ranks
            with socket.socket() as so:
                so.bind(("127.0.0.1", 0))
                free = so.getsockname()[1]
            ranks = [mp.Process(target=target, args=(r, free, rq)) for r in (0, 1)]
            for p in ranks:
                p.start()
            for p in ranks:
                p.join(200)
                if p.is_alive():
                    p.kill()
    if set(parts) & {"order", "order2", "stream", "latency", "submit", "ab", "prof", "batch"}:
        s = mp.Process(target=server, args=(portq, rq, parts))
        s.start()
        port = portq.get(timeout=120)
        c = mp.Process(target=client, args=(port, rq, parts))
        c.start()
        c.join(400)
        s.join(30)
        for p in (s, c):
            if p.is_alive():
                p.kill()
        print("exit codes", s.exitcode, c.exitcode)
    items: dict[str, Any] = {}
    lat: dict[int, dict[str, Any]] = {}
    while True:
        try:
            item = rq.get(timeout=2)
        except queue.Empty:
            break
        if str(item[0]).startswith("LAT"):
            lat.setdefault(item[1], {})[item[0]] = item[2:]
            continue
        if str(item[0]).startswith("PROF-"):
            print(item[0], item[1], sep="\n", flush=True)
            continue
        if str(item[0]).startswith("TRACE"):
            items[item[0]] = item[1:]
            continue
        print(*item, flush=True)
    for i, sides in sorted(lat.items()):  # one 4 KiB round trip, both processes on one clock
        t0, cmarks = sides["LAT cli"]
        merged = [(x, "cli", nm) for nm, x in cmarks] + [(x, "   srv", nm) for nm, x in sides["LAT srv"][0]]
        print(f"4 KiB round trip #{i}:")
        rows: list[list[Any]] = []
        for x, who, nm in sorted(merged):
            if rows and rows[-1][1:3] == [who, nm]:
                rows[-1][3] += 1  # a run of the same mark: first time, count
            else:
                rows.append([x, who, nm, 1])
        for x, who, nm, n in rows:
            print(f"  {(x - t0) * 1e6:8.1f} us  {who} {nm}" + (f" x{n}" if n > 1 else ""))
    for v in ("gather", "preposted", "w1"):
        timeline(items, v)
