"""EPLB expert-weight rebalance, the way SGLang's expert_location_updater moves weights, on any backend.

N ranks each hold the routed experts of several MoE layers with DeepSeek-V3 FP8 shapes (per expert:
w13 [4096, 7168] fp8 = 29,360,128 B, w2 [7168, 2048] fp8 = 14,680,064 B, and their fp32 128x128
block scales, 7,168 B and 3,584 B). A random rebalance plan (old and new physical-to-logical expert
maps, the same on every rank) is drawn from ``--seed``; every layer is then updated with one
``batch_isend_irecv``: irecv into temporary buffers (views into per-layer ``[experts, ...]`` tensors),
isend straight from the weights, one P2POp per tensor per moved expert, wait for all, copy the
buffers in (experts already on the rank are copied locally, like SGLang's "same-gpu" and
"free-rider" cases). With ``--chunk-experts N`` (default 32) a layer's operations go out in several
``batch_isend_irecv`` calls of at most N logical experts each, waited for one after the other, as
clients that bound their in-flight memory do; the chunks are ranges of logical expert ids, so every
rank puts both ends of a transfer into the same chunk. Every byte is verified at the end.

Run it by itself (it spawns the ranks) or under torchrun::

    python examples/eplb_rebalance.py --nprocs 2 --scale 0.125 --backend aiomooncake
    python examples/eplb_rebalance.py --nprocs 2 --scale 0.125 --backend gloo
    torchrun --nproc-per-node 8 examples/eplb_rebalance.py --device cuda --backend nccl

``--backend`` is gloo, nccl, mooncake (Mooncake's own process group, ``from mooncake import pg``),
aiomooncake, or any torch backend string such as ``cpu:gloo,cuda:aiomooncake``. ``--scale`` shrinks
the hidden and intermediate sizes (bytes shrink by its square) so the CPU can run it.

Output: the plan, one line per layer (time, bytes received, GB/s), a summary, and a final
``RESULT {json}`` line for scripts.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import socket
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

BLOCK = 128  # DeepSeek-V3's FP8 block-quantization tile
HIDDEN, INTERMEDIATE = 7168, 2048  # DeepSeek-V3 hidden size and MoE intermediate size

# ------------------------------------------------------------------------------------- shapes


@dataclass(frozen=True)
class ExpertShapes:
    hidden: int
    inter: int

    @classmethod
    def scaled(cls, scale: float) -> ExpertShapes:
        def dim(full: int) -> int:
            return max(BLOCK, round(full * scale / BLOCK) * BLOCK)
        return cls(dim(HIDDEN), dim(INTERMEDIATE))

    def tensors(self) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
        h, i = self.hidden, self.inter
        return [
            ("w13_weight", (2 * i, h), torch.float8_e4m3fn),
            ("w2_weight", (h, i), torch.float8_e4m3fn),
            ("w13_weight_scale_inv", (-(-2 * i // BLOCK), -(-h // BLOCK)), torch.float32),
            ("w2_weight_scale_inv", (-(-h // BLOCK), -(-i // BLOCK)), torch.float32),
        ]

    def nbytes(self) -> list[int]:
        out = []
        for _, shape, dtype in self.tensors():
            n = 1
            for d in shape:
                n *= d
            out.append(n * torch.empty((), dtype=dtype).element_size())
        return out


# --------------------------------------------------------------------------------------- plan


def draw_map(rng: random.Random, num_physical: int, num_logical: int) -> list[int]:
    """A physical-to-logical map holding every logical expert at least once."""
    phys = list(range(num_logical)) + [rng.randrange(num_logical) for _ in range(num_physical - num_logical)]
    rng.shuffle(phys)
    return phys


def draw_plan(seed: int, layers: int, num_physical: int,
              num_logical: int) -> list[tuple[list[int], list[int]]]:
    rng = random.Random(seed)
    return [(draw_map(rng, num_physical, num_logical), draw_map(rng, num_physical, num_logical))
            for _ in range(layers)]


def _split(n_items: int, n_chunks: int, chunk: int) -> slice:
    """Chunk ``chunk`` of ``n_items`` split into ``n_chunks`` near-equal contiguous chunks."""
    base, extra = divmod(n_items, n_chunks)
    start = chunk * base + min(chunk, extra)
    return slice(start, start + base + (1 if chunk < extra else 0))


def _chunk_of(n_items: int, n_chunks: int, item: int) -> int:
    for c in range(n_chunks):
        s = _split(n_items, n_chunks, c)
        if s.start <= item < s.stop:
            return c
    raise AssertionError("item out of range")


def _ranks_holding(pmap: Sequence[int], logical: int, per_rank: int) -> list[int]:
    out: list[int] = []
    for slot, e in enumerate(pmap):
        r = slot // per_rank
        if e == logical and (not out or out[-1] != r):
            out.append(r)
    return out


def _routes(old: Sequence[int], new: Sequence[int], logical: int, per_rank: int, gpus_per_node: int,
            rank: int) -> tuple[list[int], list[int], list[int], list[int]]:
    """Who sends ``logical`` to whom, computed identically on every rank (as SGLang does): ranks that
    need it and lack it get it from a holder on their node if there is one, else from any holder;
    the needy ranks are split evenly among the candidate holders."""
    node = rank // gpus_per_node
    holders = _ranks_holding(old, logical, per_rank)
    holder_nodes = {h // gpus_per_node for h in holders}
    local_holders = [h for h in holders if h // gpus_per_node == node]
    needy = [r for r in _ranks_holding(new, logical, per_rank) if r not in holders]
    local_needy = [r for r in needy if r // gpus_per_node == node] if local_holders else []
    remote_needy = [r for r in needy if r // gpus_per_node not in holder_nodes]
    return local_holders, local_needy, holders, remote_needy


@dataclass
class LayerOps:
    ops: list[dist.P2POp]
    experts: list[int]  # the logical expert each op moves (ops are sorted by it)
    copies: list[tuple[int, int]]  # (temp buffer slot, weight slot)
    recv_bytes: int
    send_bytes: int
    moved_slots: int


def build_layer_ops(weights: list[torch.Tensor], temp: list[torch.Tensor], old: Sequence[int],
                    new: Sequence[int], per_rank: int, gpus_per_node: int, rank: int,
                    group: dist.ProcessGroup | None = None) -> LayerOps:
    first, last = rank * per_rank, (rank + 1) * per_rank
    infos: list[tuple[int, list[dist.P2POp]]] = []
    copies: list[tuple[int, int]] = []
    recv_bytes = send_bytes = moved = 0

    # Receives (and local copies) for every slot whose expert changes.
    for dst in range(first, last):
        e = new[dst]
        if old[dst] == e:
            continue
        moved += 1
        local = next((s for s in range(first, last) if old[s] == e), None)
        if local is not None:  # already on this rank: copy it aside now, in place later
            for w, t in zip(weights, temp, strict=True):
                t[dst - first].copy_(w[local - first])
            copies.append((dst - first, dst - first))
            continue
        twin = next((s for s in range(first, dst) if new[s] == e), None)
        if twin is not None:  # an earlier slot of this rank receives the same expert: reuse it
            copies.append((twin - first, dst - first))
            continue
        local_holders, local_needy, holders, remote_needy = _routes(
            old, new, e, per_rank, gpus_per_node, rank)
        if rank in local_needy:
            src = local_holders[_chunk_of(len(local_needy), len(local_holders), local_needy.index(rank))]
        else:
            src = holders[_chunk_of(len(remote_needy), len(holders), remote_needy.index(rank))]
        infos.append((e, [dist.P2POp(dist.irecv, t[dst - first], src, group) for t in temp]))
        recv_bytes += sum(t[dst - first].nbytes for t in temp)
        copies.append((dst - first, dst - first))

    # Sends: each expert this rank holds, once, to the ranks routed to it.
    done: set[int] = set()
    for src_slot in range(first, last):
        e = old[src_slot]
        if e in done:
            continue
        done.add(e)
        local_holders, local_needy, holders, remote_needy = _routes(
            old, new, e, per_rank, gpus_per_node, rank)
        dsts: list[int] = []
        if rank in local_holders and local_needy:
            dsts += local_needy[_split(len(local_needy), len(local_holders), local_holders.index(rank))]
        if remote_needy:
            dsts += remote_needy[_split(len(remote_needy), len(holders), holders.index(rank))]
        if dsts:
            infos.append((e, [dist.P2POp(dist.isend, w[src_slot - first], d, group)
                               for d in dsts for w in weights]))
            send_bytes += len(dsts) * sum(w[src_slot - first].nbytes for w in weights)

    infos.sort(key=lambda x: x[0])  # both sides order a pair's messages by logical expert id
    return LayerOps([op for _, ops in infos for op in ops], [e for e, ops in infos for _ in ops], copies,
                    recv_bytes, send_bytes, moved)


def chunks(lo: LayerOps, chunk_experts: int) -> list[list[dist.P2POp]]:
    """The layer's ops in batches of at most ``chunk_experts`` logical experts (0: one batch). A
    chunk is a range of logical expert ids, the same on every rank, so a send and its receive always
    fall into the same ``batch_isend_irecv`` on their two ranks."""
    if chunk_experts <= 0:
        return [lo.ops] if lo.ops else []
    out: dict[int, list[dist.P2POp]] = {}
    for op, e in zip(lo.ops, lo.experts, strict=True):
        out.setdefault(e // chunk_experts, []).append(op)
    return [out[k] for k in sorted(out)]


def run_layer(weights: list[torch.Tensor], temp: list[torch.Tensor], lo: LayerOps,
              chunk_experts: int = 0) -> float:
    """Execute one layer's update; return the seconds spent in batch_isend_irecv and the waits."""
    t0 = time.perf_counter()
    for batch in chunks(lo, chunk_experts):
        for req in dist.batch_isend_irecv(batch):
            req.wait()
    comm = time.perf_counter() - t0
    for src, dst in lo.copies:
        for w, t in zip(weights, temp, strict=True):
            w[dst].copy_(t[src])
    return comm


# ------------------------------------------------------------------------------------ content


class Content:
    """Deterministic bytes of (layer, logical expert, tensor): a random pattern per tensor kind plus
    the expert id, and the (layer, expert) pair written into the first bytes."""

    def __init__(self, shapes: ExpertShapes, device: torch.device, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.patterns = [torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g).to(device)
                         for n in shapes.nbytes()]

    def fill(self, dest: torch.Tensor, kind: int, layer: int, expert: int) -> None:
        out = dest.view(-1).view(torch.uint8)
        torch.add(self.patterns[kind], (layer * 31 + expert * 7 + kind) % 256, out=out)
        header = torch.tensor([layer, expert], dtype=torch.int32).view(torch.uint8)
        n = min(out.numel(), header.numel())
        out[:n].copy_(header[:n])

    def check(self, got: torch.Tensor, kind: int, layer: int, expert: int, scratch: torch.Tensor) -> bool:
        self.fill(scratch, kind, layer, expert)
        return torch.equal(got.view(-1).view(torch.uint8), scratch.view(-1).view(torch.uint8))


# ------------------------------------------------------------------------------------ backends


def backend_string(name: str, device: str) -> tuple[str, object | None]:
    """The init_process_group backend string (and pg_options) for ``--backend``."""
    if name == "aiomooncake" or "aiomooncake" in name:
        import aiomooncake.torch  # noqa: F401  (registers the backend)
        return name, None
    if name == "mooncake":
        try:
            from mooncake import pg
        except ImportError as e:
            why = " ".join(str(e).split()).rstrip(".")
            raise SystemExit(
                "--backend mooncake needs Mooncake's own process group (`from mooncake import pg`), which "
                f"is not available here: {why}. The CPU wheel (mooncake-transfer-engine-non-cuda) carries "
                "no PG extension built for this torch; install a CUDA Mooncake wheel built with the EP/PG "
                "extensions for your torch version, or pick another --backend.") from None
        return ("mooncake" if device == "cuda" else "mooncake-cpu"), pg
    if name == "nccl" and device != "cuda":
        raise SystemExit("--backend nccl needs --device cuda")
    return name, None


# ---------------------------------------------------------------------------------------- main


def _options(name: str, mooncake_pg: object | None, world: int, device: torch.device) -> object | None:
    if mooncake_pg is None:
        return None
    active = torch.ones(world, dtype=torch.int32, device=device)
    return mooncake_pg.MooncakeBackendOptions(active)  # type: ignore[attr-defined]


def run(args: argparse.Namespace, rank: int, world: int, local_rank: int) -> dict[str, object] | None:
    """Join the group(s): the first backend makes the default group, each further one a new_group
    over the same ranks, so one launch compares them on the same plans and tensors."""
    # (more ranks than GPUs share them round-robin, e.g. two ranks on a one-GPU machine)
    device = (torch.device("cuda", local_rank % max(1, torch.cuda.device_count())) if args.device == "cuda"
              else torch.device("cpu"))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    names = list(dict.fromkeys(args.backend))
    specs = [backend_string(n, args.device) for n in names]
    timeout = datetime.timedelta(seconds=args.timeout)
    backend, mooncake_pg = specs[0]
    kwargs: dict[str, object] = {}
    opts = _options(backend, mooncake_pg, world, device)
    if opts is not None:
        kwargs["pg_options"] = opts
    if device.type == "cuda" and backend == "nccl":
        kwargs["device_id"] = device
    dist.init_process_group(backend, rank=rank, world_size=world, timeout=timeout, **kwargs)  # type: ignore[arg-type]
    try:
        groups: dict[str, dist.ProcessGroup] = {names[0]: dist.group.WORLD}  # type: ignore[dict-item]
        for name, (b, mpg) in zip(names[1:], specs[1:], strict=True):
            groups[name] = dist.new_group(list(range(world)), backend=b, timeout=timeout,
                                          pg_options=_options(b, mpg, world, device))
        return _rebalance(args, rank, world, device, groups)
    finally:
        dist.destroy_process_group()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _gather_to_zero(values: list[float], rank: int, world: int) -> list[list[float]]:
    """Point-to-point gather on the default group (the aiomooncake group has no collectives)."""
    t = torch.tensor(values, dtype=torch.float64)
    if rank != 0:
        dist.send(t, 0, tag=7)
        return []
    out = [values]
    for r in range(1, world):
        buf = torch.empty_like(t)
        dist.recv(buf, r, tag=7)
        out.append(buf.tolist())
    return out


def _rebalance(args: argparse.Namespace, rank: int, world: int, device: torch.device,
               groups: dict[str, dist.ProcessGroup]) -> dict[str, object] | None:
    shapes = ExpertShapes.scaled(args.scale)
    per_rank = args.experts_per_rank
    num_physical = per_rank * world
    num_logical = num_physical - args.redundant
    if num_logical < 1:
        raise SystemExit("--redundant must be smaller than nprocs * --experts-per-rank")
    names = list(groups)
    content = Content(shapes, device, args.seed)
    plans = [draw_plan(args.seed + it, args.layers, num_physical, num_logical) for it in range(args.iters)]
    weights = [[torch.empty((per_rank, *shape), dtype=dtype, device=device)
                for _, shape, dtype in shapes.tensors()] for _ in range(args.layers)]
    temp = [torch.empty_like(w) for w in weights[0]]  # one set of buffers, reused by every layer (as SGLang)
    scratch = [torch.empty(shape, dtype=dtype, device=device) for _, shape, dtype in shapes.tensors()]
    expert_bytes = sum(shapes.nbytes())
    if rank == 0:
        desc = ", ".join(f"{n} {list(s)} {str(d).removeprefix('torch.')}" for n, s, d in shapes.tensors())
        print(f"EPLB rebalance: {world} ranks, backend {' vs '.join(names)}, device {args.device}, "
              f"{args.layers} layers x {per_rank} experts/rank ({num_logical} logical, {args.redundant} "
              f"redundant), expert = {expert_bytes:,} B ({desc}), batches of at most "
              f"{args.chunk_experts or 'all'} experts", flush=True)
        for layer, (old, new) in enumerate(plans[0]):
            moves = sum(1 for a, b in zip(old, new, strict=True) if a != b)
            print(f"  plan layer {layer}: {moves}/{num_physical} slots change; old {old} -> new {new}",
                  flush=True)

    times: dict[str, list[float]] = {n: [] for n in names}  # [iteration * layers + layer] seconds, this rank
    comms: dict[str, list[float]] = {n: [] for n in names}  # the batch_isend_irecv + wait part of it
    moved: dict[str, list[float]] = {n: [] for n in names}
    verified = 0
    for it, plan in enumerate(plans):
        order = names[it % len(names):] + names[:it % len(names)]  # rotate: drift hits every backend alike
        for name in order:
            group = groups[name]
            for layer, (old, _) in enumerate(plan):
                for slot in range(per_rank):
                    for k, w in enumerate(weights[layer]):
                        content.fill(w[slot], k, layer, old[rank * per_rank + slot])
            _sync(device)
            for layer, (old, new) in enumerate(plan):
                dist.barrier(group=group)
                t0 = time.perf_counter()
                lo = build_layer_ops(weights[layer], temp, old, new, per_rank, args.gpus_per_node, rank,
                                     group)
                comm = run_layer(weights[layer], temp, lo, args.chunk_experts)
                _sync(device)
                times[name].append(time.perf_counter() - t0)
                comms[name].append(comm)
                moved[name].append(float(lo.recv_bytes))
            if not args.no_verify:
                for layer, (_, new) in enumerate(plan):
                    for slot in range(per_rank):
                        e = new[rank * per_rank + slot]
                        for k, w in enumerate(weights[layer]):
                            if not content.check(w[slot], k, layer, e, scratch[k]):
                                raise SystemExit(f"rank {rank}: {name}: iteration {it} layer {layer} slot "
                                                 f"{slot} (expert {e}) tensor {k}: WRONG BYTES")
                            verified += w[slot].nbytes

    gathered = {n: (_gather_to_zero(times[n], rank, world), _gather_to_zero(moved[n], rank, world),
                    _gather_to_zero(comms[n], rank, world)) for n in names}
    all_v = _gather_to_zero([float(verified)], rank, world)
    if rank != 0:
        return None
    skip = args.layers * min(args.warmup, args.iters - 1)
    per_backend: dict[str, dict[str, object]] = {}
    for name in names:
        all_t, all_b, all_c = gathered[name]
        per_layer = [max(ts[i] for ts in all_t) for i in range(len(all_t[0]))]  # done when its last rank is
        per_comm = [max(cs[i] for cs in all_c) for i in range(len(all_c[0]))]
        layer_bytes = [sum(bs[i] for bs in all_b) for i in range(len(all_b[0]))]
        for i, (t, c, b) in enumerate(zip(per_layer, per_comm, layer_bytes, strict=True)):
            it, layer = divmod(i, args.layers)
            print(f"  {name:>12} iter {it} layer {layer}: {t * 1e3:8.2f} ms (comm {c * 1e3:7.2f} ms)  "
                  f"{b / 1e6:9.2f} MB received  {b / t / 1e9 if t > 0 else 0.0:6.2f} GB/s", flush=True)
        steady, steady_b = per_layer[skip:], layer_bytes[skip:]
        med = statistics.median(steady)
        gbps = sum(steady_b) / sum(steady) / 1e9 if sum(steady) > 0 else 0.0
        per_backend[name] = {
            "median_layer_ms": med * 1e3,
            "median_comm_ms": statistics.median(per_comm[skip:]) * 1e3,
            "gbps": gbps,
            "layer_ms": [t * 1e3 for t in per_layer],
            "comm_ms": [c * 1e3 for c in per_comm],
            "layer_bytes": layer_bytes,
        }
    total_verified = int(sum(v[0] for v in all_v))
    for name in names:
        r = per_backend[name]
        print(f"summary: backend {name}: median {r['median_layer_ms']:.2f} ms per layer (of which "
              f"batch_isend_irecv + wait {r['median_comm_ms']:.2f} ms), {r['gbps']:.2f} GB/s aggregate, "
              f"{len(gathered[name][0][0]) - skip} layers timed", flush=True)
    if len(names) > 1:
        base = per_backend[names[0]]["median_layer_ms"]
        print("relative to " + names[0] + ": " + ", ".join(
            f"{n} {per_backend[n]['median_layer_ms'] / base:.2f}x time" for n in names[1:]), flush=True)  # type: ignore[operator]
    if not args.no_verify:
        print(f"verified {total_verified:,} B bit-exact on all ranks", flush=True)
    first = per_backend[names[0]]
    result = {"backend": names[0], "device": args.device, "world": world, "layers": args.layers,
              "iters": args.iters, **first, "expert_bytes": expert_bytes,
              "verified_bytes": None if args.no_verify else total_verified, "backends": per_backend}
    print("RESULT " + json.dumps(result), flush=True)
    return result


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _spawned(local_rank: int, args: argparse.Namespace) -> None:
    os.environ["RANK"] = os.environ["LOCAL_RANK"] = str(local_rank)
    if "OMP_NUM_THREADS" not in os.environ:
        # As torchrun does: several ranks per host each running a full-width intra-op thread pool
        # oversubscribe the cores, and the weight copies then stall in OpenMP barriers.
        torch.set_num_threads(1)
    run(args, local_rank, args.nprocs, local_rank)


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--nprocs", type=int, default=0, help="spawn this many ranks (0: use torchrun's env)")
    p.add_argument("--backend", nargs="+", default=["aiomooncake"],
                   help="gloo | nccl | mooncake | aiomooncake | any torch backend string; several: "
                        "compared in one launch, iterations rotating among them")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--layers", type=int, default=4, help="MoE layers (DeepSeek-V3 has 58)")
    p.add_argument("--experts-per-rank", type=int, default=4, help="physical experts per rank")
    p.add_argument("--redundant", type=int, default=1, help="redundant physical experts in total")
    p.add_argument("--scale", type=float, default=1.0,
                   help="multiply the hidden/intermediate sizes (bytes shrink by its square)")
    p.add_argument("--gpus-per-node", type=int, default=8, help="for the same-node routing rule")
    p.add_argument("--chunk-experts", type=int, default=32,
                   help="logical experts per batch_isend_irecv (0: the whole layer in one batch)")
    p.add_argument("--iters", type=int, default=1, help="rebalances to run (each with a new plan)")
    p.add_argument("--warmup", type=int, default=0, help="iterations left out of the summary")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=300.0, help="process group timeout, seconds")
    p.add_argument("--no-verify", action="store_true", help="skip the byte-for-byte check")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    for name in args.backend:
        backend_string(name, args.device)  # fail early (e.g. mooncake missing), before spawning
    if args.nprocs > 0:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        os.environ["WORLD_SIZE"] = str(args.nprocs)
        import torch.multiprocessing as mp
        mp.spawn(_spawned, args=(args,), nprocs=args.nprocs)
        return 0
    if "RANK" not in os.environ:
        print("run under torchrun, or pass --nprocs N", file=sys.stderr)
        return 2
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    run(args, rank, world, int(os.environ.get("LOCAL_RANK", rank)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
