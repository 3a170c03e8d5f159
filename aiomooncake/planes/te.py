"""The Transfer Engine plane: the only module that imports ``mooncake``.

One Mooncake ``TransferEngine`` per transport kind per process (created on first use) serves every
peer that uses its transport: TCP, RDMA (GPUDirect where the build and the HCAs allow it) or the
intra-node NVLink transport (CUDA IPC inside the engine). It registers memory once per allocation
(:mod:`aiomooncake.core.regions`), and completes by polling only: :class:`TeJob` submits single-
request batches (``transfer_check_status`` looks at a batch's first request only) and the loop's
:mod:`.poller` checks them.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .. import _trace
from ..core.regions import Region
from ..errors import ConfigurationError, TransferFailed
from ..tensors import Allocation, allocation_of, release_allocation
from . import base
from .base import Announcement, DataPlane, Job, Piece, Stats
from .poller import poller

log = logging.getLogger(__name__)

TRANSPORTS = ("tcp", "rdma", "nvlink")


def _engine_logs_wanted() -> bool:
    return os.environ.get("AIOMOONCAKE_ENGINE_LOGS", "") not in ("", "0")


if not _engine_logs_wanted():
    os.environ.setdefault("MC_LOG_LEVEL", "ERROR")


def _quiet_engine_logs(te: Any) -> None:
    """The engine logs through glog: keep its chatter (INFO, WARNING, and the "Local segment
    descriptor not found" error every P2P start prints) out of the user's terminal, unless
    ``AIOMOONCAKE_ENGINE_LOGS=1`` asks for it. The engine resets glog's level from ``MC_LOG_LEVEL``
    (whose lowest setting still shows errors) when it initializes, so set glog's own flag right
    before that; engine failures still surface as our exceptions."""
    if _engine_logs_wanted():
        return
    # glog is linked into the engine's module in some wheels and loaded as its own libglog in
    # others (the CUDA builds): set the flag wherever it lives in this process
    quieted = 0
    # None: the process's global scope, whose definition (if one is there) wins over the library's
    # own for the library's own reads (the lent H200's engine printed with libglog's flag at 3)
    for path in [None, te.__file__, *_loaded_glogs()]:
        try:
            ctypes.c_int.in_dll(ctypes.CDLL(path), "_ZN3fLI17FLAGS_minloglevelE").value = 3  # FATAL only
            quieted += 1
        except (OSError, ValueError, AttributeError):
            continue
    if not quieted:  # another build: its logs stay
        log.debug("could not quiet the engine's logs: no glog flag found")


def _loaded_glogs() -> list[str]:
    """Paths of the glog libraries this process has mapped (from /proc/self/maps)."""
    try:
        with open("/proc/self/maps") as f:
            return sorted({line.split()[-1] for line in f if "libglog" in line and "/" in line})
    except OSError:
        return []


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
    """Transports this process's Transfer Engine could provide, best first."""
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


class TePlane(DataPlane):
    """One TransferEngine instance serving every peer of this process that uses its transport."""

    exposes = True  # registrations, one per allocation

    def __init__(self, kind: str, host: str) -> None:
        super().__init__()
        if kind not in TRANSPORTS:
            raise ConfigurationError(f"unknown transport {kind!r}; choose one of {TRANSPORTS}")
        self.kind = kind
        self.in_order = kind == "nvlink"  # see the in_order note below
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
        _quiet_engine_logs(te)
        try:
            rc = self._te.initialize(host, "P2PHANDSHAKE", "rdma" if kind == "rdma" else "tcp", "")
            _quiet_engine_logs(te)  # some builds reset glog's level while they initialize
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        if rc != 0:
            raise ConfigurationError(f"the Transfer Engine failed to initialize the {kind} transport "
                                     f"on {host} (rc={rc}); set AIOMOONCAKE_ENGINE_LOGS=1 to see why")
        self.segment = f"{host}:{self._te.get_rpc_port()}"
        self._exposed = base.Exposures()
        self._regions = self._exposed.regions
        self.registrations = 0
        self.unregistrations = 0
        self.writes_submitted = 0
        self.batches_submitted = 0
        self._views: dict[str, _RemoteView] = {}
        log.info("transfer engine up: transport=%s segment=%s", kind, self.segment)

    # in_order: whether this engine's copies from one thread complete in submission order per
    # source device. The NVLink transport queues them on one CUDA stream per thread and device, and
    # reports a request done only once that whole stream is idle; the poller then checks only the
    # oldest pending request of each lane (one cudaStreamQuery, not one per request: with 16
    # messages in flight that was ~50 us of every polling round).

    @property
    def name(self) -> str:
        return f"te:{self.kind}"

    # ---------------------------------------------------------- registration
    def acquire(self, t: torch.Tensor, pin: bool = False) -> Region:
        return self._exposed.hold(allocation_of(t), pin, self._register)

    def release(self, r: Region, pin: bool = False) -> None:
        self._exposed.release(r, pin)

    def retain(self, r: Region) -> bool:
        return self._exposed.retain(r)  # (NO_REGION is never cached: False)

    def unpin(self, t: torch.Tensor) -> None:
        self._exposed.unpin(t)

    def regions(self) -> list[Region]:
        """The cached registrations (for diagnostics and tests)."""
        return list(self._regions)

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

    def announce(self, r: Region) -> Announcement:
        return Announcement(self.registrations, self.unregistrations)

    def target(self, segment: str, announced: Announcement) -> str:
        """The name to copy to or from ``segment`` under, after the remote's registrations changed.

        The engine caches each remote segment's buffer list (and, for NVLink, the opened CUDA IPC
        mappings) when first used. A buffer the remote registered later is unknown to that cache
        (copies fail), and a buffer it re-registered at the same addresses after freeing the old
        one would silently hit the stale mapping. TCP checks on the receiving side and needs
        nothing. Otherwise: new registrations -> refresh the cached descriptors; any
        unregistration -> address the segment under a fresh alias (the port with leading zeros,
        which the engine parses to the same port), so nothing stale can be reused."""
        if self.kind == "tcp":
            return segment
        epoch, gen = announced.epoch, announced.gen
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

    async def refresh_remote(self, segment: str) -> bool:
        """Make the engine re-fetch its cached remote descriptors (off the loop: it asks every
        cached segment, dead ones included)."""
        return await asyncio.get_running_loop().run_in_executor(None, _sync_segment_cache, self._te)

    def detach(self, remote: str = "") -> None:
        """A peer closed: when none is left, release the cached registrations of host memory.

        Device registrations stay: a CUDA segment lives as long as torch's caching allocator keeps
        it, and unregistering it would only make the next peer's sender re-open its IPC mapping
        under a new alias (mappings the engine never closes)."""
        super().detach(remote)
        if self.peers == 0:
            n = self.trim(cpu_only=True)
            if n:
                log.debug("released %d registrations of the %s engine", n, self.kind)

    def trim(self, cpu_only: bool = False) -> int:
        n = 0
        with self._exposed.lock:
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
    def write(self, target: Any, pieces: Sequence[Piece], window: int, lane: int = -1) -> TeJob:
        return self._job(target, pieces, window, lane, read=False)

    def pull(self, target: Any, pieces: Sequence[Piece], window: int, lane: int = -1) -> TeJob:
        return self._job(target, pieces, window, lane, read=True)

    def _job(self, target: str, pieces: Sequence[Piece], window: int, lane: int, read: bool) -> TeJob:
        job = TeJob(self, target, list(pieces), max(1, window), lane, read=read)
        poller().add(job)
        return job

    def _submit(self, segment: str, local: int, remote: int, length: int, read: bool) -> int:
        self.writes_submitted += 1
        if read:
            return int(self._te.batch_transfer_async_read(segment, [local], [remote], [length]))
        return int(self._te.transfer_submit_write(segment, local, remote, length))

    def submit_together(self, jobs: list[Job]) -> bool:
        """Submit the next window of every job in one engine batch (one batch id): on the NVLink
        transport about half the cost per request of single submits (64 requests: 385-437 against
        737-803 us, H100). Only for in-order engines: a batch reports done only once all of it is,
        which is what reading its first request's status tells."""
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
        first = jobs[0]
        self.writes_submitted += len(lengths)
        self.batches_submitted += 1
        if first.read:
            bid = int(self._te.batch_transfer_async_read(first.target, local, remote, lengths))
        else:
            bid = int(self._te.batch_transfer_async_write(first.target, local, remote, lengths))
        if bid == 0:  # e.g. one destination the engine does not know: let each job find out alone
            log.debug("the engine refused a batch of %d requests; submitting them one by one", len(lengths))
            return False
        batch = _Batch(bid)
        for j, k in zip(jobs, takes, strict=True):
            assert isinstance(j, TeJob)
            j.next += k
            j.inflight.extend([batch] * k)
            if _trace.on and k:
                _trace.mark("engine:submitted")
        return True

    def _check(self, batch: int) -> int:
        return int(self._te.transfer_check_status(batch))


async def start(kind: str, host: str) -> TePlane:
    """The process-wide engine for ``kind``, created (off the loop: it takes a while) on first use."""
    inst = base.get(kind)
    if isinstance(inst, TePlane):
        return inst
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(None, lambda: base.instance(kind, lambda: TePlane(kind, host)))


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
            addr = ctypes.addressof(buf)
            ctypes.c_size_t.from_address(addr).value = addr + 16
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

    def poll(self, eng: TePlane) -> int:
        if self.state == 0:
            self.state = eng._check(self.id)
        return self.state


@dataclass(eq=False)
class TeJob(Job):
    """Engine requests of one message, at most ``window`` in flight, polled by the loop's poller."""

    inflight: list[_Batch] = field(default_factory=list)

    def pending(self) -> int:
        return len(self.inflight)

    def step(self) -> bool:
        eng = self.plane
        assert isinstance(eng, TePlane)
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
            local, remote, n = self.pieces[self.next]
            self.next += 1
            bid = eng._submit(self.target, local, remote, n, self.read)
            if _trace.on:
                _trace.mark("engine:submitted")
            if bid == 0:
                self.error = f"the engine could not submit a {what} of {n} B to {self.target}"
                break
            self.inflight.append(_Batch(bid))
        if self.inflight:
            return False
        if _trace.on:
            _trace.mark("engine:done")
        self.settle(self.error)
        return True
