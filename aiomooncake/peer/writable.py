"""Whether the data plane may write into a tensor's memory (the receive destination's probe).

Torch does not record whether memory may be written (``torch.frombuffer`` over ``bytes`` or a
read-only ``mmap`` only warns), and a remote writer (the engine, another process) would either
crash this process on a read-only page or silently change an immutable Python ``bytes`` object.
:func:`unwritable` says why not, or None; it looks only at memory torch's allocator does not own.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import sys
import threading
from typing import Any

import torch

_probe_lock = threading.Lock()
_probe_pipe: tuple[int, int] | None = None
_probe_pid = 0  # the process that made _probe_pipe (a forked child must not share its parent's)
_libc_read: Any = None
_libc_write: Any = None
_BYTES_TYPE = id(bytes).to_bytes(8, sys.byteorder)


def unwritable(t: torch.Tensor) -> str | None:
    """Why the engine must not write into ``t``, or None. Torch does not record whether memory may
    be written (``torch.frombuffer`` over ``bytes`` or a read-only ``mmap`` only warns), so look:
    elements that share memory (expanded tensors), pages the kernel maps read-only (writing there
    would crash the process), and the payload of an immutable Python ``bytes`` object (writing there
    would silently change a value Python assumes constant). Storage torch's allocator owns is
    skipped; for outside memory about 3 us per call."""
    if t.numel() == 0:
        return None
    if not t.is_contiguous() and torch._debug_has_internal_overlap(t) == 1:
        return "several of its elements share memory (an expanded or stride-0 tensor)"
    if not t.is_cpu:
        return None
    st = t.untyped_storage()
    if st.resizable():  # torch's own allocator made it: writable, and never a bytes object
        return None
    base, size = st.data_ptr(), st.nbytes()
    if size == 0 or base == 0:
        return None
    seen = _writable_seen.get(base)
    if seen is not None:  # a live storage found writable stays writable: skip the syscalls
        if not torch.UntypedStorage._expired(seen):
            return None
        torch.UntypedStorage._free_weak_ref(seen)
        del _writable_seen[base]
    for addr in {base, base + size - 1}:
        if not _page_writable(addr):
            return "its memory is mapped read-only (e.g. torch.frombuffer over a read-only mmap)"
    if _inside_bytes_object(base, size):
        return "its memory is an immutable Python bytes object (torch.frombuffer over bytes)"
    if len(_writable_seen) > 4096:
        for key, ref in list(_writable_seen.items()):
            if torch.UntypedStorage._expired(ref):
                torch.UntypedStorage._free_weak_ref(ref)
                del _writable_seen[key]
    _writable_seen[base] = st._weak_ref()  # type: ignore[assignment]
    return None


_writable_seen: dict[int, int] = {}  # storage address -> weak reference of a storage found writable


def _probe_setup() -> tuple[int, int]:
    """The pipe and libc calls the probes use (call with _probe_lock held)."""
    global _probe_pipe, _probe_pid, _libc_read, _libc_write
    if _probe_pipe is None or _probe_pid != os.getpid():
        lib = ctypes.CDLL(None, use_errno=True)
        _libc_read, _libc_write = lib.read, lib.write
        for fn in (_libc_read, _libc_write):
            fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t]
            fn.restype = ctypes.c_ssize_t
        r, w = os.pipe()
        os.set_blocking(r, False)  # a probe never waits, even if the pipe were somehow empty
        _probe_pipe, _probe_pid = (r, w), os.getpid()
    return _probe_pipe


def _drain(r: int) -> None:
    """Empty the probe pipe: a byte left behind would be read into the next probed memory."""
    with contextlib.suppress(BlockingIOError):
        while os.read(r, 64):
            pass


def _page_writable(addr: int) -> bool:
    """Whether the kernel lets this process write the byte at ``addr``: read() one byte from a pipe
    into it (the byte it already holds, so nothing changes); a read-only page gives EFAULT."""
    with _probe_lock:
        r, w = _probe_setup()
        _drain(r)
        os.write(w, ctypes.string_at(addr, 1))
        while _libc_read(r, addr, 1) != 1:
            err = ctypes.get_errno()
            if err != errno.EINTR:
                _drain(r)  # the byte is still in the pipe
                return err != errno.EFAULT  # only EFAULT says the page refuses writes
        return True


def _inside_bytes_object(base: int, size: int) -> bool:
    """Whether ``[base, base + size)`` lies in the payload of a live ``bytes`` object whose header
    (refcount, type, size, hash: 32 bytes on 64-bit CPython) is within the page of ``base`` or the
    one before (a small object can straddle a page boundary; the earlier page is read only if the
    kernel says it is readable). Stale memory can hold the type's address too, so the header must
    also look alive: 16-byte aligned (every CPython allocator aligns so), a plausible reference
    count (a freed object's first word is an allocator's free-list pointer) and a size that covers
    the tensor, and the NUL byte CPython keeps after every payload. Not seen: views starting more
    than a page into a bytes object."""
    if sys.implementation.name != "cpython" or ctypes.sizeof(ctypes.c_void_p) != 8:
        return False
    if _starts_malloc_chunk(base, size):
        return False
    start = (base & ~4095) - 4096
    if start <= 0 or not _page_readable(start):
        start = base & ~4095
    off = base - start
    if off < 32:
        return False
    page = ctypes.string_at(start, off)
    i = page.rfind(_BYTES_TYPE)
    while i >= 8:
        obj = start + i - 8
        if obj % 16 == 0 and i + 16 <= off:
            refcnt = int.from_bytes(page[i - 8:i], sys.byteorder)
            length = int.from_bytes(page[i + 8:i + 16], sys.byteorder, signed=True)
            if (0 < refcnt < 1 << 32 and 0 <= length < 1 << 48 and obj + 32 <= base
                    and base + size <= obj + 32 + length
                    and _nul_at(obj + 32 + length)):
                return True
        i = page.rfind(_BYTES_TYPE, 0, i)
    return False


def _starts_malloc_chunk(base: int, size: int) -> bool:
    """Whether ``base`` is the start of a malloc chunk of its own that holds the tensor: the word
    before it is then the chunk's size field (a multiple of 16 covering the tensor), where a bytes
    payload's start has the object's hash (-1 until hashed). Stale memory can hold a whole bytes
    header (a copy left behind when a growing bytes object was moved, refcount 1), and memory
    malloc hands out next to it then looked like that object's payload (seen once in a full test
    run: a bytearray's buffer)."""
    if base % 16 or (base % 4096 < 8 and not _page_readable(base - 8)):
        return False
    chunk = int.from_bytes(ctypes.string_at(base - 8, 8), sys.byteorder) & ~7
    return chunk % 16 == 0 and size + 8 <= chunk < 1 << 40


def _nul_at(addr: int) -> bool:
    """Whether ``addr`` holds the NUL CPython keeps after a bytes payload. A stale header's length
    can point anywhere: ask the kernel before reading (a bad read would crash the process)."""
    return _page_readable(addr) and ctypes.string_at(addr, 1) == b"\0"


def _page_readable(addr: int) -> bool:
    """Whether the byte at ``addr`` may be read: write() it to a pipe (EFAULT if not mapped)."""
    with _probe_lock:
        r, w = _probe_setup()
        if _libc_write(w, addr, 1) != 1:
            return False
        _drain(r)
        return True


