"""The CUDA driver API through cuda-python (the project's chosen binding), loaded on first use, and
the one way its ``(error, *values)`` results are checked."""

from __future__ import annotations

from typing import Any

from ..errors import TransferFailed

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
