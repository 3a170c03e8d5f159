"""Torch-side helpers: dtype names on the wire, byte views, allocations and CUDA stream ordering.

No mooncake here: the engine adapter asks this module *which memory* a tensor lives in, and the
peer asks it how to wait for the caller's stream without blocking the event loop.
"""

from __future__ import annotations

import asyncio
import ctypes
from dataclasses import dataclass
from typing import Any, Union

import torch

from . import tuning
from .errors import ConfigurationError, MessageMismatch

_NAMES: dict[torch.dtype, str] = {}


def dtype_name(dtype: torch.dtype) -> str:
    name = _NAMES.get(dtype)
    if name is None:
        name = _NAMES[dtype] = str(dtype).removeprefix("torch.")
    return name


def dtype_from_name(name: str) -> torch.dtype:
    dt = getattr(torch, name, None)
    if not isinstance(dt, torch.dtype):
        raise MessageMismatch(f"the peer sent dtype {name!r}, which this torch ({torch.__version__}) "
                              "does not know; upgrade torch on this side")
    return dt


def device_kind(t: torch.Tensor) -> str:
    kind = t.device.type
    if kind not in ("cpu", "cuda"):
        raise ConfigurationError(f"tensors on {t.device} are not supported; use a cpu or cuda tensor")
    return kind


def byte_view(t: torch.Tensor) -> torch.Tensor:
    """A flat uint8 view of a contiguous tensor (works for every dtype, 0-d included)."""
    flat = t.reshape(-1)
    return flat if flat.dtype == torch.uint8 else flat.view(torch.uint8)


def to_bytes(t: torch.Tensor) -> bytes:
    """Copy a small contiguous CPU tensor's bytes (the eager path; one memcpy, no torch ops)."""
    n = t.nbytes
    return ctypes.string_at(t.data_ptr(), n) if n else b""


def fill_from_bytes(dest: torch.Tensor, data: bytes) -> None:
    """Copy an eager payload into a contiguous destination (CPU: one memcpy). CUDA: queued on the
    current stream, without waiting for it; the driver stages the host bytes before returning."""
    if not data:
        return
    if dest.is_cpu:
        if len(data) != dest.nbytes:
            raise ValueError("payload size differs from the destination's")
        ctypes.memmove(dest.data_ptr(), data, len(data))
        return
    src = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    byte_view(dest).copy_(src, non_blocking=True)


@dataclass(frozen=True, slots=True)
class Allocation:
    """The allocation a tensor's bytes live in: what gets registered with the engine."""

    base: int
    size: int
    ident: Any
    weak: int | None = None  # a CPU storage's weak reference, to tell when it died

    def alive(self) -> bool:
        return self.weak is None or not torch.UntypedStorage._expired(self.weak)


_cuda_seen: dict[int, tuple[int, Allocation]] = {}


def allocation_of(t: torch.Tensor) -> Allocation:
    """The registrable allocation behind ``t``: its storage on CPU, its caching-allocator segment
    (the cudaMalloc block) on CUDA, identified by the driver's unique buffer id.

    CUDA lookups cost two driver calls; while the tensor's storage is alive its segment cannot be
    released, so the answer is cached per live storage."""
    if t.device.type == "cuda":
        storage = t.untyped_storage()
        key = storage.data_ptr()
        hit = _cuda_seen.get(key)
        if hit is not None:
            if not torch.UntypedStorage._expired(hit[0]):
                return hit[1]
            torch.UntypedStorage._free_weak_ref(hit[0])
            del _cuda_seen[key]
        alloc = _cuda_allocation(key if key else t.data_ptr())
        if key:
            if len(_cuda_seen) > 4096:
                _sweep_cuda_seen()
            _cuda_seen[key] = (_weak_ref(storage), alloc)
        return alloc
    storage = t.untyped_storage()
    base, size = storage.data_ptr(), storage.nbytes()
    return Allocation(base, size, ("cpu", base, size), _weak_ref(storage))


def _weak_ref(storage: torch.UntypedStorage) -> int:
    """A weak reference to a storage, as torch's C API hands it out (an opaque integer)."""
    ref: int = storage._weak_ref()  # type: ignore[assignment]
    return ref


def _sweep_cuda_seen() -> None:
    for key, (weak, _) in list(_cuda_seen.items()):
        if torch.UntypedStorage._expired(weak):
            torch.UntypedStorage._free_weak_ref(weak)
            del _cuda_seen[key]


def release_allocation(a: Allocation) -> None:
    if a.weak is not None:
        torch.UntypedStorage._free_weak_ref(a.weak)


_driver: Any = None


def _cuda_allocation(ptr: int) -> Allocation:
    global _driver
    if _driver is None:
        try:
            from cuda.bindings import driver as _d
        except ImportError:  # cuda-python < 12.6 layout
            from cuda import cuda as _d
        _driver = _d
    d = _driver
    err, base, size = d.cuMemGetAddressRange(ptr)
    if err != d.CUresult.CUDA_SUCCESS:
        raise ConfigurationError(f"cuMemGetAddressRange failed for 0x{ptr:x}: {err}")
    err, buf_id = d.cuPointerGetAttribute(d.CUpointer_attribute.CU_POINTER_ATTRIBUTE_BUFFER_ID, ptr)
    if err != d.CUresult.CUDA_SUCCESS:
        raise ConfigurationError(f"cuPointerGetAttribute(BUFFER_ID) failed for 0x{ptr:x}: {err}")
    return Allocation(int(base), int(size), ("cuda", int(buf_id)))


_streams: dict[tuple[int, int, int], Any] = {}
# Completed events per device: an event once recorded on one GPU's stream cannot record on another's.
_free_events: dict[int, list[torch.cuda.Event]] = {}


def current_stream(device_index: int) -> Any:
    """``torch.cuda.current_stream(device_index)`` without its ~8 us of Python per call (measured
    on an H100 host): the Stream wrapper is cached by the current stream's identity (0.3 us)."""
    key = torch._C._cuda_getCurrentStream(device_index)
    st = _streams.get(key)
    if st is None:
        if len(_streams) > 4096:  # external streams come and go; the wrappers are cheap to rebuild
            _streams.clear()
        st = _streams[key] = torch.cuda.Stream(stream_id=key[0], device_index=key[1], device_type=key[2])
    return st


class Settled:
    """The mark of a stream that was idle when we looked: nothing queued before it to wait for.
    Answers ``query()`` like a completed event; :func:`recycle` ignores it."""

    __slots__ = ()

    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        return None


SETTLED = Settled()
ReadyMark = Union[torch.cuda.Event, Settled]  # noqa: UP007 (a runtime alias)


def record_ready(t: torch.Tensor, stream: Any = None) -> ReadyMark | None:
    """Mark the point on the caller's current stream after which ``t`` may be read or overwritten
    by the engine (None for CPU tensors): :data:`SETTLED` if the stream is idle, else an event from
    a pool (creating one costs ~13 us on its first record); hand it back with :func:`recycle` once
    nothing will wait on it any more."""
    idx = t.get_device()
    if idx < 0:
        return None
    ev = stream_mark(current_stream(idx) if stream is None else stream, idx)
    return SETTLED if ev is None else ev


def stream_mark(stream: Any, idx: int) -> torch.cuda.Event | None:
    """An event recorded on ``stream`` (of device ``idx``), or None if the stream is idle: then
    nothing queued on it has to be waited for."""
    # Two processes on one GPU pay a context switch for every command either queues while the
    # other copies (an event record included): look at an idle stream instead of recording on it.
    if tuning.SKIP_IDLE_STREAMS and stream.query():
        return None
    ev = pooled_event(idx)
    ev.record(stream)
    return ev


def pooled_event(idx: int) -> torch.cuda.Event:
    """An event for device ``idx`` from the pool (or a new one); record it before use."""
    pool = _free_events.get(idx)
    if pool:
        try:
            return pool.pop()  # one atomic step: user threads (the torch backend) call this too
        except IndexError:
            pass
    ev = torch.cuda.Event()
    ev.pool_device = idx  # type: ignore[attr-defined]
    return ev


def recycle(ev: ReadyMark | None) -> None:
    """Return an event from :func:`record_ready` or :func:`pooled_event` that nothing will wait
    on any more. It need not be complete: recording it again leaves the waits already queued on
    its earlier record untouched (CUDA semantics)."""
    if ev is not None and not isinstance(ev, Settled):
        pool = _free_events.setdefault(ev.pool_device, [])  # type: ignore[attr-defined]
        if len(pool) < 1024:  # a batch_isend_irecv of 512 ops holds 512
            pool.append(ev)


async def wait_event(ev: ReadyMark | None) -> None:
    """Wait for a CUDA event without blocking the loop or synchronizing the device."""
    if ev is None or ev.query():
        return
    delay = 0.0
    while not ev.query():
        await asyncio.sleep(delay)
        delay = min(0.001, delay * 2 if delay else 0.00002)
