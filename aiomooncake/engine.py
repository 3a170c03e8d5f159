"""The engine adapter: the only module that imports ``mooncake``.

It owns one Mooncake ``TransferEngine`` per transport kind per process (created on first use), the
cache of registered memory, and completion. The engine reports completion by polling only, so a
:class:`_Poller` per event loop checks every in-flight request with the non-blocking
``transfer_check_status`` (one single-request batch per chunk, because that call looks only at a
batch's first request), spinning briefly for latency and then backing off so an idle process
costs nothing: no OS thread per operation, and each loop iteration holds the loop for microseconds.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import threading
import time
import weakref
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from . import _trace
from .core.regions import Region, RegionCache
from .errors import ConfigurationError, TransferFailed
from .tensors import Allocation, allocation_of, release_allocation

log = logging.getLogger(__name__)

TRANSPORTS = ("tcp", "rdma", "nvlink")

# The engine logs through glog; keep its INFO chatter out of the user's terminal unless asked
# (newer engine builds read MC_LOG_LEVEL, older ones GLOG_minloglevel).
os.environ.setdefault("GLOG_minloglevel", "2")
os.environ.setdefault("MC_LOG_LEVEL", "ERROR")


def _te_module() -> Any:
    try:
        from mooncake import engine as te
    except ImportError as e:  # pragma: no cover - depends on the installation
        raise ConfigurationError(
            "the Mooncake Transfer Engine is not installed: pip install 'aiomooncake[cpu]' "
            "(or [cuda12] / [cuda13]); the CPU wheel also needs Debian's libibverbs1 and librdmacm1"
        ) from e
    return te


def capabilities() -> list[str]:
    """Transports this process could provide, best first."""
    caps = []
    te = _te_module()
    if getattr(te, "SUPPORT_INTRA_NVLINK", False) and torch.cuda.is_available():
        caps.append("nvlink")
    if _has_rdma_hca() and not os.environ.get("MC_FORCE_TCP"):
        caps.append("rdma")
    caps.append("tcp")
    return caps


def _has_rdma_hca() -> bool:
    try:
        return bool(os.listdir("/sys/class/infiniband"))
    except OSError:
        return False


@dataclass(frozen=True)
class Stats:
    registrations: int
    unregistrations: int
    cached_regions: int
    writes_submitted: int
    batches_submitted: int = 0  # engine calls that carried several requests at once


class Engine:
    """One TransferEngine instance serving every peer of this process that uses its transport."""

    _instances: ClassVar[dict[str, Engine]] = {}
    _lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, kind: str, host: str) -> None:
        if kind not in TRANSPORTS:
            raise ConfigurationError(f"unknown transport {kind!r}; choose one of {TRANSPORTS}")
        self.kind = kind
        self.host = host
        te = _te_module()
        self._te = te.TransferEngine()
        saved = {k: os.environ.get(k) for k in ("MC_INTRANODE_NVLINK", "MC_FORCE_TCP")}
        # The transport is picked by the environment at init time, not by the protocol argument.
        os.environ.pop("MC_INTRANODE_NVLINK", None)
        if kind == "nvlink":
            os.environ["MC_INTRANODE_NVLINK"] = "1"
        elif kind == "tcp":
            os.environ["MC_FORCE_TCP"] = "1"
        try:
            rc = self._te.initialize(host, "P2PHANDSHAKE", "rdma" if kind == "rdma" else "tcp", "")
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        if rc != 0:
            raise ConfigurationError(f"the Transfer Engine failed to initialize the {kind} transport "
                                     f"on {host} (rc={rc}); see the engine's log above")
        self.segment = f"{host}:{self._te.get_rpc_port()}"
        self._regions = RegionCache()
        self._reg_lock = threading.Lock()
        self.registrations = 0
        self.unregistrations = 0
        self.writes_submitted = 0
        self.batches_submitted = 0
        self._views: dict[str, _RemoteView] = {}
        self.peers = 0  # open peers using this engine; when the last closes, cached registrations go
        log.info("transfer engine up: transport=%s segment=%s", kind, self.segment)

    # ------------------------------------------------------------ instances
    @classmethod
    async def get(cls, kind: str, host: str) -> Engine:
        """The process-wide engine for ``kind``, created (off the loop) on first use."""
        inst = cls._instances.get(kind)
        if inst is not None:
            return inst
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, cls._get_sync, kind, host)

    @classmethod
    def _get_sync(cls, kind: str, host: str) -> Engine:
        with cls._lock:
            inst = cls._instances.get(kind)
            if inst is None:
                inst = cls(kind, host)
                cls._instances[kind] = inst
                for t in _pinned.values():
                    inst.acquire(t, pin=True)
            return inst

    @classmethod
    def existing(cls) -> list[Engine]:
        return list(cls._instances.values())

    # ---------------------------------------------------------- registration
    def acquire(self, t: torch.Tensor, pin: bool = False) -> Region:
        """Make sure the allocation holding ``t`` is registered; count one user of it.

        Call :meth:`release` when the transfer is over."""
        alloc = allocation_of(t)
        with self._reg_lock:
            r = self._regions.find(alloc.base, alloc.size, alloc.ident)
            if r is not None:
                release_allocation(alloc)
            else:
                r = self._register(alloc)
            if pin:
                r.pinned += 1
            else:
                r.inflight += 1
            return r

    def release(self, r: Region, pin: bool = False) -> None:
        with self._reg_lock:
            if pin:
                r.pinned -= 1
            else:
                r.inflight -= 1

    def _register(self, alloc: Allocation) -> Region:
        # Drop registrations whose memory died (CPU storages freed since): they would pile up in
        # the engine's buffer list, which it searches on every transfer.
        for dead in self._regions:
            if not dead.inflight and not dead.pinned and not dead.alive():
                self._unregister(dead)
        for stale in self._regions.overlapping(alloc.base, alloc.size):
            if stale.inflight or (stale.pinned and stale.alive()):
                raise TransferFailed(
                    f"memory at 0x{alloc.base:x}+{alloc.size} overlaps a registration still in use "
                    f"(0x{stale.base:x}+{stale.size}); was a registered buffer freed while in flight?")
            self._unregister(stale)
        rc = self._te.register_memory(alloc.base, alloc.size, "*")
        if rc == -7:  # ERR_ADDRESS_OVERLAPPED: a registration we could not remove is in the way
            release_allocation(alloc)
            raise TransferFailed(
                f"cannot register {alloc.size} B at 0x{alloc.base:x}: it overlaps a registration of memory "
                "that torch gave back to the driver and reused at another base address, which the "
                "engine cannot unregister any more. Call aiomooncake.empty_cache() instead of "
                "torch.cuda.empty_cache(): it unregisters first, then frees.")
        if rc != 0:
            release_allocation(alloc)
            raise TransferFailed(f"the engine refused to register {alloc.size} B at 0x{alloc.base:x} "
                                 f"(rc={rc}); for GPU memory check that the {self.kind} transport "
                                 "supports this device")
        self.registrations += 1
        r = Region(alloc.base, alloc.size, alloc.ident, alloc.alive, handle=alloc)
        self._regions.add(r)
        return r

    def _unregister(self, r: Region) -> None:
        self._regions.remove(r)
        rc = self._te.unregister_memory(r.base)
        self.unregistrations += 1
        release_allocation(r.handle)  # type: ignore[arg-type]
        if rc != 0:
            log.warning("unregistering 0x%x failed (rc=%s)", r.base, rc)

    # ---------------------------------------------------------- remote views
    @property
    def epoch(self) -> int:
        """Changes with every registration; announced to senders with each CTS."""
        return self.registrations

    @property
    def gen(self) -> int:
        """Changes with every unregistration (a later registration may reuse the addresses)."""
        return self.unregistrations

    def target(self, segment: str, epoch: int, gen: int) -> str:
        """The name to write to ``segment`` under, after the receiver's registrations changed.

        The engine caches each remote segment's buffer list (and, for NVLink, the opened CUDA IPC
        mappings) when first used. A buffer the receiver registered later is unknown to that cache
        (writes fail), and a buffer it re-registered at the same addresses after freeing the old
        one would silently hit the stale mapping. TCP checks on the receiving side and needs
        nothing. Otherwise: new registrations -> refresh the cached descriptors; any
        unregistration -> address the segment under a fresh alias (the port with leading zeros,
        which the engine parses to the same port), so nothing stale can be reused."""
        if self.kind == "tcp":
            return segment
        view = self._views.get(segment)
        if view is None:
            view = self._views[segment] = _RemoteView(segment, epoch, gen)
            return view.name
        if gen != view.gen or (epoch != view.epoch and (view.alias or not _sync_segment_cache(self._te))):
            # syncSegmentCache refreshes descriptors by the segment's canonical name only, so once
            # we write through an alias, every later change also moves to a fresh alias.
            host, _, port = segment.rpartition(":")
            view.alias += 1
            view.name = f"{host}:{'0' * view.alias}{port}"
            log.info("remote %s changed its registrations: writing through %s", segment, view.name)
        view.gen, view.epoch = gen, epoch
        return view.name

    def attach(self) -> None:
        self.peers += 1

    def detach(self) -> None:
        """A peer closed: when none is left, release the cached registrations of host memory.

        Device registrations stay: a CUDA segment lives as long as torch's caching allocator keeps
        it, and unregistering it would only make the next peer's sender re-open its IPC mapping
        under a new alias (mappings the engine never closes)."""
        self.peers -= 1
        if self.peers <= 0:
            self.peers = 0
            n = self.trim(cpu_only=True)
            if n:
                log.debug("released %d registrations of the %s engine", n, self.kind)

    def trim(self, cpu_only: bool = False) -> int:
        """Unregister cached regions that are neither pinned nor in flight; return how many."""
        n = 0
        with self._reg_lock:
            for r in self._regions:
                if cpu_only and isinstance(r.ident, tuple) and r.ident[:1] == ("cuda",):
                    continue
                if not r.inflight and not r.pinned:
                    self._unregister(r)
                    n += 1
        return n

    def stats(self) -> Stats:
        return Stats(self.registrations, self.unregistrations, len(self._regions), self.writes_submitted,
                     self.batches_submitted)

    # ------------------------------------------------------------- transfers
    @property
    def in_order(self) -> bool:
        """Whether this engine's writes from one thread complete in submission order per source
        device: the NVLink transport queues them on one CUDA stream per thread and device, and
        reports a request done only once that whole stream is idle. Pollers then need to check
        only the oldest pending request of each lane (one cudaStreamQuery, not one per request:
        with 16 messages in flight that was ~50 us of every polling round)."""
        return self.kind == "nvlink"

    def write(self, segment: str, pieces: Sequence[tuple[int, int, int]], window: int,
              lane: int = -1) -> WriteJob:
        """Write ``pieces`` of ``(src_addr, dst_addr, length)`` into ``segment``, at most ``window``
        requests in flight; ``lane`` is the source's CUDA device (-1 for host memory). Await the
        job (or :meth:`WriteJob.stop` it)."""
        return self._job(segment, pieces, window, lane, read=False)

    def pull(self, segment: str, pieces: Sequence[tuple[int, int, int]], window: int,
             lane: int = -1) -> WriteJob:
        """Like :meth:`write`, the other way: copy ``pieces`` of ``(local_dst, remote_src, length)``
        from ``segment`` into local memory (a receiver pulling the source its sender offered)."""
        return self._job(segment, pieces, window, lane, read=True)

    def _job(self, segment: str, pieces: Sequence[tuple[int, int, int]], window: int, lane: int,
             read: bool) -> WriteJob:
        job = WriteJob(self, segment, list(pieces), max(1, window), lane, read=read)
        _Poller.for_loop().add(job)
        return job

    def _submit(self, segment: str, src: int, dst: int, length: int) -> int:
        self.writes_submitted += 1
        return int(self._te.transfer_submit_write(segment, src, dst, length))

    def _submit_read(self, segment: str, dst: int, src: int, length: int) -> int:
        self.writes_submitted += 1
        return int(self._te.batch_transfer_async_read(segment, [dst], [src], [length]))

    def _submit_batch(self, segment: str, local: list[int], remote: list[int], lengths: list[int],
                      read: bool) -> int:
        """Several requests in one engine call (one batch id): on the NVLink transport about half
        the cost per request of single submits (64 requests: 385-437 against 737-803 us, H100;
        ``scripts/te_batch_probe.py``)."""
        self.writes_submitted += len(lengths)
        self.batches_submitted += 1
        if read:
            return int(self._te.batch_transfer_async_read(segment, local, remote, lengths))
        return int(self._te.batch_transfer_async_write(segment, local, remote, lengths))

    def _check(self, batch: int) -> int:
        return int(self._te.transfer_check_status(batch))

    def write_sync(self, segment: str, src: int, dst: int, length: int) -> int:
        """Blocking raw write (benchmark baseline)."""
        return int(self._te.transfer_sync_write(segment, src, dst, length))


@dataclass(eq=False)
class _RemoteView:
    name: str
    epoch: int
    gen: int
    alias: int = 0


_sync_fn: Any = None


def _sync_segment_cache(te: Any) -> bool:
    """Call ``TransferEngine::syncSegmentCache("")`` (not exposed to Python) through its exported
    symbol: it re-fetches every cached remote segment descriptor. False if unavailable."""
    global _sync_fn
    if _sync_fn is None:
        try:
            import mooncake

            lib = ctypes.CDLL(os.path.join(os.path.dirname(mooncake.__file__), "engine.so"))
            fn = lib["_ZN8mooncake14TransferEngine16syncSegmentCacheERKNSt7__cxx1112basic_string"
                     "IcSt11char_traitsIcESaIcEEE"]
            fn.restype = ctypes.c_int
            fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
            # An empty std::string (libstdc++ new ABI): data pointer to its own inline buffer.
            buf = (ctypes.c_char * 32)()
            base = ctypes.addressof(buf)
            ctypes.c_size_t.from_address(base).value = base + 16
            _sync_fn = (fn, buf)
        except (OSError, AttributeError, ImportError) as e:
            log.info("syncSegmentCache is not reachable (%s); falling back to segment aliases", e)
            _sync_fn = False
    if _sync_fn is False:
        return False
    fn, buf = _sync_fn
    return int(fn(te.get_engine_ptr(), ctypes.addressof(buf))) == 0


@dataclass(eq=False, slots=True)
class _Batch:
    """One submitted engine batch; the requests of several jobs may share it. Its status is read
    once, because the engine frees a batch when it reports it finished."""

    id: int
    state: int = 0  # 0 pending, 1 done, < 0 failed

    def poll(self, eng: Engine) -> int:
        if self.state == 0:
            self.state = eng._check(self.id)
        return self.state


@dataclass(eq=False)
class WriteJob:
    engine: Engine
    segment: str
    pieces: list[tuple[int, int, int]]
    window: int
    lane: int = -1
    read: bool = False  # pieces are (local_dst, remote_src, length), pulled from the segment
    future: asyncio.Future[None] = field(init=False)
    inflight: list[_Batch] = field(default_factory=list)
    next: int = 0
    error: str | None = None
    stopped: bool = False

    def __post_init__(self) -> None:
        self.future = asyncio.get_running_loop().create_future()

    def stop(self) -> None:
        """Submit nothing more; the future resolves once in-flight requests settle."""
        self.stopped = True

    def __await__(self):  # type: ignore[no-untyped-def]
        return self.future.__await__()

    def step(self) -> bool:
        """Check in-flight requests, top up the window; True when the job is finished."""
        eng = self.engine
        what = "read" if self.read else "write"
        if self.inflight:
            still = []
            ordered = eng.in_order
            for i, b in enumerate(self.inflight):
                st = b.poll(eng)
                if st == 0:
                    if ordered:  # the later ones queue behind it
                        still.extend(self.inflight[i:])
                        break
                    still.append(b)
                elif st != 1:
                    self.error = self.error or f"the engine reported status {st} for a {what}"
            self.inflight = still
        while (not self.stopped and self.error is None and self.next < len(self.pieces)
               and len(self.inflight) < self.window):
            src, dst, n = self.pieces[self.next]
            self.next += 1
            if self.read:
                bid = eng._submit_read(self.segment, src, dst, n)
            else:
                bid = eng._submit(self.segment, src, dst, n)
            if _trace.on:
                _trace.mark("engine:submitted")
            if bid == 0:
                self.error = f"the engine could not submit a {what} of {n} B to {self.segment}"
                break
            self.inflight.append(_Batch(bid))
        if self.inflight:
            return False
        if _trace.on:
            _trace.mark("engine:done")
        if not self.future.done():
            if self.error is not None:
                self.future.set_exception(TransferFailed(self.error))
            else:
                self.future.set_result(None)
        return True


def _submit_together(jobs: list[WriteJob]) -> bool:
    """Submit the next window of every job in one engine batch (same engine, target, direction
    and lane); False if nothing was submitted, so the caller steps each job alone instead. Only
    for in-order engines: a batch reports done only once all of it is (see ``Engine.in_order``),
    which is what reading its first request's status tells."""
    eng = jobs[0].engine
    local: list[int] = []
    remote: list[int] = []
    lengths: list[int] = []
    takes: list[int] = []
    for j in jobs:
        k = 0 if j.stopped or j.error is not None else min(j.window, len(j.pieces) - j.next)
        for a, b, n in j.pieces[j.next:j.next + k]:
            local.append(a)
            remote.append(b)
            lengths.append(n)
        takes.append(k)
    if not lengths:
        return False
    bid = eng._submit_batch(jobs[0].segment, local, remote, lengths, jobs[0].read)
    if bid == 0:  # e.g. one destination the engine does not know: let each job find out alone
        log.debug("the engine refused a batch of %d requests; submitting them one by one", len(lengths))
        return False
    batch = _Batch(bid)
    for j, k in zip(jobs, takes, strict=True):
        j.next += k
        j.inflight.extend([batch] * k)
        if _trace.on and k:
            _trace.mark("engine:submitted")
    return True


# The largest copy held back to share an engine batch with a burst's others (see _Poller): a
# larger one outlasts parsing the burst's frames, so holding it only idles the GPU.
HOLD_BYTES = 32 << 20


class _Poller:
    """Drives every write job of one event loop.

    Spins (yielding to the loop and to other threads each round) while jobs are young or progress,
    backs off to sleeping up to ``max_sleep`` when one stalls for ``spin_s``, and stops entirely
    when nothing is in flight. Spinning while bytes move costs one core, like the engine's own
    ``transfer_sync_*`` calls, and measured faster than them under CPU contention (they spin
    without yielding)."""

    _by_loop: ClassVar[weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Poller]] = (
        weakref.WeakKeyDictionary())
    spin_s = 0.05
    max_sleep = 0.001

    # Jobs held back while frames of one read are handled, then submitted in engine batches of at
    # most this many (so the first copies start before a long burst is parsed). A job of more
    # than hold_bytes goes at once: its copy outlasts parsing the next frames, so holding it only
    # idles the GPU (16 x 100 MB streamed: 649-654 GB/s held against 703-740 alone, H100).
    max_group = 32
    hold_bytes = HOLD_BYTES

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.jobs: list[WriteJob] = []  # jobs of engines that complete out of order
        # Jobs of in-order engines, per (engine, lane), oldest first: a round steps only each
        # lane's oldest job (and the next ones once it finished), so a burst of 256 copies in
        # flight costs one status check per round, not a walk over all of them.
        self.lanes: dict[tuple[int, int], deque[WriteJob]] = {}
        self.task: asyncio.Task[None] | None = None
        self.holds = 0
        self.held: list[WriteJob] = []

    @classmethod
    def for_loop(cls) -> _Poller:
        loop = asyncio.get_running_loop()
        p = cls._by_loop.get(loop)
        if p is None:
            p = cls._by_loop[loop] = cls(loop)
        return p

    def hold(self) -> None:
        """Until the matching :meth:`release`, keep new jobs of in-order engines back, to submit
        them together (a peer holds while it handles the frames of one socket read)."""
        self.holds += 1

    def release(self) -> None:
        self.holds -= 1
        if not self.holds and self.held:
            self._submit_held()

    def add(self, job: WriteJob) -> None:
        if self.holds and job.engine.in_order and job.pieces and job.pieces[0][2] <= self.hold_bytes:
            self.held.append(job)
            if len(self.held) >= self.max_group:
                self._submit_held()
            return
        job.step()  # submit the first window right away
        self._track(job)

    def _track(self, job: WriteJob) -> None:
        if job.future.done():
            return
        if job.engine.in_order:
            lane = self.lanes.get((id(job.engine), job.lane))
            if lane is None:
                lane = self.lanes[(id(job.engine), job.lane)] = deque()
            lane.append(job)
        else:
            self.jobs.append(job)
        if self.task is None or self.task.done():
            self.task = self.loop.create_task(self._run())

    def _submit_held(self) -> None:
        held, self.held = self.held, []
        groups: dict[tuple[int, str, bool, int], list[WriteJob]] = {}
        for j in held:
            groups.setdefault((id(j.engine), j.segment, j.read, j.lane), []).append(j)
        for js in groups.values():
            together = len(js) > 1 and _safe_submit_together(js)
            for j in js:
                if not (together and j.inflight):  # alone, or nothing to submit (stopped): settle
                    _safe_step(j)
                self._track(j)

    async def _run(self) -> None:
        last_progress = time.perf_counter()
        delay = 0.0
        while self.jobs or self.lanes:
            if _trace.on:
                _trace.mark("poll:round")
            progressed = self._round()
            now = time.perf_counter()
            if progressed:
                last_progress = now
                delay = 0.0
            if not (self.jobs or self.lanes):
                break
            if now - last_progress < self.spin_s:
                os.sched_yield()  # let the engine's own threads run if they share our core
                await asyncio.sleep(0)
            else:
                delay = min(self.max_sleep, delay * 2 if delay else 0.00005)
                await asyncio.sleep(delay)

    def _round(self) -> bool:
        """Step the jobs that can have moved; True if any submitted, completed or finished. On an
        in-order engine a lane whose oldest job is still pending holds only younger, also pending
        work: only its oldest job is stepped."""
        progressed = False
        for key in list(self.lanes):
            lane = self.lanes[key]
            while lane:
                finished, moved = _advance(lane[0])
                progressed = progressed or moved
                if not finished:
                    break
                lane.popleft()
            if not lane:
                del self.lanes[key]
        if self.jobs:
            left: list[WriteJob] = []
            for j in self.jobs:
                finished, moved = _advance(j)
                progressed = progressed or moved
                if not finished:
                    left.append(j)
            self.jobs = left
        return progressed


def _advance(job: WriteJob) -> tuple[bool, bool]:
    """Step ``job``: whether it finished, and whether it moved (finished, submitted or completed)."""
    before = (job.next, len(job.inflight))
    if _safe_step(job):
        return True, True
    return False, (job.next, len(job.inflight)) != before


def _safe_submit_together(jobs: list[WriteJob]) -> bool:
    try:
        return _submit_together(jobs)
    except Exception:  # the jobs then try alone, each reporting its own error
        log.exception("submitting a batch of %d jobs failed", len(jobs))
        return False


def poller() -> _Poller:
    """The running loop's poller (to :meth:`~_Poller.hold` submissions over a burst of frames)."""
    return _Poller.for_loop()


def _safe_step(job: WriteJob) -> bool:
    try:
        return job.step()
    except Exception as e:  # never let one job kill the poller
        log.exception("write job failed")
        if not job.future.done():
            job.future.set_exception(TransferFailed(f"engine error: {e}"))
        return True


def empty_cache() -> int:
    """Unregister cached GPU memory (nothing in flight, nothing pinned), then
    ``torch.cuda.empty_cache()``. Use it instead of torch's: once torch gives a segment back to the
    driver, a new allocation may reuse its addresses at another base, and the engine can then no
    longer remove the old registration. Returns how many registrations were dropped."""
    n = sum(e.trim() for e in Engine.existing())
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return n


# ------------------------------------------------------------------ pinning
_pinned: dict[int, torch.Tensor] = {}


def register(t: torch.Tensor) -> None:
    """Register ``t``'s memory with every engine now and later, and keep it registered until
    :func:`unregister`: sends and receives from it then never pay for registration."""
    if id(t) in _pinned:
        return
    _pinned[id(t)] = t
    for e in Engine.existing():
        e.acquire(t, pin=True)


def unregister(t: torch.Tensor) -> None:
    if _pinned.pop(id(t), None) is None:
        return
    for e in Engine.existing():
        with e._reg_lock:
            alloc = allocation_of(t)
            r = e._regions.find(alloc.base, alloc.size, alloc.ident)
            release_allocation(alloc)
            if r is not None and r.pinned:
                r.pinned -= 1
