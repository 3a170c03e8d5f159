"""CUDA virtual-memory allocations shared between processes: torch's expandable segments.

With ``PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True`` torch maps physical chunks (``cuMemCreate``,
2 or 20 MiB each) into one reserved address range as it grows; such memory has no legacy CUDA IPC
handle, and one tensor may span several chunks. Each chunk is exported as a POSIX file descriptor
(``cuMemExportToShareableHandle``; torch creates them shareable that way), and the importer maps it
into an address range of its own (import, reserve, map, grant access): one mapping per chunk, so a
copy that spans chunks is split at their boundaries.

A file descriptor has to reach the other process: a small broker thread per exporting process hands
its chunks' descriptors over an abstract Unix socket (``SCM_RIGHTS``), only to a caller presenting
the random key announced in the authenticated handshake, and only descriptors of chunks it exported
to offer a tensor (what ``pidfd_getfd`` would need ptrace rights for, and what sandboxes such as
gVisor may not offer). The socket name and key travel with the CUDA IPC probe (see
:mod:`.cuda_ipc`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import struct
import threading
from typing import Any

from ..errors import TransferFailed
from .cuda_driver import driver as _driver
from .cuda_driver import ok as _ok

log = logging.getLogger(__name__)

_REQ = struct.Struct("<16sI")  # key, how many descriptors follow (as uint32 each)
MAX_FDS = 512  # per request


# ------------------------------------------------------------------------------ export side
class Exports:
    """This process's exported chunks: (base, buffer id) -> (file descriptor, size)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._chunks: dict[tuple[int, int], tuple[int, int]] = {}
        self.granted: set[int] = set()

    def span(self, start: int, n: int) -> list[tuple[int, int, int, int]]:
        """The chunks ``(fd, base, size, buffer id)`` covering ``[start, start + n)``, exported
        once each (the context of the memory's device must be current)."""
        d = _driver()
        out = []
        addr, end = start, start + max(1, n)
        with self._lock:
            while addr < end:
                base, size = _ok(d.cuMemGetAddressRange(addr), "cuMemGetAddressRange")
                base, size = int(base), int(size)
                ident = int(_ok(d.cuPointerGetAttribute(
                    d.CUpointer_attribute.CU_POINTER_ATTRIBUTE_BUFFER_ID, addr), "cuPointerGetAttribute"))
                hit = self._chunks.get((base, ident))
                if hit is None:
                    for key in [k for k in self._chunks if k[0] == base]:  # an older chunk there: gone
                        self._drop(key)
                    fd = _export(addr)
                    hit = self._chunks[(base, ident)] = (fd, size)
                    self.granted.add(fd)
                out.append((hit[0], base, size, ident))
                if size <= 0:
                    raise TransferFailed(f"the driver reports an empty allocation at 0x{addr:x}")
                addr = base + size
        return out

    def _drop(self, key: tuple[int, int]) -> None:
        fd, _ = self._chunks.pop(key)
        self.granted.discard(fd)
        with contextlib.suppress(OSError):
            os.close(fd)

    def close_all(self) -> int:
        """Forget every exported chunk (their descriptors keep the memory alive); how many."""
        with self._lock:
            keys = list(self._chunks)
            for key in keys:
                self._drop(key)
        return len(keys)


def _export(addr: int) -> int:
    d = _driver()
    handle = _ok(d.cuMemRetainAllocationHandle(addr), "cuMemRetainAllocationHandle")
    try:
        fd = _ok(d.cuMemExportToShareableHandle(
            handle, d.CUmemAllocationHandleType.CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR, 0),
            "cuMemExportToShareableHandle (is the allocation shareable as a file descriptor?)")
    finally:
        d.cuMemRelease(handle)
    return int(fd)


class Broker:
    """Serves this process's exported chunk descriptors to authenticated peers (one daemon
    thread; requests are rare: once per chunk and peer process)."""

    def __init__(self, exports: Exports) -> None:
        self.exports = exports
        self.key = os.urandom(16)
        self.name = f"\0aiomooncake-ipc-{os.getpid()}-{os.urandom(8).hex()}"
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(self.name)
        self._sock.listen(16)
        self.served = 0
        self._thread = threading.Thread(target=self._serve, name="aiomooncake-ipc-broker", daemon=True)
        self._thread.start()

    def info(self) -> dict[str, Any]:
        return {"name": self.name[1:], "key": self.key}

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            with conn:
                try:
                    conn.settimeout(5.0)
                    self._answer(conn)
                except Exception as e:  # a bad client must not end the broker
                    log.debug("CUDA IPC broker: a request failed: %s", e)

    def _answer(self, conn: socket.socket) -> None:
        head = _recv_exact(conn, _REQ.size)
        key, count = _REQ.unpack(head)
        if key != self.key or not 0 < count <= MAX_FDS:
            conn.sendall(b"\1")
            return
        fds = list(struct.unpack(f"<{count}I", _recv_exact(conn, 4 * count)))
        if not all(fd in self.exports.granted for fd in fds):
            conn.sendall(b"\2")  # only chunks this process exported to offer a tensor
            return
        socket.send_fds(conn, [b"\0"], fds)
        self.served += 1


def _recv_exact(conn: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        part = conn.recv(n - len(buf))
        if not part:
            raise ConnectionError("the peer closed the broker connection")
        buf += part
    return buf


def fetch(name: str, key: bytes, fds: list[int], timeout: float = 5.0) -> list[int]:
    """Descriptors ``fds`` of the process whose broker listens at ``name``, as descriptors here."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        try:
            s.connect("\0" + name)
            s.sendall(_REQ.pack(key, len(fds)) + struct.pack(f"<{len(fds)}I", *fds))
            msg, got, _, _ = socket.recv_fds(s, 1, len(fds))
        except OSError as e:
            raise TransferFailed(f"could not fetch the peer's CUDA memory descriptors ({e}); "
                                 "are both processes in one network namespace?") from None
    if msg != b"\0" or len(got) != len(fds):
        for fd in got:
            os.close(fd)
        raise TransferFailed("the peer's CUDA IPC broker refused the request")
    return list(got)


# ------------------------------------------------------------------------------ import side
def map_chunk(fd: int, size: int, device: int) -> int:
    """Map the chunk behind ``fd`` (ours now; closed here) into a new address range; its address."""
    d = _driver()
    try:
        handle = _ok(d.cuMemImportFromShareableHandle(
            fd, d.CUmemAllocationHandleType.CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR),
            "cuMemImportFromShareableHandle")
    finally:
        os.close(fd)
    try:
        va = int(_ok(d.cuMemAddressReserve(size, 0, 0, 0), "cuMemAddressReserve"))
        try:
            _ok(d.cuMemMap(va, size, 0, handle, 0), "cuMemMap")
            access = d.CUmemAccessDesc()
            access.location.type = d.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
            access.location.id = device
            access.flags = d.CUmemAccess_flags.CU_MEM_ACCESS_FLAGS_PROT_READWRITE
            try:
                _ok(d.cuMemSetAccess(va, size, [access], 1), "cuMemSetAccess")
            except TransferFailed:
                d.cuMemUnmap(va, size)
                raise
        except TransferFailed:
            d.cuMemAddressFree(va, size)
            raise
    finally:
        d.cuMemRelease(handle)  # the mapping keeps the memory
    return va


def unmap(va: int, size: int) -> None:
    d = _driver()
    d.cuMemUnmap(va, size)
    d.cuMemAddressFree(va, size)
