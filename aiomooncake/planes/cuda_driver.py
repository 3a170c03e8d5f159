"""The CUDA driver API through cuda-python (the project's chosen binding), loaded on first use, and
the one way its ``(error, *values)`` results are checked."""

from __future__ import annotations

import ctypes
import logging
from typing import Any

from ..errors import TransferFailed

log = logging.getLogger(__name__)

_drv: Any = None


def driver() -> Any:
    """``cuda.bindings.driver`` (``cuda.cuda`` on cuda-python before 12.6)."""
    global _drv
    if _drv is None:
        try:
            from cuda.bindings import driver as d
        except ImportError:  # cuda-python < 12.6 layout
            from cuda import cuda as d
        _drv = d
    return _drv


def ok(result: Any, what: str) -> Any:
    """The value(s) of a driver call's ``(err, *values)`` result; TransferFailed on an error."""
    d = driver()
    if isinstance(result, tuple):
        err, rest = result[0], result[1:]
    else:
        err, rest = result, ()
    if err != d.CUresult.CUDA_SUCCESS:
        raise TransferFailed(f"{what} failed: {err}")
    if not rest:
        return None
    return rest[0] if len(rest) == 1 else rest


class _Attrs(ctypes.Structure):
    """``CUmemcpyAttributes``: the source access order, two location hints (unused), flags."""

    _fields_ = [("src_access_order", ctypes.c_int), ("src_hint", ctypes.c_int * 2),
                ("dst_hint", ctypes.c_int * 2), ("flags", ctypes.c_uint)]


_ORDER_STREAM = 1  # CU_MEMCPY_SRC_ACCESS_ORDER_STREAM
_batch: Any = False  # not looked up yet


def batch_copy(dsts: list[int], srcs: list[int], sizes: list[int], stream: int) -> bool:
    """Queue ``len(sizes)`` device copies on ``stream`` with one ``cuMemcpyBatchAsync``, called
    through ctypes with plain integer arrays: cuda-python's wrapper builds a ``CUdeviceptr`` object
    per address and converts each list element by element, which cost ~5 us per copy (2.4 ms for
    the 512 copies of an EPLB exchange, H200). False if the driver lacks it or refused the batch
    (the caller then queues the copies another way)."""
    global _batch
    if _batch is False:
        _batch = _load_batch()
    if _batch is None:
        return False
    fn, v2 = _batch
    n = len(sizes)
    arr = ctypes.c_uint64 * n
    attrs = _Attrs(_ORDER_STREAM)
    idx = (ctypes.c_size_t * 1)(0)
    if v2:
        err = fn(arr(*dsts), arr(*srcs), arr(*sizes), n, ctypes.byref(attrs), idx, 1, stream)
    else:
        fail = ctypes.c_size_t(0)
        err = fn(arr(*dsts), arr(*srcs), arr(*sizes), n, ctypes.byref(attrs), idx, 1, ctypes.byref(fail),
                 stream)
    if err != 0:
        log.debug("cuMemcpyBatchAsync (ctypes) refused %d copies: error %d", n, err)
        _batch = None
        return False
    return True


def _load_batch() -> tuple[Any, bool] | None:
    """The driver's batch copy: ``cuMemcpyBatchAsync_v2`` (CUDA 13: no failure index) or the 12.8
    ``cuMemcpyBatchAsync``; None if neither is exported."""
    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    p = ctypes.c_void_p
    for name, v2 in (("cuMemcpyBatchAsync_v2", True), ("cuMemcpyBatchAsync", False)):
        fn = getattr(lib, name, None)
        if fn is None:
            continue
        fn.restype = ctypes.c_int
        fn.argtypes = [p, p, p, ctypes.c_size_t, p, p, ctypes.c_size_t] + ([] if v2 else [p]) + [p]
        return fn, v2
    return None
