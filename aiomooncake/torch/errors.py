"""Exceptions the torch layer raises.

``torch.distributed`` code catches ``RuntimeError`` (gloo raises plain ``RuntimeError`` and
``DistBackendError``/``DistStoreError``), so every exception here is one too; argument errors are also
``ValueError`` because they are the caller's mistake. The aiomooncake error that caused a failure,
if any, is the exception's ``__cause__``.
"""

from __future__ import annotations

import torch.distributed as dist


class InvalidArgument(ValueError, dist.DistError):
    """A bad argument (rank out of range, negative tag, non-contiguous tensor, ...). Raised at once by
    the call that received it, never later by ``wait()``."""


class BackendError(dist.DistBackendError):
    """An operation failed: the peer died, the sizes of a send and its recv differ, the group was
    shut down, the engine failed. Raised by ``Work.wait()`` (and returned by ``Work.exception()``)."""


class OpTimeout(BackendError):
    """An operation did not finish within the process group's timeout, or ``Work.wait(timeout)``
    gave up waiting (the operation itself then keeps going, as with gloo)."""


__all__ = ["BackendError", "InvalidArgument", "OpTimeout"]
