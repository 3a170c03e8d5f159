"""Probe the engine's batch API on the NVLink transport (one process, writing to its own segment):
does one ``batch_transfer_async_write`` of many requests work, what does it cost against single
submits, and which completion calls are safe on a multi-request batch. Prints step by step (a
crash shows where)."""

from __future__ import annotations

import faulthandler
import os
import statistics
import sys
import time

import torch

faulthandler.enable()
os.environ["MC_INTRANODE_NVLINK"] = "1"
from mooncake import engine as te_mod  # noqa: E402


def say(*a: object) -> None:
    print(*a, flush=True)


te = te_mod.TransferEngine()
assert te.initialize("127.0.0.1", "P2PHANDSHAKE", "tcp", "") == 0
seg = f"127.0.0.1:{te.get_rpc_port()}"
N = 64
sizes = [1_400_000, 700_000, 7168, 3584] * (N // 4)
offs, o = [], 0
for n in sizes:
    offs.append(o)
    o += (n + 255) // 256 * 256
total = o
src = (torch.arange(total, device="cuda", dtype=torch.int64) % 251).to(torch.uint8)
dst = torch.zeros(total, dtype=torch.uint8, device="cuda")
for t in (src, dst):
    assert te.register_memory(t.data_ptr(), t.nbytes, "*") == 0
torch.cuda.synchronize()
S, D = src.data_ptr(), dst.data_ptr()
say("registered", total)
mode = sys.argv[1] if len(sys.argv) > 1 else "all"


def ok() -> bool:
    torch.cuda.synchronize()
    return all(torch.equal(src[x : x + n], dst[x : x + n]) for x, n in zip(offs, sizes, strict=False))


b = te.batch_transfer_async_write(seg, [S + x for x in offs], [D + x for x in offs], sizes)
say("batch submitted", b)
t0 = time.perf_counter()
rc = te.get_batch_transfer_status([b])
say(
    "get_batch_transfer_status alone ->",
    rc,
    "us",
    round((time.perf_counter() - t0) * 1e6, 1),
    "bytes ok",
    ok(),
)
dst.zero_()
torch.cuda.synchronize()
b = te.batch_transfer_async_write(seg, [S + x for x in offs], [D + x for x in offs], sizes)
k = 0
while (st := te.transfer_check_status(b)) == 0:
    k += 1
say("check_status on a batch ->", st, "polls", k, "bytes ok", ok())
if mode == "all":
    say("now get_batch_transfer_status on the same batch (freed?)")
    rc = te.get_batch_transfer_status([b])
    say("  ->", rc)
# timing: one batch of N against N singles (submit cost, all done)
res: dict[str, list[float]] = {}
for _rep in range(30):
    dst.zero_()
    torch.cuda.synchronize()
    t = time.perf_counter()
    b = te.batch_transfer_async_write(seg, [S + x for x in offs], [D + x for x in offs], sizes)
    t1 = time.perf_counter()
    rc = te.get_batch_transfer_status([b])
    t2 = time.perf_counter()
    assert rc == 0
    res.setdefault("batch submit", []).append(t1 - t)
    res.setdefault("batch all done", []).append(t2 - t)
    ids = []
    t = time.perf_counter()
    for x, n in zip(offs, sizes, strict=False):
        ids.append(te.transfer_submit_write(seg, S + x, D + x, n))
    t1 = time.perf_counter()
    for i in ids:
        while te.transfer_check_status(i) == 0:
            pass
    t2 = time.perf_counter()
    res.setdefault("singles submit", []).append(t1 - t)
    res.setdefault("singles all done", []).append(t2 - t)
    # read batch
    t = time.perf_counter()
    b = te.batch_transfer_async_read(seg, [D + x for x in offs], [S + x for x in offs], sizes)
    rc = te.get_batch_transfer_status([b])
    res.setdefault("read batch all done", []).append(time.perf_counter() - t)
for k_, v in res.items():
    say(f"{k_} ({N} requests, {sum(sizes)} B): median {statistics.median(v[5:]) * 1e6:.1f} us")
say("bytes ok", ok())


def rss_kib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


# Host memory over many batches read only through transfer_check_status (what the poller does):
# if that left the rest of a batch allocated, RSS would grow with every batch.
small = [(S + x, D + x, 3584) for x in offs[:8]]
for label, rounds in (("warm-up", 2000), ("batches of 8, status read once", 20000)):
    r0 = rss_kib()
    for _ in range(rounds):
        b = te.batch_transfer_async_write(
            seg, [a for a, _, _ in small], [d for _, d, _ in small], [n for _, _, n in small]
        )
        while te.transfer_check_status(b) == 0:
            pass
    say(f"{label}: {rounds} batches, RSS {r0} -> {rss_kib()} KiB")
r0 = rss_kib()
for _ in range(20000):
    i = te.transfer_submit_write(seg, S, D, 3584)
    while te.transfer_check_status(i) == 0:
        pass
say(f"singles: 20000, RSS {r0} -> {rss_kib()} KiB")
