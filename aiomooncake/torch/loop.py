"""The one background event-loop thread per process that runs aiomooncake's async core for torch.

torch calls ``isend``/``irecv``/``wait`` from ordinary (often several) threads; the async core lives on
an event loop. One daemon thread per process owns that loop (uvloop when installed) so every process
group and facade shares one set of engine pollers and sockets. Callers hand work over with
:meth:`LoopThread.submit` (fire and forget, FIFO, never blocks: what ``isend`` needs) or
:meth:`LoopThread.run` (block until a coroutine finishes: what set-up and shutdown need).

The thread starts with the first user and stops when the last one releases it, and at interpreter
exit, so ``destroy_process_group()`` leaves no thread behind. A forked child drops the parent's
instance (its thread did not survive the fork) and starts its own when needed.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextlib
import logging
import os
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Coroutine
from typing import Any, Protocol, TypeVar

import aiomooncake
from aiomooncake import tuning

log = logging.getLogger(__name__)

T = TypeVar("T")

_STOP_TIMEOUT = 10.0
# The burst wait (tuning.TORCH_BURST_GAP_S, TORCH_BURST_MAX_S): woken with a batch already arriving
# (3+ ops queued), the loop thread waits (GIL released) while the caller still adds to it, so the
# ops of one batch_isend_irecv cross in one go instead of the two threads taking turns at the GIL
# per op. Measured on the H100 host (16 cores), on against off in the same processes, seven paired
# rounds in five launches through batch_isend_irecv: 16 x 100 MB ahead in 6 of 7 (medians 425
# against 337 GB/s), a 2 x 32-tensor exchange ahead in 6 of 7 (medians 16.9 against 17.5 ms). On a
# 2-core machine the four threads of two ranks compete for cores instead (64 x 7 KB batches 4.0-4.3
# against 3.6-3.75 ms), so it is off there.


class Closable(Protocol):
    """Something that must be shut down before the loop stops at interpreter exit."""

    def shutdown(self) -> None: ...


class LoopThread:
    """A running event loop on its own daemon thread. Get it with :meth:`acquire`; give it back with
    :meth:`release` (the loop stops when nobody holds it)."""

    _lock = threading.Lock()
    _instance: LoopThread | None = None

    def __init__(self) -> None:
        self._users = 0
        self._queue: deque[tuple[Callable[..., Any], tuple[Any, ...]]] = deque()
        self._qlock = threading.Lock()
        self._wake_pending = False
        self._started = threading.Event()
        self.loop: asyncio.AbstractEventLoop = aiomooncake.new_event_loop()
        self._thread = threading.Thread(target=self._main, name="aiomooncake-loop", daemon=True)
        self._thread.start()
        self._started.wait()

    # ------------------------------------------------------------ lifetime
    @classmethod
    def acquire(cls) -> LoopThread:
        """The process's loop thread (started if needed), counted as one more user."""
        with cls._lock:
            inst = cls._instance
            if inst is None or not inst._thread.is_alive():
                inst = cls._instance = LoopThread()
            inst._users += 1
            return inst

    def release(self) -> None:
        """One user fewer; the last one stops the loop and joins the thread."""
        with LoopThread._lock:
            self._users -= 1
            if self._users > 0:
                return
            if LoopThread._instance is self:
                LoopThread._instance = None
        self._stop()

    @classmethod
    def current(cls) -> LoopThread | None:
        return cls._instance

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.call_soon(self._started.set)
        try:
            self.loop.run_forever()
        finally:
            try:
                self._cancel_all()
                self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            except Exception:  # the loop is going away; nothing the user can act on
                log.debug("error while closing the aiomooncake loop", exc_info=True)
            finally:
                asyncio.set_event_loop(None)
                self.loop.close()

    def _cancel_all(self) -> None:
        tasks = [t for t in asyncio.all_tasks(self.loop) if not t.done()]
        for t in tasks:
            t.cancel()
        if tasks:
            self.loop.run_until_complete(asyncio.wait(tasks, timeout=_STOP_TIMEOUT))

    def _stop(self) -> None:
        if not self._thread.is_alive():
            return
        if threading.current_thread() is self._thread:
            self.loop.stop()  # joining ourselves is impossible; the thread ends after this callback
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(_STOP_TIMEOUT + 5.0)
        if self._thread.is_alive():
            log.warning("the aiomooncake loop thread did not stop within %.0f s", _STOP_TIMEOUT + 5.0)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self.loop.is_closed()

    def in_loop_thread(self) -> bool:
        return threading.current_thread() is self._thread

    # ----------------------------------------------------------- handing over
    def submit(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn(*args)`` on the loop thread soon, after everything submitted before it.

        Never blocks. Submissions arriving while the loop has not yet drained the previous ones share
        one wake-up, so a burst of ``isend``/``irecv`` costs one write to the loop's self-pipe."""
        with self._qlock:
            self._queue.append((fn, args))
            if self._wake_pending:
                return
            self._wake_pending = True
        self._wake()

    def submit_later(self, fn: Callable[..., Any], *args: Any) -> None:
        """Queue ``fn(*args)`` like :meth:`submit` but without waking the loop: the caller knows more
        submissions follow at once (the rest of a ``batch_isend_irecv``), and the last of them, or
        :meth:`flush`, wakes it. Meanwhile the loop thread sleeps with the GIL released instead of
        taking turns at it with the caller for every operation."""
        with self._qlock:
            self._queue.append((fn, args))

    def flush(self) -> None:
        """Wake the loop for submissions :meth:`submit_later` left queued, if any."""
        with self._qlock:
            if not self._queue or self._wake_pending:
                return
            self._wake_pending = True
        with contextlib.suppress(RuntimeError):  # closed: what was queued is dropped by _wake
            self._wake()

    def _wake(self) -> None:
        """Schedule a drain (the caller set ``_wake_pending``)."""
        try:
            self.loop.call_soon_threadsafe(self._drain)
        except RuntimeError:  # the loop is closed: run nothing, but say so
            with self._qlock:
                self._queue.clear()
                self._wake_pending = False
            raise

    def _drain(self) -> None:
        if tuning.TORCH_BURST_GAP_S > 0 and len(self._queue) >= 3:
            self._await_burst()
        while True:
            with self._qlock:
                if not self._queue:
                    self._wake_pending = False
                    return
                items = list(self._queue)
                self._queue.clear()
            for fn, args in items:
                try:
                    fn(*args)
                except Exception:  # a bug in a submitted callable must not kill the loop
                    log.exception("callable submitted to the aiomooncake loop failed")

    def _await_burst(self) -> None:
        """Let a caller that is posting a batch finish it: sleep while the queue keeps growing."""
        deadline = time.perf_counter() + tuning.TORCH_BURST_MAX_S
        seen = len(self._queue)
        while time.perf_counter() < deadline:
            time.sleep(tuning.TORCH_BURST_GAP_S)
            now = len(self._queue)
            if now == seen:
                return
            seen = now

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run ``coro`` on the loop and block the calling thread until it finishes.

        ``timeout`` cancels it (raising ``TimeoutError``). Calling this from the loop thread itself
        would deadlock, so that raises ``RuntimeError``."""
        if self.in_loop_thread():
            coro.close()
            raise RuntimeError("LoopThread.run() was called on the loop thread; await the coroutine instead")
        fut = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return fut.result(timeout)
        except concurrent.futures.TimeoutError:
            fut.cancel()
            raise TimeoutError(f"the operation did not finish within {timeout:g} s") from None


# ------------------------------------------------------------------ exit and fork
_closables: weakref.WeakSet[Any] = weakref.WeakSet()


def register_closable(obj: Closable) -> None:
    """Shut ``obj`` down at interpreter exit if the user did not (e.g. no destroy_process_group())."""
    _closables.add(obj)


def unregister_closable(obj: Closable) -> None:
    _closables.discard(obj)


def _at_exit() -> None:
    for obj in list(_closables):
        try:
            obj.shutdown()
        except Exception:
            log.debug("shutdown at exit failed", exc_info=True)
    inst = LoopThread._instance
    if inst is not None:
        LoopThread._instance = None
        inst._stop()


def _after_fork_in_child() -> None:
    # The parent's loop thread does not exist in the child; its queue and locks are meaningless here.
    LoopThread._lock = threading.Lock()
    LoopThread._instance = None
    _closables.clear()


atexit.register(_at_exit)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


__all__ = ["LoopThread", "register_closable", "unregister_closable"]
