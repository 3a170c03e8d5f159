"""What every part of the benchmark shares: the run's configuration, the measured points, the
per-rank context an implementation runs in, and the DeepSeek-V3 expert shapes of the ``eplb`` mode.

Units: ``gbps`` is GB/s (10**9 bytes per second) of payload that crossed between the two processes
(both directions counted for ``bidir`` and ``eplb``); ``rtt_us`` is a pingpong round trip in µs.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
import signal
import statistics
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch

log = logging.getLogger(__name__)

MODES = ("pingpong", "stream", "bidir", "eplb")

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

# 8 B to 1 GiB, each step x4 (8, 32, ..., 512 MiB), and 1 GiB itself.
DEFAULT_SIZES = (*(8 * 4**k for k in range(14)), GiB)
QUICK_SIZES = (8, 64 * KiB, MiB, 16 * MiB, 64 * MiB)
DEFAULT_EXPERTS = (1, 2, 4, 8)
QUICK_EXPERTS = (1, 4)

# DeepSeek-V3 routed expert, FP8 weights with 128x128-block fp32 scales (hidden 7168, moe
# intermediate 2048): w13 = gate+up [4096, 7168] fp8, w2 = down [7168, 2048] fp8, and their scales.
# FP8 payloads travel as uint8 (same bytes; every backend can send uint8).
EPLB_TENSORS: tuple[tuple[str, tuple[int, int], torch.dtype], ...] = (
    ("w13", (4096, 7168), torch.uint8),          # 29,360,128 B
    ("w2", (7168, 2048), torch.uint8),           # 14,680,064 B
    ("w13_scale", (32, 56), torch.float32),      # 7,168 B
    ("w2_scale", (56, 16), torch.float32),       # 3,584 B
)


def eplb_shapes(scale: float) -> list[tuple[tuple[int, int], torch.dtype]]:
    """One expert's tensors, the weights' rows scaled by ``scale`` (the small scales are kept)."""
    out = []
    for name, (rows, cols), dtype in EPLB_TENSORS:
        if name in ("w13", "w2"):
            rows = max(1, round(rows * scale))
        out.append(((rows, cols), dtype))
    return out


def expert_bytes(scale: float) -> int:
    return sum(r * c * torch.empty((), dtype=dt).element_size() for (r, c), dt in eplb_shapes(scale))


def eplb_tensors(experts: int, scale: float, device: torch.device) -> list[torch.Tensor]:
    """The tensors of ``experts`` experts, in send order."""
    return [torch.ones(shape, dtype=dt, device=device)
            for _ in range(experts) for shape, dt in eplb_shapes(scale)]


_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": KiB, "m": MiB, "g": GiB, "t": 1024 * GiB}


def parse_size(text: str) -> int:
    """``"8"``, ``"64K"``, ``"1M"``, ``"1GiB"`` (binary units) -> bytes."""
    m = _SIZE_RE.match(text)
    if not m:
        raise ValueError(f"not a size: {text!r} (examples: 8, 64K, 1M, 1G)")
    n = float(m.group(1)) * _UNITS[m.group(2).lower()]
    if n < 1 or n != int(n):
        raise ValueError(f"size must be a whole number of bytes >= 1: {text!r}")
    return int(n)


def human_bytes(n: int) -> str:
    for unit, div in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if n >= div:
            v = n / div
            return f"{v:.0f} {unit}" if v == int(v) else f"{v:.1f} {unit}"
    return f"{n} B"


@dataclass(frozen=True)
class Point:
    """One measurement: ``size`` is the message size in bytes, or for ``eplb`` the number of experts."""

    idx: int
    mode: str
    size: int

    def label(self, cfg: BenchConfig) -> str:
        if self.mode == "eplb":
            return f"{self.size} experts ({human_bytes(cfg.nbytes(self))})"
        return human_bytes(self.size)


SMALL_POINT = 256 * 1024  # bytes moved per iteration up to which a point counts as small
SMALL_ITERS = 200


@dataclass(frozen=True)
class BenchConfig:
    device: str = "cpu"
    iters: int = 20
    warmup: int = 3
    window: int = 4
    scale: float = 1.0
    timeout: float = 120.0
    max_bytes: int = 2 * GiB  # payload budget of one point's timed iterations (iters shrink above it)
    host: str = "127.0.0.1"
    verbose: bool = False
    # --netns: rank r runs in network namespace netns[r] and has address addrs[r] (else: host)
    netns: tuple[str, ...] = ()
    addrs: tuple[str, ...] = ()

    def addr(self, rank: int) -> str:
        """The address of rank ``rank``'s process: its namespace's with ``--netns``, else ``host``."""
        return self.addrs[rank] if rank < len(self.addrs) else self.host

    def nbytes(self, p: Point) -> int:
        """The ``bytes`` of a record: the message size, or the bytes one rank sends in an eplb batch."""
        return p.size * expert_bytes(self.scale) if p.mode == "eplb" else p.size

    def moved(self, p: Point) -> int:
        """Payload bytes one iteration moves (both directions summed); the rate's numerator."""
        n = self.nbytes(p)
        return {"pingpong": 2 * n, "stream": n * self.window, "bidir": 2 * n * self.window,
                "eplb": 2 * n}[p.mode]

    def counts(self, p: Point) -> tuple[int, int]:
        """(warm-up, timed) iterations for ``p``: big points get fewer, never below 1 and 3; small
        ones (<= 256 KiB moved per iteration, a millisecond or less) at least 200 timed and 20
        warm-up, since a median of ten round trips of tens of microseconds is mostly noise."""
        moved = max(1, self.moved(p))
        timed = min(self.iters, max(min(3, self.iters), self.max_bytes // moved))
        warm = min(self.warmup, max(1, self.max_bytes // (4 * moved)))
        if moved <= SMALL_POINT:
            timed, warm = max(timed, SMALL_ITERS), max(warm, SMALL_ITERS // 10)
        return max(0, warm), max(1, timed)

    def record(self, impl: str, p: Point, samples: Sequence[float]) -> dict[str, Any]:
        """The JSON record of a point from its per-iteration seconds (the median is reported)."""
        med = statistics.median(samples)
        rec: dict[str, Any] = {
            "impl": impl,
            "mode": p.mode,
            "device": self.device,
            "bytes": self.nbytes(p),
            "gbps": self.moved(p) / med / 1e9 if med > 0 else float("inf"),
            "rtt_us": med * 1e6 if p.mode == "pingpong" else None,
            "iters": len(samples),
        }
        if p.mode == "eplb":
            rec["experts"] = p.size
        return rec


Message = tuple[Any, ...]


@dataclass(eq=False)
class RankContext:
    """What an implementation's rank gets: who it is, the points to measure, a key-value store
    shared by the ranks (a ``torch.distributed.Store``) and a sink for progress and results."""

    impl: str
    rank: int
    world: int
    cfg: BenchConfig
    points: list[Point]
    store: Any
    sink: Callable[[Message], None]
    current: int | None = None
    notes: dict[str, Any] = field(default_factory=dict)  # added to this rank's records
    _seq: int = field(default=0, repr=False)

    @property
    def peer(self) -> int:
        return 1 - self.rank

    @property
    def host(self) -> str:
        """This rank's address (listen and advertise on it)."""
        return self.cfg.addr(self.rank)

    @property
    def peer_host(self) -> str:
        """The other rank's address (connect to it)."""
        return self.cfg.addr(self.peer)

    def device(self) -> torch.device:
        if self.cfg.device != "cuda":
            return torch.device("cpu")
        idx = self.rank if torch.cuda.device_count() >= self.world else 0
        torch.cuda.set_device(idx)
        return torch.device("cuda", idx)

    def sync_device(self) -> None:
        if self.cfg.device == "cuda":
            torch.cuda.synchronize()

    # ------------------------------------------------------------ exchange
    def put(self, key: str, value: object) -> None:
        self.store.set(key, pickle.dumps(value))

    def get(self, key: str) -> Any:
        self.store.wait([key], timedelta(seconds=self.cfg.timeout))
        return pickle.loads(self.store.get(key))

    def exchange(self, key: str, value: object) -> Any:
        """Publish ``value`` under ``key`` and return the peer's."""
        self.put(f"{key}/{self.rank}", value)
        return self.get(f"{key}/{self.peer}")

    def barrier(self, name: str | None = None) -> None:
        if name is None:
            self._seq += 1
            name = f"barrier{self._seq}"
        self.store.set(f"{name}/{self.rank}", b"1")
        self.store.wait([f"{name}/{r}" for r in range(self.world)], timedelta(seconds=self.cfg.timeout))

    # ------------------------------------------------------------- results
    def begin(self, p: Point) -> None:
        self.current = p.idx
        if self.rank == 0:
            self.sink(("begin", p.idx))
        fault = os.environ.get(FAULT_ENV)
        if fault:
            _inject(fault, self, p)

    def finish(self, p: Point, samples: Sequence[float]) -> None:
        if self.rank == 0:
            self.sink(("record", p.idx, {**self.cfg.record(self.impl, p, samples), **self.notes}))
        self.current = None


# For the launcher's tests: "impl:mode:size:rank:crash|hang|raise" makes that rank of that
# implementation crash (SIGSEGV), hang or raise when it begins that point.
FAULT_ENV = "AIOMOONCAKE_BENCH_FAULT"


def _inject(spec: str, ctx: RankContext, p: Point) -> None:
    try:
        impl, mode, size, rank, kind = spec.split(":")
        hit = (impl == ctx.impl and mode == p.mode and parse_size(size) == p.size and int(rank) == ctx.rank)
    except ValueError:
        log.warning("ignoring malformed %s=%r", FAULT_ENV, spec)
        return
    if not hit:
        return
    log.warning("injecting a %s into %s rank %d at %s %d", kind, ctx.impl, ctx.rank, p.mode, p.size)
    if kind == "crash":
        os.kill(os.getpid(), signal.SIGSEGV)
    elif kind == "hang":
        while True:
            time.sleep(3600)
    raise RuntimeError(f"injected failure ({FAULT_ENV})")


# A point's iteration: runs one iteration, returns the seconds it took as seen by this rank.
Iteration = Callable[[], float]
AsyncIteration = Callable[[], Awaitable[float]]


def measure(ctx: RankContext, p: Point, step: Iteration) -> list[float]:
    warm, timed = ctx.cfg.counts(p)
    for _ in range(warm):
        step()
    return [step() for _ in range(timed)]


async def ameasure(ctx: RankContext, p: Point, step: AsyncIteration) -> list[float]:
    warm, timed = ctx.cfg.counts(p)
    for _ in range(warm):
        await step()
    return [await step() for _ in range(timed)]


class Spinner:
    """Waits for a condition the other process makes true by writing our memory: spins briefly for
    latency, then sleeps in short steps so a 2-core machine is not starved."""

    def __init__(self, timeout: float, spin_s: float = 0.0005, max_sleep: float = 0.00005) -> None:
        self.timeout = timeout
        self.spin_s = spin_s
        self.max_sleep = max_sleep

    def wait(self, cond: Callable[[], bool], what: str) -> None:
        if cond():
            return
        start = time.perf_counter()
        sleep = 0.0
        while not cond():
            now = time.perf_counter()
            if now - start > self.spin_s:
                if now - start > self.timeout:
                    raise TimeoutError(f"timed out after {self.timeout:g} s waiting for {what}")
                sleep = min(self.max_sleep, sleep * 2 if sleep else 0.00001)
                time.sleep(sleep)


def describe_exit(code: int) -> str:
    """A child process's exit status in words (negative: the signal that ended it)."""
    if code < 0:
        try:
            return f"crashed with {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with status {code}"
