"""The same-host CPU data path: one kernel copy with ``process_vm_readv`` (or ``_writev``).

When both peers run on one host under one uid, a rendezvous on the "cpu" link needs no network
stack: the receiver pulls the sender's tensor straight into its own with ``process_vm_readv(2)``
(:meth:`ShmPlane.read`, the source offered in the RTS), once, with no socket, no staging buffer
and no registration. Where the kernel refuses that read, the sender writes instead with
``process_vm_writev(2)`` (:meth:`ShmPlane.write`; the receiver's "registration" is a no-op and the
sender still checks every write against the ``[addr, addr + capacity)`` the receiver announced).
Loopback TCP, which the Transfer Engine uses otherwise, copies twice through socket buffers and
measured at about half of gloo on a 2-core host.

:class:`ShmPlane` implements the :class:`~aiomooncake.planes.base.DataPlane` interface, so a link
carried by it needs nothing special in the peer. Copies of up to ``tuning.SHM_INLINE_BYTES``
(1 MiB, a fraction of a millisecond) run on the event loop, cheaper than a thread hand-off; larger
copies are cut into pieces of at most ``tuning.SHM_CHUNK_BYTES`` copied by a small thread pool
(the syscall releases the GIL), several at once, and the job's future resolves on the loop when the
last piece landed. Memory per copy is constant (a list of piece addresses): nothing is staged.

Who may be written: the kernel lets a process write into another only where it may ptrace it (same
uid, not raised privileges, Yama ``ptrace_scope`` <= 1). The handshake enables the path only after
checking that the peer's claimed pid is a process of this uid that owns the other end of this very
control connection (through ``/proc``), and that reading its probe word through the same permission
check returns the nonce it announced; writes go only to pids that passed that check.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import ipaddress
import logging
import os
import secrets
import sys
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, cast

from .. import tuning
from ..errors import HandshakeError, TransferFailed
from . import base
from .base import DataPlane, Job, Piece, Stats

log = logging.getLogger(__name__)

KIND = "shm"

_PR_GET_DUMPABLE = 3
_PR_SET_PTRACER = 0x59616D61
_PR_SET_PTRACER_ANY = ctypes.c_ulong(-1).value


class _Iovec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


@dataclass
class _Sys:
    writev: Any
    readv: Any
    prctl: Any


_sys: _Sys | None = None
_unusable: str | None = None  # why this process cannot use the path (None: it can, or untested)
_tested = False
_probe = (ctypes.c_uint64 * 1)()  # the word peers read to check they may access this process
_probe[0] = secrets.randbits(64)


def _syscalls() -> _Sys:
    global _sys
    if _sys is None:
        libc = ctypes.CDLL(None, use_errno=True)
        fns = []
        for name in ("process_vm_writev", "process_vm_readv"):
            fn = libc[name]
            fn.restype = ctypes.c_ssize_t
            fn.argtypes = [ctypes.c_int, ctypes.POINTER(_Iovec), ctypes.c_ulong,
                           ctypes.POINTER(_Iovec), ctypes.c_ulong, ctypes.c_ulong]
            fns.append(fn)
        prctl = libc["prctl"]
        prctl.restype = ctypes.c_int
        prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
        _sys = _Sys(fns[0], fns[1], prctl)
    return _sys


def _rw(fn: Any, pid: int, local: int, remote: int, n: int) -> None:
    """Move ``n`` bytes between ``local`` here and ``remote`` in ``pid`` (``fn`` decides the
    direction); resumes after partial transfers. Raises OSError."""
    lv, rv = _Iovec(), _Iovec()
    done = 0
    while done < n:
        lv.base, lv.len = local + done, n - done
        rv.base, rv.len = remote + done, n - done
        k = fn(pid, ctypes.byref(lv), 1, ctypes.byref(rv), 1, 0)
        if k <= 0:
            err = ctypes.get_errno() if k < 0 else errno.EFAULT
            raise OSError(err, os.strerror(err))
        done += k


def copy_to(pid: int, src: int, dst: int, n: int) -> None:
    """Copy ``n`` bytes from ``src`` in this process to ``dst`` in process ``pid`` (blocking)."""
    _rw(_syscalls().writev, pid, src, dst, n)


def copy_from(pid: int, src: int, dst: int, n: int) -> None:
    """Copy ``n`` bytes from ``src`` in process ``pid`` to ``dst`` in this process (blocking)."""
    _rw(_syscalls().readv, pid, dst, src, n)


def unavailable() -> str | None:
    """Why this process cannot offer the same-host path, or None when it can.

    Tests the syscall on this process (absent kernels and seccomp filters fail here), refuses
    non-dumpable processes (peers could not access them) and Yama ``ptrace_scope`` >= 2; under scope
    1 it lets any process of this uid access this one (``PR_SET_PTRACER_ANY``), as the default
    scope 0 does anyway."""
    global _tested, _unusable
    if _tested:
        return _unusable
    _tested = True
    _unusable = _check_local()
    if _unusable is not None:
        log.info("same-host CPU path unavailable: %s; the Transfer Engine carries CPU tensors", _unusable)
    return _unusable


def _check_local() -> str | None:
    if not sys.platform.startswith("linux"):
        return "needs Linux"
    try:
        s = _syscalls()
    except (OSError, AttributeError) as e:
        return f"libc lacks process_vm_writev ({e})"
    src = (ctypes.c_uint64 * 1)(0x5A5A5A5A)
    dst = (ctypes.c_uint64 * 1)(0)
    try:
        _rw(s.writev, os.getpid(), ctypes.addressof(src), ctypes.addressof(dst), 8)
    except OSError as e:
        return f"process_vm_writev fails on this process ({e.strerror})"
    if dst[0] != src[0]:
        return "process_vm_writev did not copy"
    if s.prctl(_PR_GET_DUMPABLE, 0, 0, 0, 0) != 1:
        return "this process is not dumpable, so no peer may access its memory"
    try:
        with open("/proc/sys/kernel/yama/ptrace_scope") as f:
            scope = int(f.read().strip() or 0)
    except (OSError, ValueError):
        scope = 0
    if scope >= 2:
        return f"Yama ptrace_scope is {scope}: only privileged processes may access another's memory"
    if scope == 1 and s.prctl(_PR_SET_PTRACER, _PR_SET_PTRACER_ANY, 0, 0, 0) != 0:
        return "Yama ptrace_scope is 1 and PR_SET_PTRACER failed"
    return None


# -------------------------------------------------------------------------------- plane
class ShmPlane(DataPlane):
    """The process-wide same-host CPU plane: no Transfer Engine, no registration (the kernel
    reaches any mapped page), copies only to and from processes the handshake verified."""

    kind = KIND

    def __init__(self) -> None:
        super().__init__()
        self.host = ""
        self.segment = f"pid:{os.getpid()}"
        self.writes_submitted = 0  # copies made (syscall batches), for statistics
        self.pulls = 0  # receives completed by pulling from the sender
        self._count_lock = threading.Lock()
        self._allowed: set[int] = set()
        self._pool: ThreadPoolExecutor | None = None
        self._workers = max(1, min(4, len(os.sched_getaffinity(0))))

    @classmethod
    def instance(cls) -> ShmPlane:
        """The process's same-host plane, listed with the others (``planes.existing()``)."""
        return base.instance(KIND, cls)

    # ------------------------------------------------------------ peers
    def allow(self, pid: int) -> None:
        """Let copies go to and from ``pid`` (a peer the handshake verified)."""
        self._allowed.add(pid)

    def _pid_of(self, segment: str) -> int:
        kind, _, num = segment.partition(":")
        pid = int(num) if kind == "pid" and num.isdigit() else -1
        if pid not in self._allowed:
            raise TransferFailed(f"refusing a same-host copy with {segment!r}: not a peer this process "
                                 "verified during a handshake")
        return pid

    def stats(self) -> Stats:
        return Stats(0, 0, 0, self.writes_submitted)

    def _count(self, n: int) -> None:
        """Count ``n`` copies done (from pool threads too)."""
        with self._count_lock:
            self.writes_submitted += n

    def write(self, target: Any, pieces: Sequence[Piece], window: int, lane: int = -1) -> ShmJob:
        """Copy ``pieces`` of ``(src_addr, dst_addr, length)`` into the peer behind ``segment``.
        ``window`` and ``lane`` are ignored: the pool decides how many copies run at once."""
        return self._start(ShmJob(self, target, list(pieces), max(1, window)))

    def read(self, segment: str, src: int, dst: int, length: int) -> ShmJob:
        """Pull ``length`` bytes from ``src`` in the peer behind ``segment`` into ``dst`` here, like
        :meth:`write` (inline up to ``inline_bytes``, else by the pool), for a receive whose RTS
        offered its source: no remote process ever writes into our memory, and stopping the job
        and awaiting it is all it takes to be sure nothing more lands."""
        return self._start(ShmJob(self, segment, [(src, dst, length)], 1, read=True))

    def pull(self, target: Any, pieces: Sequence[Piece], window: int, lane: int = -1) -> ShmJob:
        """:meth:`read` in the engine's form: ``pieces`` of ``(local_dst, remote_src, length)``."""
        if len(pieces) != 1:
            raise ValueError("a same-host pull copies one piece")
        dst, src, n = pieces[0]
        return self.read(target, src, dst, n)

    def gathers(self, nbytes: int) -> bool:
        # small copies run inline at once (cheaper, and done in posting order); huge ones alone
        return tuning.SHM_INLINE_BYTES < nbytes <= tuning.HOLD_BYTES

    def route(self, target: Any, pieces: Sequence[Piece], read: bool) -> list[Any]:
        """``(segment, read, source, destination, length)``, :class:`ShmJob`'s order (a pull's
        source is in the remote); the remote must be a process the handshake verified."""
        self._pid_of(target)
        if read:
            return [(target, True, src, dst, n) for dst, src, n in pieces]
        return [(target, False, src, dst, n) for src, dst, n in pieces]

    def copy_all(self, routed: list[Any], lane: int = -1) -> Job:
        """The burst's copies as one job per remote and direction (inline when small, else by the
        pool), joined into one."""
        groups: dict[tuple[str, bool], list[Piece]] = {}
        for segment, read, src, dst, n in routed:
            groups.setdefault((segment, read), []).append((src, dst, n))
        jobs: list[Job] = []
        for (segment, read), pieces in groups.items():
            job = ShmJob(self, segment, pieces, 1, read=read)
            job.shared = True
            jobs.append(self._start(job))
        return jobs[0] if len(jobs) == 1 else base.Joint(self, jobs)

    def _start(self, job: ShmJob) -> ShmJob:
        copy = copy_from if job.read else copy_to
        try:
            job.pid = self._pid_of(job.target)
        except TransferFailed as e:
            job.error = str(e)
            job.finish()
            return job
        total = sum(n for _, _, n in job.pieces)
        if total <= tuning.SHM_INLINE_BYTES:
            try:
                for src, dst, n in job.pieces:
                    copy(job.pid, src, dst, n)
                    job.copies += 1
            except OSError as e:
                job.error = _explain(e, job.pid)
            self._count(job.copies)
            job.done = job.copies
            job.finish()
            return job
        # at least one piece per worker, each a multiple of 4 KiB, none over chunk_bytes
        share = -(-total // self._workers)  # ceil
        step = min(tuning.SHM_CHUNK_BYTES, max(256 * 1024, (share + 4095) // 4096 * 4096))
        job.chunks = [(src + off, dst + off, min(step, n - off))
                      for src, dst, n in job.pieces for off in range(0, n, step)]
        workers = min(self._workers, len(job.chunks))
        job.active = workers
        pool = self._pool
        if pool is None:
            pool = self._pool = ThreadPoolExecutor(self._workers, thread_name_prefix="aiomooncake-shm")
        for _ in range(workers):
            pool.submit(job.drain)
        return job

    def _after_fork(self) -> None:
        self.segment = f"pid:{os.getpid()}"
        self._allowed = set()
        self._pool = None  # its threads did not survive the fork


@dataclass(eq=False)
class ShmJob(Job):
    """One copy job (a write, or a pull when ``read``: pieces are then (remote source, local
    destination, length)): resolves ``future`` on the loop once every piece landed, failed or
    stopped. Never polled: the last pool thread (or the loop, for small copies) settles it."""

    pid: int = -1
    chunks: list[tuple[int, int, int]] = field(default_factory=list)
    cursor: int = 0  # next chunk to claim
    copies: int = 0  # chunks copied
    done: int = 0  # == len(chunks) (or pieces) when every byte landed
    active: int = 0  # pool workers still draining
    lock: threading.Lock = field(default_factory=threading.Lock)
    loop: asyncio.AbstractEventLoop = field(default_factory=asyncio.get_running_loop)

    def drain(self) -> None:
        """Pool thread: copy chunks until none is left, the job stopped, or one failed."""
        copy = copy_from if self.read else copy_to
        try:
            while not self.stopped and self.error is None:
                with self.lock:
                    i = self.cursor
                    if i >= len(self.chunks):
                        break
                    self.cursor = i + 1
                src, dst, n = self.chunks[i]
                copy(self.pid, src, dst, n)
                with self.lock:
                    self.copies += 1
                cast(ShmPlane, self.plane)._count(1)
        except OSError as e:
            self.error = self.error or _explain(e, self.pid)
        except BaseException as e:  # never leave the future pending
            self.error = self.error or f"same-host copy crashed: {type(e).__name__}: {e}"
        finally:
            with self.lock:
                self.active -= 1
                last = self.active == 0
            if last:
                self.done = self.copies
                with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits any more
                    self.loop.call_soon_threadsafe(self.finish)

    def finish(self) -> None:
        """On the loop: resolve the job."""
        total = len(self.chunks) if self.chunks else len(self.pieces)
        # the peer reads ``next < len(pieces)`` after a stop as "not every byte was written"
        self.next = len(self.pieces) if self.done >= total else 0
        if self.future.done():
            return
        if self.error is None and self.read and self.next:
            cast(ShmPlane, self.plane).pulls += 1
        self.settle(self.error)



_warned_perm = False


def _explain(e: OSError, pid: int) -> str:
    global _warned_perm
    code = e.errno
    if code in (errno.EPERM, errno.EACCES):
        msg = (f"the kernel refused to write into process {pid} ({errno.errorcode.get(code, code)}): the "
               "same-host CPU path needs ptrace access to the receiver (same uid, Yama ptrace_scope "
               "<= 1, no LSM denial); connect with host_transport='te' to use the Transfer Engine")
        if not _warned_perm:
            _warned_perm = True
            log.warning("%s", msg)
        return msg
    if code == errno.ESRCH:
        return f"the receiving process {pid} is gone"
    if code == errno.EFAULT:
        return f"the destination in process {pid} (or the source here) is not mapped memory"
    return f"process_vm_writev into process {pid} failed: {e.strerror} (errno {code})"


def _after_fork_in_child() -> None:
    inst = base.get(KIND)
    if isinstance(inst, ShmPlane):
        inst._after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


# ---------------------------------------------------------------------------- handshake
def advertise(info: dict[str, Any], host_transport: str) -> None:
    """Add what the peer needs to plan and verify the same-host path to this side's handshake
    info: ``host_transport``, and when the path is possible here the ``"shm"`` capability, the uid
    and the probe word (its address and value)."""
    info["host_transport"] = host_transport
    if host_transport == "te" or unavailable() is not None:
        return
    ShmPlane.instance()
    info["caps"] = [*info.get("caps", []), KIND]
    info["uid"] = os.getuid()
    info["shm_probe"] = [ctypes.addressof(_probe), int(_probe[0])]


def screen(mine: dict[str, Any], theirs: Any, sockname: tuple[str, int], peername: str) -> None:
    """Server side, before planning: keep the ``"shm"`` capability in ``mine`` only if the client
    is verified (see :func:`verify`), so both sides then plan without it when it is not."""
    if KIND not in mine.get("caps", ()) or not isinstance(theirs, dict):
        return
    caps = theirs.get("caps")
    if not isinstance(caps, list) or KIND not in caps or theirs.get("host_id") != mine.get("host_id"):
        return
    why = verify(theirs, sockname, peername)
    if why is not None:
        log.warning("same-host CPU path to %s disabled (%s); using the Transfer Engine", peername, why)
        mine["caps"] = [c for c in mine["caps"] if c != KIND]


def confirm(plan: dict[str, Any], theirs: Any, sockname: tuple[str, int], peername: str) -> None:
    """Client side: the server chose the same-host path; check the server the same way."""
    if plan.get("cpu") != KIND:
        return
    why = verify(theirs, sockname, peername)
    if why is not None:
        raise HandshakeError(f"the server at {peername} chose the same-host CPU path, but this process "
                             f"cannot use it ({why}); connect with host_transport='te'")


def verify(theirs: Any, sockname: tuple[str, int], peername: str) -> str | None:
    """Check that the peer's claimed pid is a process of this uid holding the other end of the
    control connection ``sockname`` <-> ``peername``, and that this process may read its probe word.
    On success writes to that pid are allowed; otherwise say why not."""
    pid = theirs.get("pid") if isinstance(theirs, dict) else None
    probe = theirs.get("shm_probe") if isinstance(theirs, dict) else None
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return "the peer sent no valid pid"
    if (not isinstance(probe, list) or len(probe) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in probe)):
        return "the peer sent no valid probe word"
    if unavailable() is not None:
        return unavailable()
    try:
        if os.stat(f"/proc/{pid}").st_uid != os.getuid():
            return f"process {pid} belongs to another user"
        if not _owns_connection(pid, sockname, peername):
            return (f"process {pid} does not hold the other end of this connection (another network "
                    "or pid namespace?)")
    except OSError as e:
        return f"cannot inspect process {pid} ({e.strerror})"
    word = (ctypes.c_uint64 * 1)()
    try:
        _rw(_syscalls().readv, pid, ctypes.addressof(word), probe[0], 8)
    except OSError as e:
        return f"cannot access process {pid}'s memory ({e.strerror})"
    if word[0] != probe[1]:
        return f"process {pid}'s probe word differs from what it announced"
    ShmPlane.instance().allow(pid)
    return None


def _owns_connection(pid: int, sockname: tuple[str, int], peername: str) -> bool:
    """Whether ``pid`` has the TCP socket whose local end is ``peername`` and remote end ``sockname``
    (the other side of our control connection) open. The socket is looked up in ``pid``'s own view
    of the network (``/proc/<pid>/net``): in another network namespace (a peer reached over a veth)
    our ``/proc/net`` does not list it."""
    host, _, port = peername.rpartition(":")
    try:
        theirs = (_norm(host.strip("[]")), int(port))
        ours = (_norm(sockname[0]), int(sockname[1]))
    except ValueError:
        return False
    inodes = set()
    for table in (f"/proc/{pid}/net/tcp", f"/proc/{pid}/net/tcp6"):
        try:
            with open(table) as f:
                next(f, None)
                for line in f:
                    cols = line.split()
                    if len(cols) > 9 and _parse(cols[1]) == theirs and _parse(cols[2]) == ours:
                        inodes.add(f"socket:[{cols[9]}]")
        except OSError:
            continue
    if not inodes:
        return False
    fd_dir = f"/proc/{pid}/fd"
    for fd in os.listdir(fd_dir):
        try:
            if os.readlink(f"{fd_dir}/{fd}") in inodes:
                return True
        except OSError:
            continue
    return False


def _norm(addr: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    ip = ipaddress.ip_address(addr.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _parse(col: str) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int] | None:
    """An address column of /proc/net/tcp{,6}: hex words in host byte order, then the port."""
    hexip, _, hexport = col.partition(":")
    try:
        raw = b"".join(int(hexip[i:i + 8], 16).to_bytes(4, sys.byteorder) for i in range(0, len(hexip), 8))
        ip: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.ip_address(raw)
        port = int(hexport, 16)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip, port
