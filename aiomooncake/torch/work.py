"""``Work``: the handle ``isend``/``irecv``/``barrier`` return, a ``torch.distributed.Work`` subclass.

It only reads the operations' thread-safe futures, so ``wait()`` blocks the caller's thread alone
(the GIL is released while it sleeps) and never the loop thread that moves the bytes. Completion
callbacks of :meth:`Work.get_future` run on a separate callback thread, never on the loop thread: a
callback that waits for another operation must not stall the loop that would complete it.
"""

from __future__ import annotations

import concurrent.futures
import datetime
import threading
import time
from collections.abc import Sequence

import torch
import torch.distributed as dist

from .. import _trace
from ..tensors import current_stream
from .errors import BackendError, OpTimeout
from .loop import LoopThread
from .ops import RECV, RECV_ANY, Op

_callbacks: concurrent.futures.ThreadPoolExecutor | None = None
_callbacks_lock = threading.Lock()


def _callback_thread() -> concurrent.futures.ThreadPoolExecutor:
    global _callbacks
    with _callbacks_lock:
        if _callbacks is None:
            _callbacks = concurrent.futures.ThreadPoolExecutor(
                max_workers=1, thread_name_prefix="aiomooncake-callbacks")
        return _callbacks


def _seconds(timeout: datetime.timedelta | float | None) -> float | None:
    """torch passes ``timedelta(0)`` for "no timeout"; accept seconds too."""
    if timeout is None:
        return None
    secs = timeout.total_seconds() if isinstance(timeout, datetime.timedelta) else float(timeout)
    return None if secs <= 0 else secs


def _outcome(op: Op) -> BaseException | None:
    f = op.future
    if f.cancelled():
        return BackendError(f"{op.describe()} was cancelled")
    return f.exception()


def _flush() -> None:
    """Someone looks at a result: make sure no op of an unfinished batch waits unsubmitted."""
    lt = LoopThread.current()
    if lt is not None:
        lt.flush()


class Work(dist.Work):
    """The result of one operation (or of several, for a coalesced batch).

    ``wait()`` blocks until the bytes are where they belong (in the receiver's tensor, for a send
    as for a recv) and raises the operation's error, if any. For CUDA receives it then makes the
    caller's current stream wait for the data; it does not synchronize the device."""

    def __init__(self, ops: Sequence[Op], result: list[torch.Tensor] | None = None) -> None:
        super().__init__()
        self._ops = list(ops)
        self._result = result if result is not None else [op.tensor for op in self._ops
                                                          if op.tensor is not None]
        self._future: torch.futures.Future[list[torch.Tensor]] | None = None
        self._future_lock = threading.Lock()

    # ------------------------------------------------------------------ waiting
    def wait(self, timeout: datetime.timedelta | float | None = None) -> bool:
        """Block until done; raise the operation's error. ``timeout`` (a timedelta or seconds; 0 or
        None: no limit) bounds this wait only: on expiry it raises :class:`OpTimeout` and the operation
        keeps going (the process group's own timeout is what cancels operations)."""
        _flush()
        secs = _seconds(timeout)
        deadline = None if secs is None else time.monotonic() + secs
        for op in self._ops:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                op.future.result(left)
            except concurrent.futures.TimeoutError:
                raise OpTimeout(f"Work.wait() timed out after {secs:g} s: {op.describe()} has not "
                                "completed (it keeps running)") from None
            except concurrent.futures.CancelledError:
                raise BackendError(f"{op.describe()} was cancelled") from None
        self.synchronize()
        if _trace.on:
            _trace.mark("torch:waited")
        return True

    def synchronize(self) -> None:
        """Make the caller's current CUDA stream wait for received data (no-op for CPU tensors)."""
        for op in self._ops:
            err = _outcome(op) if op.future.done() else None
            if err is not None:
                raise err
            ev = op.done_event
            if ev is not None and op.future.done():
                dev = op.device
                assert dev is not None
                idx = dev.index if dev.index is not None else torch.cuda.current_device()
                current_stream(idx).wait_event(ev)

    def block_current_stream(self) -> None:
        """The host must learn of completion before a stream can wait on it: same as ``wait()``."""
        self.wait()

    # ------------------------------------------------------------------ state
    def is_completed(self) -> bool:
        _flush()
        return all(op.future.done() for op in self._ops)

    def is_success(self) -> bool:
        """False once an operation failed (like c10d, True while still running without error)."""
        return all(_outcome(op) is None for op in self._ops if op.future.done())

    def exception(self) -> BaseException | None:
        for op in self._ops:
            if op.future.done():
                err = _outcome(op)
                if err is not None:
                    return err
        return None

    def source_rank(self) -> int:
        """The rank a receive got its message from (-1 while an any-source receive has not matched)."""
        recvs = [op for op in self._ops if op.kind in (RECV, RECV_ANY)]
        if len(recvs) != 1:
            raise RuntimeError("sourceRank() may only be called on work objects that correspond to a "
                               "recv or recv-from-any call.")
        op = recvs[0]
        if op.kind == RECV:
            return op.peer
        f = op.future
        if f.done() and not f.cancelled() and f.exception() is None:
            return f.result()
        return -1

    def _source_rank(self) -> int:
        return self.source_rank()

    def result(self) -> list[torch.Tensor]:
        """The tensors of the operation (the received ones hold the data once ``wait()`` returned)."""
        return self._result

    # ------------------------------------------------------------------ futures
    def get_future(self) -> torch.futures.Future[list[torch.Tensor]]:
        """A ``torch.futures.Future`` completed with ``[tensor]`` (or the error) when the operation is.

        Its callbacks run on aiomooncake's callback thread. For CUDA receives, call ``wait()`` (or make
        your stream wait) before using the data on a stream."""
        _flush()
        with self._future_lock:
            if self._future is None:
                fut: torch.futures.Future[list[torch.Tensor]] = torch.futures.Future()
                self._future = fut
                remaining = [len(self._ops)]
                lock = threading.Lock()

                def one_done(_: concurrent.futures.Future[int]) -> None:
                    with lock:
                        remaining[0] -= 1
                        last = remaining[0] == 0
                    if last:
                        _callback_thread().submit(self._complete_future, fut)

                if not self._ops:
                    fut.set_result(self._result)
                for op in self._ops:
                    op.future.add_done_callback(one_done)
            return self._future

    def _complete_future(self, fut: torch.futures.Future[list[torch.Tensor]]) -> None:
        err = self.exception()
        if err is not None:
            fut.set_exception(err)  # type: ignore[arg-type]  # torch's stub types it as the value
        else:
            fut.set_result(self._result)

    def __repr__(self) -> str:
        state = "done" if self.is_completed() else "pending"
        what = ", ".join(op.describe() for op in self._ops[:3])
        more = f" +{len(self._ops) - 3}" if len(self._ops) > 3 else ""
        return f"<aiomooncake Work {state}: {what}{more}>"


def completed_work(result: list[torch.Tensor] | None = None) -> Work:
    """A Work that is already done (an empty coalesced batch)."""
    return Work([], result or [])


__all__ = ["Work", "completed_work"]
