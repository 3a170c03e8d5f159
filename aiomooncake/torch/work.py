"""``Work``: the handle ``isend``/``irecv``/``barrier`` return, a ``torch.distributed.Work`` subclass.

It is a thin view over its operations' records (:class:`~aiomooncake.torch.ops.Op`). ``wait()``
makes the waiting thread run the event loop until they are done (see :mod:`aiomooncake.torch.loop`):
no thread hands the completion over. Completion callbacks of :meth:`Work.get_future` run on a
separate callback thread, never on a thread that runs the loop: a callback that waits for another
operation must not stall the loop that would complete it.
"""

from __future__ import annotations

import concurrent.futures
import datetime
import threading
import time
from collections.abc import Callable

import torch
import torch.distributed as dist

from .. import _trace
from ..tensors import current_stream
from .errors import BackendError, OpTimeout
from .loop import LoopThread, LoopUnusable
from .ops import RECV, RECV_ANY, Op

_callbacks: concurrent.futures.ThreadPoolExecutor | None = None
_callbacks_lock = threading.Lock()
_future_lock = threading.Lock()  # get_future() makes one future per Work (rare: one lock for all)


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


class Work(dist.Work):
    """The result of one operation (or of several, for a coalesced batch).

    ``wait()`` blocks until the bytes are where they belong (in the receiver's tensor, for a send
    as for a recv) and raises the operation's error, if any. For CUDA receives it then makes the
    caller's current stream wait for the data; it does not synchronize the device."""

    def __init__(self, ops: list[Op], result: list[torch.Tensor] | None = None,
                 loop: LoopThread | None = None) -> None:
        super().__init__()
        self._ops = ops
        self._loop = loop
        self._result = result if result is not None else [op.tensor for op in ops if op.tensor is not None]
        self._future: torch.futures.Future[list[torch.Tensor]] | None = None

    # ------------------------------------------------------------------ waiting
    def wait(self, timeout: datetime.timedelta | float | None = None) -> bool:
        """Block until done; raise the operation's error. ``timeout`` (a timedelta or seconds; 0 or
        None: no limit) bounds this wait only: on expiry it raises :class:`OpTimeout` and the operation
        keeps going (the process group's own timeout is what cancels operations)."""
        ops = self._ops
        for op in ops:
            if not op.done:
                secs = _seconds(timeout)
                self._block(None if secs is None else time.monotonic() + secs, secs)
                break
        for op in ops:
            if op.error is not None:
                raise op.error
            if op.done_event is not None:
                self.synchronize()
                break
        if _trace.on:
            _trace.mark("torch:waited")
        return True

    def _block(self, deadline: float | None, secs: float | None) -> None:
        loop = self._loop
        assert loop is not None
        ops = self._ops
        left = [0]  # ops before this index are done: each turn looks only from there

        def done() -> bool:
            i = left[0]
            while i < len(ops):
                if not ops[i].is_done():
                    left[0] = i
                    return False
                i += 1
            left[0] = i
            return True

        try:
            finished = loop.wait_for(ops[0].is_done if len(ops) == 1 else done, deadline)
        except LoopUnusable as e:
            raise BackendError(f"{ops[left[0]].describe()} cannot complete: {e}") from e
        if not finished:
            raise OpTimeout(f"Work.wait() timed out after {secs:g} s: {ops[left[0]].describe()} has "
                            "not completed (it keeps running)")

    def synchronize(self) -> None:
        """Make the caller's current CUDA stream wait for received data (no-op for CPU tensors)."""
        for op in self._ops:
            if not op.done:
                continue
            if op.error is not None:
                raise op.error
            ev = op.done_event
            if ev is not None:
                dev = op.device
                assert dev is not None
                idx = dev.index if dev.index is not None else torch.cuda.current_device()
                current_stream(idx).wait_event(ev)

    def block_current_stream(self) -> None:
        """The host must learn of completion before a stream can wait on it: same as ``wait()``."""
        self.wait()

    # ------------------------------------------------------------------ state
    def is_completed(self) -> bool:
        if all(op.done for op in self._ops):
            return True
        if self._loop is not None:
            self._loop.poll()  # a turn here if nobody runs the loop: progress for polling callers
        return all(op.done for op in self._ops)

    def is_success(self) -> bool:
        """False once an operation failed (like c10d, True while still running without error)."""
        return all(op.error is None for op in self._ops if op.done)

    def exception(self) -> BaseException | None:
        for op in self._ops:
            if op.done and op.error is not None:
                return op.error
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
        if op.done and op.error is None:
            return op.result
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
        with _future_lock:
            if self._future is None:
                fut: torch.futures.Future[list[torch.Tensor]] = torch.futures.Future()
                self._future = fut
                self._when_done(lambda: _callback_thread().submit(self._complete_future, fut))
            return self._future

    def _when_done(self, fn: Callable[[], object]) -> None:
        """Call ``fn()`` (on whichever thread completes the last op, lock held) once every op is
        done: one call per Work, however many ops it has."""
        ops = self._ops
        loop = self._loop
        if loop is None or not ops:
            fn()
            return
        remaining = [len(ops)]

        def one_done(_: Op) -> None:
            remaining[0] -= 1  # under the lock, like every completion
            if remaining[0] == 0:
                fn()

        with loop.lock:
            for op in ops:
                op.add_callback(one_done)

    def _complete_future(self, fut: torch.futures.Future[list[torch.Tensor]]) -> None:
        err = self.exception()
        if err is not None:
            fut.set_exception(err)  # type: ignore[arg-type]  # torch's stub types it as the value
        else:
            fut.set_result(self._result)

    def __repr__(self) -> str:
        state = "done" if all(op.done for op in self._ops) else "pending"
        what = ", ".join(op.describe() for op in self._ops[:3])
        more = f" +{len(self._ops) - 3}" if len(self._ops) > 3 else ""
        return f"<aiomooncake Work {state}: {what}{more}>"


def completed_work(result: list[torch.Tensor] | None = None) -> Work:
    """A Work that is already done (an empty coalesced batch)."""
    return Work([], result or [])


__all__ = ["Work", "completed_work"]
