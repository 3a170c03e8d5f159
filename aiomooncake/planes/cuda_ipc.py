"""The same-host CUDA plane: CUDA IPC mappings and copies on a stream of ours, completed by events.

Between two processes of one host the fastest path for device memory is the GPU's own copy engine
reading or writing the other process's memory directly: the receiver (or, on one GPU, the one
process that runs every copy between the two: see :func:`aiomooncake.core.negotiation.roles`)
maps the other's allocation through CUDA IPC and issues plain device copies. Measured on an H200
(two processes on one GPU): a Python loop of one copy per tensor over IPC mappings ran the
64-expert EPLB exchange at 1.01x the same copies inside one process, where the Transfer Engine's
NVLink transport reached 0.055x (its ~12.5 us of CPU per request and ~75 us per status check).

* **Export** (:meth:`CudaIpcPlane.acquire`): the allocation behind a tensor (a segment of torch's
  caching allocator, found with ``cuMemGetAddressRange`` and told apart from a later one at the same
  address by the driver's buffer id) gets one IPC handle, cached per segment, never per tensor. The
  handle travels, packed with the segment's base, size and id (:func:`pack_desc`), in the RTS that
  offers a source or the CTS that announces a destination: only once both sides proved the secret,
  and only for segments backing tensors offered to that peer. Virtual memory (torch's expandable
  segments) has no such handle: its chunks travel as file descriptors instead (:mod:`.cuda_vmm`).
* **Import** (:meth:`CudaIpcPlane.target`): the remote's segment is opened once per remote process
  and buffer id (``cuIpcOpenMemHandle``) and cached; a new segment of that process overlapping an
  older mapping means the old one was freed: its mapping is closed first. A remote's mappings are
  closed when its last peer detaches.
* **Copies**: every piece is checked against the remote segment it addresses (and, by the caller,
  against the destination the receiver announced: CUDA IPC checks nothing) and queued on this
  plane's stream of the local device, several per call where the driver has ``cuMemcpyBatchAsync``;
  one event recorded behind a burst completes all of its jobs. The loop's :mod:`.poller` queries the
  oldest event of each device (``in_order``): no thread per copy, no device synchronization.
"""

from __future__ import annotations

import ctypes
import logging
import os
import struct
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Union

import torch

from .. import tuning
from ..core.regions import Region
from ..errors import ConfigurationError, TransferFailed
from ..tensors import Allocation, allocation_of, release_allocation
from . import base, cuda_vmm
from .base import Announcement, DataPlane, Job, Piece, Stats
from .cuda_driver import batch_copy
from .cuda_driver import driver as _driver
from .cuda_driver import ok as _ok
from .cuda_kernel import kernel_for
from .poller import poller

log = logging.getLogger(__name__)

KIND = "cuda-ipc"
_HANDLE = 64  # bytes of a CUipcMemHandle
_LEGACY = struct.Struct("<c64sQQQ")  # b"L", handle, segment base, segment size, buffer id
_VMM = struct.Struct("<cQQH")  # b"V", span base, span size, chunks that follow
_CHUNK = struct.Struct("<IQQQ")  # descriptor in the exporter, chunk base, chunk size, buffer id
DESC_BYTES = _LEGACY.size
MAX_CHUNKS = 512

# ------------------------------------------------------------------ descriptors (pure)
@dataclass(frozen=True, slots=True)
class SegmentDesc:
    """A segment of torch's caching allocator (one ``cudaMalloc``), shared by its IPC handle."""

    handle: bytes
    base: int
    size: int
    ident: int  # the driver's buffer id: a later allocation at the same base has another

    def covers(self, addr: int, n: int) -> bool:
        return self.base <= addr and addr + n <= self.base + self.size


@dataclass(frozen=True, slots=True)
class VmmDesc:
    """Virtual-memory chunks (torch's expandable segments) spanning one tensor, each shared as a
    file descriptor of the exporter (see :mod:`.cuda_vmm`): ``(fd, base, size, buffer id)``."""

    base: int
    size: int
    chunks: tuple[tuple[int, int, int, int], ...]

    def covers(self, addr: int, n: int) -> bool:
        return self.base <= addr and addr + n <= self.base + self.size


Desc = Union[SegmentDesc, VmmDesc]  # noqa: UP007 (a runtime alias)


def pack_desc(desc: Desc) -> bytes:
    if isinstance(desc, VmmDesc):
        return _VMM.pack(b"V", desc.base, desc.size, len(desc.chunks)) + b"".join(
            _CHUNK.pack(*c) for c in desc.chunks)
    if len(desc.handle) != _HANDLE:
        raise ValueError("an IPC handle has 64 bytes")
    return _LEGACY.pack(b"L", desc.handle, desc.base, desc.size, desc.ident)


def unpack_desc(blob: Any) -> Desc:
    """The descriptor a remote announced; TransferFailed if it is not one (a malformed frame)."""
    bad = TransferFailed("the remote announced no valid CUDA IPC descriptor for this memory")
    if type(blob) is not bytes or not blob:
        raise bad
    if blob[:1] == b"L" and len(blob) == _LEGACY.size:
        _, handle, base_, size, ident = _LEGACY.unpack(blob)
        if size == 0 or base_ + size > 2**64:
            raise TransferFailed("the remote announced an empty or impossible CUDA IPC segment")
        return SegmentDesc(handle, base_, size, ident)
    if blob[:1] != b"V" or len(blob) < _VMM.size:
        raise bad
    _, base_, size, n = _VMM.unpack_from(blob)
    if not 0 < n <= MAX_CHUNKS or len(blob) != _VMM.size + n * _CHUNK.size or size == 0:
        raise bad
    chunks = tuple(_CHUNK.unpack_from(blob, _VMM.size + i * _CHUNK.size) for i in range(n))
    # the chunks follow each other without a gap and cover the span they announce
    at = chunks[0][1]
    for _, cbase, csize, _ in chunks:
        if cbase != at or csize == 0:
            raise bad
        at += csize
    if not (chunks[0][1] <= base_ and base_ + size <= at):
        raise bad
    return VmmDesc(base_, size, chunks)


def ranges_of(desc: Desc, local_bases: list[int]) -> list[tuple[int, int, int]]:
    """``(remote base, size, local base)`` of each mapped part of ``desc`` (one for a segment)."""
    if isinstance(desc, SegmentDesc):
        return [(desc.base, desc.size, local_bases[0])]
    return [(c[1], c[2], lb) for c, lb in zip(desc.chunks, local_bases, strict=True)]


def translate(pieces: Sequence[Piece], desc: Desc, ranges: Sequence[tuple[int, int, int]]) -> list[Piece]:
    """Pieces with their remote addresses turned into this process's mappings (``ranges``, from
    :func:`ranges_of`), split where the mappings are not contiguous here; raises TransferFailed for
    a piece outside what the remote announced (a forged or stale descriptor)."""
    out = []
    for a, r, n in pieces:
        if n < 0 or not desc.covers(r, n):
            raise TransferFailed(f"refusing a copy of {n} B at 0x{r:x}: outside the remote segment "
                                 f"0x{desc.base:x}+{desc.size} it announced")
        if len(ranges) == 1:
            rb, _, lb = ranges[0]
            out.append((a, lb + (r - rb), n))
            continue
        done = 0
        for rb, size, lb in ranges:
            if done >= n:
                break
            at = r + done
            if not rb <= at < rb + size:
                continue
            k = min(n - done, rb + size - at)
            out.append((a + done, lb + (at - rb), k))
            done += k
    return out


# -------------------------------------------------------------------- capability
_unusable: str | None = None
_tested = False


def unavailable() -> str | None:
    """Why this process cannot offer the CUDA IPC plane, or None when it can (not yet tried with
    the other process: the handshake does that, see :func:`probe_info` and :func:`check_remote`)."""
    global _tested, _unusable
    if _tested:
        return _unusable
    _tested = True
    if os.environ.get("AIOMOONCAKE_CUDA_IPC", "1") == "0":
        _unusable = "turned off by AIOMOONCAKE_CUDA_IPC=0"
    elif not torch.cuda.is_available():
        _unusable = "no CUDA device"
    else:
        try:
            _driver()
        except ImportError as e:
            _unusable = f"cuda-python is not installed ({e})"
    return _unusable


_probe: dict[int, tuple[torch.Tensor, int]] = {}  # device -> (probe tensor, its value)


def probe_info() -> dict[str, Any] | None:
    """This process's probe for the handshake: an exported 8-byte word with a random value that the
    other side maps and reads, to learn by trying whether IPC works between the two processes (the
    probe comes from torch's allocator: under expandable segments it exercises that path too), and
    where this process's descriptor broker listens (:mod:`.cuda_vmm`)."""
    if unavailable() is not None:
        return None
    try:
        dev = torch.cuda.current_device()
        entry = _probe.get(dev)
        if entry is None:
            value = int.from_bytes(os.urandom(7), "little")
            t = torch.tensor([value], dtype=torch.int64, device=dev)
            torch.cuda.synchronize(dev)
            entry = _probe[dev] = (t, value)
        t, value = entry
        plane = CudaIpcPlane.instance()
        r = plane.acquire(t)
        plane.release(r)
        return {"desc": plane.announce(r).desc, "addr": t.data_ptr(), "value": value,
                "broker": plane.broker_info(), "segment": plane.segment}
    except Exception as e:  # a driver without IPC (some containers): say so and go without
        log.info("CUDA IPC unavailable here: %s", e)
        return None


def check_remote(probe: Any) -> str | None:
    """Map the remote's probe and read it: None if CUDA IPC works with that process, else why not.
    On success the plane knows the remote's descriptor broker."""
    if unavailable() is not None:
        return unavailable()
    if not isinstance(probe, dict) or type(probe.get("segment")) is not str:
        return "the peer offered no CUDA IPC probe"
    plane = CudaIpcPlane.instance()
    segment = probe["segment"]
    if segment == plane.segment:
        return "both peers are one process (CUDA IPC cannot map a process's own memory)"
    try:
        plane._remote_of(segment)
        broker = probe.get("broker")
        if isinstance(broker, dict) and type(broker.get("name")) is str and type(broker.get("key")) is bytes:
            plane._brokers[segment] = (broker["name"], broker["key"])
        blob = probe.get("desc")
        addr, value = probe.get("addr"), probe.get("value")
        desc = unpack_desc(blob)
        if type(addr) is not int or type(value) is not int or not desc.covers(addr, 8):
            return "the peer's CUDA IPC probe is malformed"
        plane._context()
        m = plane.target(segment, Announcement(0, 0, blob))
        try:
            ((_, local, _),) = translate([(0, addr, 8)], m.desc, m.ranges)
            word = (ctypes.c_uint64 * 1)()
            _ok(_driver().cuMemcpyDtoH(ctypes.addressof(word), local, 8), "cuMemcpyDtoH")
        finally:
            plane._drop(segment, m)
    except TransferFailed as e:
        return str(e)
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    if word[0] != value:
        return "the peer's CUDA IPC probe reads back another value"
    return None


# -------------------------------------------------------------------------- the plane
@dataclass(eq=False)
class _Part:
    """One piece of a remote process's memory mapped here: a caching-allocator segment (legacy IPC)
    or a virtual-memory chunk."""

    base: int
    size: int
    local: int
    vmm: bool
    closed: bool = False


@dataclass(eq=False)
class _Mapping:
    """A remote descriptor resolved here: its parts and where they are mapped."""

    desc: Desc
    pid: str  # the remote process (its segment name)
    parts: list[_Part]
    ranges: list[tuple[int, int, int]]  # (remote base, size, local base) of each part

    @property
    def live(self) -> bool:
        return not any(p.closed for p in self.parts)


@dataclass(eq=False, slots=True)
class _Burst:
    """Copies submitted together; one event recorded behind them completes them all."""

    event: Any
    jobs: int
    state: int = 0  # 0 pending, 1 done, < 0 failed
    error: str = ""


class CudaIpcPlane(DataPlane):
    """The process-wide CUDA IPC plane (see the module docstring)."""

    kind = KIND
    in_order = True  # one stream per device: copies complete in submission order
    exposes = True  # IPC exports, one per allocation segment

    def __init__(self) -> None:
        super().__init__()
        # the pid alone is not unique across PID namespaces: a random token makes it this process's
        self.segment = f"ipc:{os.getpid()}:{os.urandom(6).hex()}"
        self._exposed = base.Exposures()
        self._regions = self._exposed.regions
        # remote pid -> the parts of its memory mapped here, by (base, buffer id)
        self._parts: dict[str, dict[tuple[int, int], _Part]] = {}
        self._brokers: dict[str, tuple[str, bytes]] = {}  # remote process -> its broker (name, key)
        self._vmm_exports = cuda_vmm.Exports()
        self._broker: cuda_vmm.Broker | None = None
        self._peers_of: dict[str, int] = {}  # remote process (its segment) -> attached peers
        # descriptor bytes -> (remote process, its mapping, mappings_closed when it was cached)
        self._known: dict[bytes, tuple[str, _Mapping, int]] = {}
        self._streams: dict[int, Any] = {}
        self._events: list[Any] = []
        self._ctx: dict[int, Any] = {}
        self._local = threading.local()
        self.exports = 0
        self.mappings_opened = 0
        self.mappings_closed = 0
        self.copies = 0
        self.batches = 0
        d = _driver()
        self._batch_fn = getattr(d, "cuMemcpyBatchAsync", None)

    @classmethod
    def instance(cls) -> CudaIpcPlane:
        return base.instance(KIND, cls)

    @property
    def name(self) -> str:
        return KIND

    # ------------------------------------------------------------ context
    def _context(self, device: int | None = None) -> int:
        """Make the device's primary context current on this thread (torch's, so our pointers and
        its tensors live in one address space); return the device."""
        dev = torch.cuda.current_device() if device is None or device < 0 else device
        if getattr(self._local, "dev", None) == dev:
            return dev
        d = _driver()
        ctx = self._ctx.get(dev)
        if ctx is None:
            torch.cuda.init()
            cu_dev = _ok(d.cuDeviceGet(dev), "cuDeviceGet")
            ctx = self._ctx[dev] = _ok(d.cuDevicePrimaryCtxRetain(cu_dev), "cuDevicePrimaryCtxRetain")
        _ok(d.cuCtxSetCurrent(ctx), "cuCtxSetCurrent")
        self._local.dev = dev
        return dev

    def _stream(self, dev: int) -> Any:
        s = self._streams.get(dev)
        if s is None:
            d = _driver()
            s = self._streams[dev] = _ok(d.cuStreamCreate(d.CUstream_flags.CU_STREAM_NON_BLOCKING),
                                         "cuStreamCreate")
        return s

    def _event(self) -> Any:
        if self._events:
            return self._events.pop()
        d = _driver()
        return _ok(d.cuEventCreate(d.CUevent_flags.CU_EVENT_DISABLE_TIMING), "cuEventCreate")

    # ------------------------------------------------------------ export
    def broker_info(self) -> dict[str, Any]:
        """Where peers fetch descriptors of this process's virtual-memory chunks (started once)."""
        if self._broker is None:
            self._broker = cuda_vmm.Broker(self._vmm_exports)
        return self._broker.info()

    def acquire(self, t: torch.Tensor, pin: bool = False) -> Region:
        dev = t.get_device()

        def export(alloc: Allocation) -> Region:
            if not self._legacy(alloc.base, dev):
                release_allocation(alloc)
                return self._export_vmm(t)  # a span of chunks per tensor: not cached per segment
            return self._export(alloc, dev)

        return self._exposed.hold(allocation_of(t), pin, export)

    def _legacy(self, ptr: int, device: int) -> bool:
        """Whether the allocation at ``ptr`` has a legacy IPC handle (else: virtual memory)."""
        d = _driver()
        self._context(device)
        attr = d.CUpointer_attribute.CU_POINTER_ATTRIBUTE_IS_LEGACY_CUDA_IPC_CAPABLE
        ok = _ok(d.cuPointerGetAttribute(attr, ptr), "cuPointerGetAttribute")
        return bool(ok)

    def _export_vmm(self, t: torch.Tensor) -> Region:
        start, n = t.data_ptr(), t.nbytes
        chunks = tuple(self._vmm_exports.span(start, n))
        if self._broker is None:
            self.broker_info()
        desc = VmmDesc(start, max(1, n), chunks)
        self.exports += 1
        return Region(start, max(1, n), None, handle=(None, desc, Announcement(0, 0, pack_desc(desc))))

    def _export(self, alloc: Allocation, device: int) -> Region:
        for stale in self._regions.overlapping(alloc.base, alloc.size):
            if stale.inflight or stale.pinned:
                raise TransferFailed(
                    f"memory at 0x{alloc.base:x}+{alloc.size} overlaps an exported segment still in use "
                    f"(0x{stale.base:x}+{stale.size}); was a tensor freed while in flight?")
            self._regions.remove(stale)
        d = _driver()
        self._context(device)
        try:
            h = _ok(d.cuIpcGetMemHandle(alloc.base), "cuIpcGetMemHandle")
        except TransferFailed as e:
            release_allocation(alloc)
            raise ConfigurationError(
                f"cannot share CUDA memory at 0x{alloc.base:x} through CUDA IPC ({e}); connect with "
                "transport='nvlink' (the Transfer Engine) or 'tcp'") from None
        ident = alloc.ident[1] if isinstance(alloc.ident, tuple) else 0
        desc = SegmentDesc(ctypes.string_at(h.getPtr(), _HANDLE), alloc.base, alloc.size, int(ident))
        self.exports += 1
        ann = Announcement(0, 0, pack_desc(desc))
        r = Region(alloc.base, alloc.size, alloc.ident, handle=(alloc, desc, ann))
        self._regions.add(r)
        return r

    def prepare_local(self, t: torch.Tensor) -> Region:
        return base.NO_REGION  # our own copies reach our own memory: nothing to export

    def release(self, r: Region, pin: bool = False) -> None:
        if r is not base.NO_REGION:
            self._exposed.release(r, pin)

    def retain(self, r: Region) -> bool:
        return self._exposed.retain(r)  # (NO_REGION is never cached: False)

    def unpin(self, t: torch.Tensor) -> None:
        self._exposed.unpin(t)

    def announce(self, r: Region) -> Announcement:
        ann: Announcement = r.handle[2]  # type: ignore[index]  # packed once, at export
        return ann

    def trim(self, cpu_only: bool = False) -> int:
        """Forget exported segments nothing uses (a handle needs no release) and close the
        descriptors of exported virtual-memory chunks (they keep the memory alive)."""
        if cpu_only:
            return 0
        n = 0
        with self._exposed.lock:
            for r in self._regions:
                if not r.inflight and not r.pinned:
                    self._regions.remove(r)
                    release_allocation(r.handle[0])
                    n += 1
        return n + self._vmm_exports.close_all()

    # ------------------------------------------------------------ import
    @staticmethod
    def _remote_of(segment: str) -> str:
        """The remote process behind ``segment`` (``ipc:<pid>:<token>``), checked."""
        kind, _, rest = segment.partition(":")
        pid, _, token = rest.partition(":")
        if kind != "ipc" or not pid.isdigit() or not token:
            raise TransferFailed(f"not a CUDA IPC segment: {segment!r}")
        return segment

    def target(self, segment: str, announced: Announcement) -> _Mapping:
        """This process's mapping of the remote memory ``announced`` describes (each part opened
        once per remote process)."""
        hit = self._known.get(announced.desc)
        if hit is not None and hit[0] == segment:
            if hit[2] == self.mappings_closed:  # no part of any mapping closed since: still live
                return hit[1]
            if hit[1].live:
                self._known[announced.desc] = (segment, hit[1], self.mappings_closed)
                return hit[1]
        pid = self._remote_of(segment)
        desc = unpack_desc(announced.desc)
        parts = self._parts.get(pid)
        if parts is None:
            parts = self._parts[pid] = {}
        self._context()
        # (base, size, buffer id, the exporter's descriptor: -1 for a legacy segment)
        if isinstance(desc, SegmentDesc):
            wanted = [(desc.base, desc.size, desc.ident, -1)]
        else:
            wanted = [(cbase, csize, ident, fd) for fd, cbase, csize, ident in desc.chunks]
        got: list[_Part] = []
        missing = [w for w in wanted if (w[0], w[2]) not in parts]
        fetched: dict[tuple[int, int], int] = {}
        if missing and isinstance(desc, VmmDesc):
            broker = self._brokers.get(pid)
            if broker is None:
                raise TransferFailed(f"process {pid} shares virtual memory but announced no broker")
            fds = cuda_vmm.fetch(broker[0], broker[1], [w[3] for w in missing])
            fetched = dict(zip([(w[0], w[2]) for w in missing], fds, strict=True))
        try:
            for cbase, csize, ident, _ in wanted:
                part = parts.get((cbase, ident))
                if part is None:
                    part = self._open(parts, desc, cbase, csize, ident, fetched.pop((cbase, ident), None))
                got.append(part)
        finally:
            for fd in fetched.values():  # not used after a failure
                os.close(fd)
        m = _Mapping(desc, pid, got, [(p.base, p.size, p.local) for p in got])
        if len(self._known) > 4096:
            self._known.clear()
        self._known[announced.desc] = (segment, m, self.mappings_closed)
        return m

    def _open(self, parts: dict[tuple[int, int], _Part], desc: Desc, cbase: int, csize: int, ident: int,
              fd: int | None) -> _Part:
        # A live allocation of that process cannot overlap another: an overlapping part is memory
        # it freed since. Close it (a new one at the same addresses follows).
        for key, old in list(parts.items()):
            if old.base < cbase + csize and cbase < old.base + old.size:
                self._close(old)
                del parts[key]
        if fd is None:
            assert isinstance(desc, SegmentDesc)
            d = _driver()
            h = d.CUipcMemHandle()
            ctypes.memmove(h.getPtr(), desc.handle, _HANDLE)
            local = int(_ok(d.cuIpcOpenMemHandle(h, d.CUipcMem_flags.CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS),
                            "opening the remote's CUDA memory (cuIpcOpenMemHandle)"))
            part = _Part(cbase, csize, local, vmm=False)
        else:
            part = _Part(cbase, csize, cuda_vmm.map_chunk(fd, csize, self._context()), vmm=True)
        parts[(cbase, ident)] = part
        self.mappings_opened += 1
        return part

    def _close(self, part: _Part) -> None:
        part.closed = True
        self.mappings_closed += 1
        if part.vmm:
            cuda_vmm.unmap(part.local, part.size)
            return
        d = _driver()
        err, = d.cuIpcCloseMemHandle(part.local)
        if err != d.CUresult.CUDA_SUCCESS:
            log.warning("closing a CUDA IPC mapping failed: %s", err)

    def _drop(self, pid: str, m: _Mapping) -> None:
        """Close ``m``'s parts now (the handshake's probe: nothing else uses them)."""
        parts = self._parts.get(pid, {})
        for key, part in list(parts.items()):
            if part in m.parts:
                self._close(part)
                del parts[key]

    def mapped(self) -> int:
        """How many parts of remote memory are mapped here now (diagnostics and leak checks)."""
        return sum(len(v) for v in self._parts.values())

    def attach(self, remote: str = "") -> None:
        super().attach(remote)
        pid = self._remote_of(remote)
        self._peers_of[pid] = self._peers_of.get(pid, 0) + 1

    def detach(self, remote: str = "") -> None:
        """A peer of the process behind ``remote`` closed; with its last one, close its mappings
        (copies into them have settled: the peer waits for its copies before it detaches)."""
        super().detach(remote)
        pid = self._remote_of(remote)
        left = self._peers_of.get(pid, 0) - 1
        if left > 0:
            self._peers_of[pid] = left
            return
        self._peers_of.pop(pid, None)
        self._brokers.pop(pid, None)
        for part in self._parts.pop(pid, {}).values():
            self._close(part)

    # ------------------------------------------------------------ copies
    def write(self, target: Any, pieces: Sequence[Piece], window: int, lane: int = -1) -> IpcJob:
        return self._job(target, pieces, lane, read=False)

    def pull(self, target: Any, pieces: Sequence[Piece], window: int, lane: int = -1) -> IpcJob:
        return self._job(target, pieces, lane, read=True)

    def _job(self, target: _Mapping, pieces: Sequence[Piece], lane: int, read: bool) -> IpcJob:
        job = IpcJob(self, target, translate(pieces, target.desc, target.ranges), 1 << 30, lane, read=read)
        poller().add(job)
        return job

    def gathers(self, nbytes: int) -> bool:
        # beyond HOLD_BYTES a copy outlasts the burst's parsing: it starts alone, at once
        return nbytes <= tuning.HOLD_BYTES

    def route(self, target: _Mapping, pieces: Sequence[Piece], read: bool) -> list[Piece]:
        """``(destination, source, length)`` in this process's mappings, every piece checked."""
        routed = translate(pieces, target.desc, target.ranges)
        return routed if read else [(m, a, n) for a, m, n in routed]

    def copy_all(self, routed: list[Any], lane: int = -1) -> IpcJob:
        """One job, one submission (``cuMemcpyBatchAsync``) and one event for a burst's copies."""
        job = IpcJob(self, None, routed, 1 << 30, lane, read=True)
        job.shared = True
        self._submit([job])
        poller().watch(job)
        return job

    def submit_together(self, jobs: list[Job]) -> bool:
        todo = [j for j in jobs
                if isinstance(j, IpcJob) and j.burst is None and not j.stopped and j.error is None]
        if not todo:
            return False
        self._submit(todo)
        return True

    def _submit(self, jobs: list[IpcJob]) -> None:
        """Queue every piece of ``jobs`` (one device) on the device's stream, then one event."""
        dev = self._context(jobs[0].lane)
        d = _driver()
        stream = self._stream(dev)
        dsts: list[int] = []
        srcs: list[int] = []
        sizes: list[int] = []
        for j in jobs:
            for local, mapped, n in j.pieces:
                if n:
                    dsts.append(local if j.read else mapped)
                    srcs.append(mapped if j.read else local)
                    sizes.append(n)
        burst = _Burst(None, len(jobs))
        try:
            self._copy(dev, d, stream, dsts, srcs, sizes)
            ev = burst.event = self._event()
            _ok(d.cuEventRecord(ev, stream), "cuEventRecord")
        except TransferFailed as e:
            burst.state, burst.error = -1, str(e)
        self.copies += len(sizes)
        self.batches += 1
        for j in jobs:
            j.burst = burst
            j.next = len(j.pieces)

    def _copy(self, dev: int, d: Any, stream: Any, dsts: list[int], srcs: list[int],
              sizes: list[int]) -> None:
        if not sizes:
            return
        # A lone copy goes through the driver: a launch of the kernel costs more host time than one
        # cuMemcpyAsync (11 against 7 us) and copies 100 MiB slower (1.42 against 1.69 TB/s).
        kernel = kernel_for(dev) if len(sizes) > 1 else None
        if kernel is not None:
            try:
                kernel.launch(dsts, srcs, sizes, int(stream))
            except RuntimeError as e:
                raise TransferFailed(f"the CUDA copy kernel could not start: {e}") from None
            return
        if len(sizes) > 1 and self._batch_fn is not None and batch_copy(dsts, srcs, sizes, int(stream)):
            return
        if len(sizes) > 1 and self._batch_fn is not None:
            attrs = d.CUmemcpyAttributes()
            attrs.srcAccessOrder = d.CUmemcpySrcAccessOrder.CU_MEMCPY_SRC_ACCESS_ORDER_STREAM
            ptr = d.CUdeviceptr
            result = self._batch_fn([ptr(x) for x in dsts], [ptr(x) for x in srcs], sizes, len(sizes),
                                    [attrs], [0], 1, stream)
            err = result[0] if isinstance(result, tuple) else result
            if err == d.CUresult.CUDA_SUCCESS:
                return
            log.debug("cuMemcpyBatchAsync refused %d copies (%s); queueing them one by one", len(sizes), err)
            self._batch_fn = None
        for dst, src, n in zip(dsts, srcs, sizes, strict=True):
            _ok(d.cuMemcpyAsync(dst, src, n, stream), "cuMemcpyAsync")

    def _settle(self, burst: _Burst) -> int:
        """Query a burst's event (once it reports done, the event goes back to the pool)."""
        if burst.state == 0:
            d = _driver()
            err, = d.cuEventQuery(burst.event)
            if err == d.CUresult.CUDA_SUCCESS:
                burst.state = 1
            elif err != d.CUresult.CUDA_ERROR_NOT_READY:
                burst.state, burst.error = -1, f"a CUDA IPC copy failed: {err}"
        return burst.state

    def _done_with(self, burst: _Burst) -> None:
        burst.jobs -= 1
        if burst.jobs == 0 and burst.event is not None and burst.state == 1:
            self._events.append(burst.event)
            burst.event = None

    def stats(self) -> Stats:
        return Stats(self.exports, 0, len(self._regions), self.copies, self.batches)


def _after_fork_in_child() -> None:
    base.forget(KIND)  # the parent's broker thread, streams and mappings are not the child's


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


@dataclass(eq=False)
class IpcJob(Job):
    """Copies of one message, queued in one go (with its burst) and completed by one event."""

    burst: _Burst | None = None
    settled: bool = field(default=False)

    def pending(self) -> int:
        return 1 if self.burst is not None and not self.settled else 0

    def step(self) -> bool:
        plane = self.plane
        assert isinstance(plane, CudaIpcPlane)
        if self.settled:
            return True
        if self.burst is None:
            if self.stopped or not self.pieces:
                return self._finish(None)
            plane._submit([self])
        assert self.burst is not None
        state = plane._settle(self.burst)
        if state == 0:
            return False
        return self._finish(self.burst.error if state < 0 else None)

    @property
    def batch_key(self) -> tuple[object, ...]:
        return (self.lane,)  # every copy of a device goes on one stream, whatever it targets

    def _finish(self, error: str | None) -> bool:
        self.settled = True
        if self.burst is not None:
            assert isinstance(self.plane, CudaIpcPlane)
            self.plane._done_with(self.burst)
        self.settle(error)
        return True
