"""Stream bandwidth of the same-host CPU path against the alternatives, in the same run.

Compares, for CPU tensors between two processes on this host (``stream`` mode: ``--window``
messages in flight per iteration, see docs/benchmarks.md):

    aiomooncake-shm   aiomooncake with host_transport="shm" (process_vm_writev)
    aiomooncake-te    aiomooncake with host_transport="te" (the Transfer Engine over TCP)
    te-raw            the Transfer Engine's transfer_sync_write, the engine's limit
    gloo              torch.distributed gloo isend/irecv

Each round runs ``python -m aiomooncake.bench`` twice back to back (once with
``AIOMOONCAKE_HOST_TRANSPORT=shm`` for aiomooncake, te-raw and gloo; once with ``=te`` for
aiomooncake alone). Shared, noisy machines make single numbers unreliable, so every round yields a
ratio per size taken within that round, and the table shows medians over the rounds: GB/s and
the ratios aiomooncake-shm / gloo, / te-raw and / aiomooncake-te.

    python scripts/bench_shm.py                       # 5 rounds, 32K,64K,1M,16M,64M,256M
    python scripts/bench_shm.py --rounds 3 --sizes 1M,256M --json shm.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMPLS = ("aiomooncake-shm", "aiomooncake-te", "te-raw", "gloo")
RATIOS = (("gloo", "gloo"), ("te-raw", "te-raw"), ("aiomooncake-te", "aio-te"))


def _bench(impls: str, host_transport: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "bench.json")
        cmd = [sys.executable, "-m", "aiomooncake.bench", "--device", "cpu", "--modes", "stream",
               "--impls", impls, "--sizes", args.sizes, "--iters", str(args.iters),
               "--warmup", str(args.warmup), "--window", str(args.window), "--max-bytes", args.max_bytes,
               "--no-progress",
               "--json", out]
        # this checkout's package, whatever an editable install elsewhere points to
        path = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)
        env = dict(os.environ, AIOMOONCAKE_HOST_TRANSPORT=host_transport, PYTHONPATH=path)
        proc = subprocess.run(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)
        if proc.returncode != 0 or not os.path.exists(out):
            sys.stderr.write(proc.stdout[-4000:])
            raise SystemExit(f"the benchmark failed (exit {proc.returncode}): {' '.join(cmd)}")
        with open(out) as f:
            records: list[dict[str, Any]] = json.load(f)
        return records


def _round(args: argparse.Namespace) -> dict[str, dict[int, float]]:
    """GB/s per implementation and size, one round."""
    got: dict[str, dict[int, float]] = {name: {} for name in IMPLS}
    runs = (("aiomooncake,te-raw,gloo", "shm", {"aiomooncake": "aiomooncake-shm"}),
            ("aiomooncake", "te", {"aiomooncake": "aiomooncake-te"}))
    for impls, host_transport, rename in runs:
        for rec in _bench(impls, host_transport, args):
            if rec.get("gbps"):
                got[rename.get(rec["impl"], rec["impl"])][int(rec["bytes"])] = float(rec["gbps"])
    return got


def _size(text: str) -> str:
    n = int(text)
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale and n % scale == 0:
            return f"{n // scale} {unit}"
    return f"{n} B"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--sizes", default="32K,64K,1M,16M,64M,256M")
    # Many iterations for small sizes; --max-bytes shrinks them for the large ones. 32K comes first
    # because gloo's first point, at 64K, at times stalled at ~4 ms per iteration throughout.
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--max-bytes", default="4G")
    ap.add_argument("--window", type=int, default=4)
    ap.add_argument("--json", help="write every round's numbers and the medians here")
    args = ap.parse_args()

    rounds: list[dict[str, dict[int, float]]] = []
    for r in range(args.rounds):
        rounds.append(_round(args))
        print(f"round {r + 1}/{args.rounds}: " + "; ".join(
            f"{name} " + " ".join(f"{v:.2f}" for _, v in sorted(rounds[-1][name].items()))
            for name in IMPLS), flush=True)

    sizes = sorted({n for rd in rounds for per in rd.values() for n in per})
    table: list[dict[str, Any]] = []
    for n in sizes:
        row: dict[str, Any] = {"bytes": n}
        for name in IMPLS:
            vals = [rd[name][n] for rd in rounds if n in rd[name]]
            row[name] = statistics.median(vals) if vals else None
        for ref, label in RATIOS:
            ratios = [rd["aiomooncake-shm"][n] / rd[ref][n] for rd in rounds
                      if n in rd["aiomooncake-shm"] and rd[ref].get(n)]
            row[f"shm/{label}"] = statistics.median(ratios) if ratios else None
        table.append(row)

    cols = [*IMPLS, *(f"shm/{label}" for _, label in RATIOS)]
    print(f"\nstream, CPU, {args.window} messages in flight, GB/s: medians of {args.rounds} rounds "
          "(ratios: median of the per-round ratios)")
    print("| size | " + " | ".join(cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    for row in table:
        cells = []
        for c in cols:
            v = row[c]
            cells.append("-" if v is None else (f"{v:.2f}x" if "/" in c else f"{v:.2f}"))
        print(f"| {_size(str(row['bytes']))} | " + " | ".join(cells) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rounds": [{k: {str(n): v for n, v in per.items()} for k, per in rd.items()}
                                  for rd in rounds], "table": table, "args": vars(args)}, f, indent=1)


if __name__ == "__main__":
    main()
