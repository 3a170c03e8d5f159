"""Where the host time of an EPLB exchange goes: two processes exchange ``--experts`` DeepSeek-V3
experts both ways with ``Peer.batch()`` (``--api torch``: one ``batch_isend_irecv`` through the
``"aiomooncake"`` backend, then a ``wait()`` per op), ``--iters`` times, under cProfile in both,
and print the median exchange time, its rate, and each rank's top functions by own time.

    python experiments/eplb_profile.py --device cuda --experts 64 --iters 10
    python experiments/eplb_profile.py --device cuda --experts 64 --iters 10 --api torch

Public API only. The copier (on one GPU, the process that runs every copy) is the rank whose data
plane reports copies in ``aiomooncake.planes.existing()`` statistics.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import multiprocessing as mp
import os
import pstats
import statistics
import time
from typing import Any

import torch

import aiomooncake
from aiomooncake import _trace, planes
from aiomooncake.bench.common import eplb_tensors


async def _exchange(peer: aiomooncake.Peer, outs: list[torch.Tensor], ins: list[torch.Tensor]) -> None:
    async with peer.batch() as b:
        for i, t in enumerate(outs):
            b.send(t, tag=i)
        for i, t in enumerate(ins):
            b.recv(t, tag=i)


async def _rank(rank: int, q: Any, args: argparse.Namespace) -> dict[str, Any]:
    dev = torch.device(args.device, 0) if args.device == "cuda" else torch.device("cpu")
    if rank == 1:
        lst = await aiomooncake.listen("127.0.0.1", 0, options=_options(args))
        q.put(lst.port)
        peer = await lst.accept()
        await lst.close()
    else:
        peer = await aiomooncake.connect("127.0.0.1", q.get(timeout=60), options=_options(args))
    outs = eplb_tensors(args.experts, args.scale, dev)
    ins = [torch.empty_like(t) for t in outs]
    nbytes = 2 * sum(t.nbytes for t in outs)
    for _ in range(2):
        await _exchange(peer, outs, ins)
    times, cpu = [], []
    prof = cProfile.Profile()
    for _ in range(args.iters):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        _trace.take()  # the timeline keeps the last exchange only
        t0, c0 = time.perf_counter(), time.process_time()
        if _trace.on:
            _trace.mark("x:start")
        if args.top:
            prof.enable()
        await _exchange(peer, outs, ins)
        if args.top:
            prof.disable()
        if _trace.on:
            _trace.mark("x:end")
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    marks = _trace.take()
    link = "cuda" if dev.type == "cuda" else "cpu"
    copies = sum(p.stats().writes_submitted for p in planes.existing() if p.kind == peer.transports[link])
    text = io.StringIO()
    if args.top:
        pstats.Stats(prof, stream=text).sort_stats(args.sort).print_stats(args.top)
    await peer.close()
    med = statistics.median(times)
    return {"rank": rank, "data_path": peer.data_path, "median_ms": med * 1e3,
            "cpu_ms": statistics.median(cpu) * 1e3,
            "gbps": nbytes / med / 1e9, "copies": copies, "profile": text.getvalue(), "marks": marks}


def _timeline(results: list[dict[str, Any]]) -> str:
    """Each rank's marks of the last exchange: how many, first and last, in ms from the earlier
    rank's start (perf_counter is one clock for the processes of a host)."""
    starts = [t for r in results for name, t in r.get("marks", []) if name == "x:start"]
    if not starts:
        return ""
    t0 = min(starts)
    lines = ["timeline of the last exchange (ms from the first start): mark count first last"]
    for r in sorted(results, key=lambda r: r["rank"]):
        seen: dict[str, list[float]] = {}
        for name, t in r.get("marks", []):
            seen.setdefault(name, []).append((t - t0) * 1e3)
        for name, ts in sorted(seen.items(), key=lambda kv: kv[1][0]):
            lines.append(f"  rank {r['rank']} {name:16s} {len(ts):5d} {ts[0]:8.2f} {ts[-1]:8.2f}")
    return "\n".join(lines)


def _torch_rank(rank: int, port: int, args: argparse.Namespace) -> dict[str, Any]:
    """The same exchange through the torch backend (the callers' pattern: one batch, a wait each)."""
    import torch.distributed as dist
    from _pair import init_groups

    _, dev = init_groups(rank, port, args.device)
    if dev.type == "cuda":
        dev = torch.device("cuda", 0)
    outs = eplb_tensors(args.experts, args.scale, dev)
    ins = [torch.empty_like(t) for t in outs]
    nbytes = 2 * sum(t.nbytes for t in outs)
    other = 1 - rank

    def exchange() -> None:
        ops = [dist.P2POp(dist.isend, t, other, tag=i) for i, t in enumerate(outs)]
        ops += [dist.P2POp(dist.irecv, t, other, tag=i) for i, t in enumerate(ins)]
        for w in dist.batch_isend_irecv(ops):
            w.wait()
        if dev.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(2):
        exchange()
    times, cpu = [], []
    prof = cProfile.Profile()
    for _ in range(args.iters):
        dist.barrier()
        t0, c0 = time.perf_counter(), time.process_time()
        if args.top:
            prof.enable()
        exchange()
        if args.top:
            prof.disable()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    link = "cuda" if dev.type == "cuda" else "cpu"
    copies = sum(p.stats().writes_submitted for p in planes.existing() if p.kind in ("cuda-ipc", "shm")
                 and (link == "cuda") == (p.kind == "cuda-ipc"))
    text = io.StringIO()
    if args.top:
        pstats.Stats(prof, stream=text).sort_stats(args.sort).print_stats(args.top)
    dist.destroy_process_group()
    med = statistics.median(times)
    return {"rank": rank, "data_path": f"torch backend, {link}", "median_ms": med * 1e3,
            "cpu_ms": statistics.median(cpu) * 1e3, "gbps": nbytes / med / 1e9, "copies": copies,
            "profile": text.getvalue()}


def _options(args: argparse.Namespace) -> aiomooncake.Options:
    extra: dict[str, Any] = {}
    for item in args.option:  # NAME=VALUE: an Options field (bool, int or float)
        name, _, value = item.partition("=")
        kind = type(getattr(aiomooncake.Options(), name))
        if kind in (bool, type(None)):  # (None: an automatic choice, e.g. inline_cuda)
            extra[name] = value.lower() in ("1", "true", "yes")
        else:
            extra[name] = kind(float(value))
    if args.rendezvous:
        extra.update(eager_threshold=0, shm_eager_threshold=0)
    return aiomooncake.Options(**extra)


def _child(rank: int, q: Any, out: Any, args: argparse.Namespace) -> None:
    if args.cpus:  # one core set per rank ("0,1;8,9"): a rank on a core's SMT sibling runs slower
        cpus = args.cpus.split(";")[rank]
        os.sched_setaffinity(0, {int(c) for c in cpus.split(",")})
    if args.gc == "off":
        gc.disable()
    elif args.gc == "freeze":  # after torch's import: its objects leave the collections' scans
        gc.collect()
        gc.freeze()
    for item in args.tune:  # NAME=VALUE: an aiomooncake.tuning knob, for an A/B between launches
        name, _, value = item.partition("=")
        setattr(aiomooncake.tuning, name, type(getattr(aiomooncake.tuning, name))(float(value)))
    if args.api == "torch":
        out.put(_torch_rank(rank, args.port, args))
    else:
        out.put(aiomooncake.run(_rank(rank, q, args)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--scale", type=float, default=1.0)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--top", type=int, default=25, help="functions to list; 0: no profiler (plain timing)")
    p.add_argument("--tune", action="append", default=[], metavar="NAME=VALUE",
                   help="set an aiomooncake.tuning knob in both ranks (repeatable)")
    p.add_argument("--sort", default="tottime", choices=("tottime", "cumulative", "ncalls"))
    p.add_argument("--rendezvous", action="store_true",
                   help="no eager messages: on CPU, a proxy for the control work of the CUDA path")
    p.add_argument("--gc", default="on", choices=("on", "off", "freeze"),
                   help="the garbage collector in both ranks: as usual, disabled, or gc.freeze() first")
    p.add_argument("--api", default="core", choices=("core", "torch"),
                   help="core: Peer.batch(); torch: batch_isend_irecv through the backend")
    p.add_argument("--option", action="append", default=[], metavar="NAME=VALUE",
                   help="an aiomooncake.Options field for both ranks (repeatable), e.g. one_copier=0")
    p.add_argument("--cpus", default="",
                   help="pin the ranks: rank 0's cores, then rank 1's, e.g. '0,1;4,5' (default: not)")
    p.add_argument("--timeline", action="store_true",
                   help="trace the hot path (AIOMOONCAKE_TRACE) and print when each mark first and "
                        "last fired in the last exchange (core API)")
    args = p.parse_args()
    if args.timeline:
        os.environ["AIOMOONCAKE_TRACE"] = "1"  # read at import by the spawned ranks
    if args.api == "torch":
        from _pair import free_port
        args.port = free_port()
    ctx = mp.get_context("spawn")
    q, out = ctx.Queue(), ctx.Queue()
    procs = [ctx.Process(target=_child, args=(r, q, out, args)) for r in (1, 0)]
    for pr in procs:
        pr.start()
    results = sorted((out.get(timeout=600) for _ in procs), key=lambda r: r["rank"])
    for pr in procs:
        pr.join(60)
    for r in results:
        role = "copier" if r["copies"] else "other"
        print(f"== rank {r['rank']} ({role}, {r['data_path']}): median {r['median_ms']:.2f} ms per "
              f"exchange ({r['cpu_ms']:.2f} ms of CPU), {r['gbps']:.0f} GB/s both ways, {r['copies']} copies")
        print(r["profile"])
    if args.timeline:
        print(_timeline(results))


if __name__ == "__main__":
    main()
