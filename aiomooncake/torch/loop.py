"""The event loop that runs aiomooncake's async core for torch, and the threads that drive it.

torch calls ``isend``/``irecv``/``wait`` from ordinary (often several) threads; the async core lives on
one asyncio event loop per process, shared by every process group and facade. Handing each call
to a loop thread and each completion back costs a thread hand-off (a futex or pipe wake-up and a
GIL transfer, 30-90 us on a VM), and a round trip had four of them on its critical path. So here
the loop is not owned by one thread: whichever thread holds :attr:`LoopThread.lock` (the core
lock) may run the core, and the threads that wait run the loop themselves:

* ``isend``/``irecv`` post their operation on the calling thread, under the lock (:meth:`submit`):
  the control frame is written to the socket before the call returns, with no wake-up. The posts of
  one ``batch_isend_irecv`` are held and leave together after its last op (:meth:`submit_later`).
* ``Work.wait()`` makes the waiting thread the loop's *foreground driver* (:meth:`wait_for`): it
  runs the loop's turns itself, polling for up to ``WAITER_SPIN_S``, then sleeping in the loop's own
  ``epoll`` with the lock released, until its operation is done, so the completion needs no
  wake-up either. One thread drives at a time;
  other waiters sleep on a condition until their op completes or the driver leaves.
* The *background* thread (``aiomooncake-loop``) runs the loop when nobody waits, so transfers
  progress while the callers compute. It steps aside while a foreground driver runs and for
  ``BACKGROUND_GRACE_S`` after the last one left (the next ``wait()`` usually follows at once), so
  the two do not take turns at the GIL and at the sockets for every operation.

The loop is asyncio's selector loop, with a selector that releases the lock for a blocking poll
(other threads may post meanwhile) and reads what became ready afresh under the lock. It uses four
of asyncio's private loop members (``_run_once``, ``_ready``, ``_scheduled``, ``_write_to_self``),
as ``nest_asyncio`` does; tests/test_torch_loop.py fails if a Python release changes them. (uvloop
cannot be turned from several threads, so the torch layer does without it.)

The thread starts with the first user and stops when the last one releases it, and at interpreter
exit, so ``destroy_process_group()`` leaves no thread behind. A forked child drops the parent's
instance (its thread did not survive the fork) and starts its own when needed; a group made before
the fork raises in the child instead of hanging on a lock some parent thread held.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextlib
import logging
import math
import os
import selectors
import threading
import time
import weakref
from collections.abc import Callable, Coroutine
from typing import Any, Protocol, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")

_STOP_TIMEOUT = 10.0
# The background thread steps aside while a waiter drives the loop and for BACKGROUND_GRACE_S after
# the last one left (a batch's next wait, a ping-pong's next call, follow within microseconds). It
# is never woken per operation: every time it wakes it needs the GIL, and the caller then waits for
# it after its next system call (a socket write, the poll); on the 2-core VM a notify at every
# wait's end made the 8 B round trip ~1.5x slower. While a driver runs it looks again every
# PARKED_CHECK_S, so what a caller leaves in flight when it stops waiting progresses within that.
BACKGROUND_GRACE_S = 0.001
PARKED_CHECK_S = 0.005
# A waiter polls without sleeping this long before it sleeps in the poll (yielding the core and the
# lock between looks): the reply to a small message comes within tens of microseconds, and waking
# a sleeping thread costs about as much again on a VM. The background thread never spins: it would
# take the GIL from a computing caller.
WAITER_SPIN_S = 0.0005

_fork_generation = 0  # bumped in a forked child: instances made before the fork are unusable there


class Closable(Protocol):
    """Something that must be shut down before the loop stops at interpreter exit."""

    def shutdown(self) -> None: ...


class LoopUnusable(RuntimeError):
    """The loop was stopped, or belongs to the parent of this forked process."""


def _noop() -> None:
    pass


class _Selector(selectors.DefaultSelector):
    """The loop's selector. A blocking poll runs without the core lock, so other threads can post
    meanwhile; its result is only a hint: what is ready is read again under the lock, so two
    threads that woke for the same readiness never handle it twice."""

    def __init__(self, owner: LoopThread) -> None:
        super().__init__()
        self._owner = owner

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        if timeout is not None and timeout <= 0:
            return super().select(0)
        return self._owner._blocking_select(self, timeout)

    def wait(self, timeout: float | None) -> None:
        """Sleep until something is ready or ``timeout`` passes (lock not held)."""
        super().select(timeout)

    def ready_now(self) -> list[tuple[selectors.SelectorKey, int]]:
        return super().select(0)


class _Loop(asyncio.SelectorEventLoop):
    """asyncio's selector loop, turned one iteration at a time by whichever thread holds the lock."""

    def __init__(self, owner: LoopThread) -> None:
        super().__init__(_Selector(owner))

    def turn(self) -> None:
        """One loop iteration: poll (blocking only if nothing is ready), run what is due."""
        self._run_once()  # type: ignore[attr-defined]

    def busy(self) -> bool:
        """Whether callbacks are waiting for a turn."""
        return bool(self._ready)  # type: ignore[attr-defined]

    def next_timer(self) -> float:
        """When the earliest timer is due (loop time), ``inf`` if none."""
        sched = self._scheduled  # type: ignore[attr-defined]
        return float(sched[0]._when) if sched else math.inf

    def wake(self) -> None:
        """Interrupt a thread blocked in this loop's poll (a write to its self-pipe)."""
        self._write_to_self()  # type: ignore[attr-defined]

    def _check_thread(self) -> None:
        # asyncio's debug mode insists that one thread calls call_soon & co.; here any thread that
        # holds the core lock may, which is what makes it safe.
        pass


class LoopThread:
    """The process's aiomooncake event loop, its core lock and its background thread. Get it with
    :meth:`acquire`; give it back with :meth:`release` (the thread stops when nobody holds it)."""

    _lock = threading.Lock()
    _instance: LoopThread | None = None

    def __init__(self) -> None:
        self._users = 0
        self.lock = threading.Lock()  # held by whichever thread runs the core (see the module doc)
        self._bg_cv = threading.Condition(self.lock)  # the background thread steps aside on it
        self._fg_cv = threading.Condition(self.lock)  # waiters that are not driving sleep on it
        self._driver: int | None = None  # the thread ident of the foreground driver
        self._fg_waiting = 0  # threads asleep on _fg_cv
        self._left_at = 0.0  # when the last foreground driver left (monotonic)
        self._polling = 0  # threads blocked in the loop's poll
        self._poll_until = math.inf  # the earliest end of those polls (loop time)
        self._stopping = False
        self._fork_generation = _fork_generation
        self._bg_ident = -1
        self._started = threading.Event()
        self.loop = _Loop(self)
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
        self._bg_ident = threading.get_ident()
        asyncio.set_event_loop(self.loop)
        with self.lock:
            self._started.set()
            asyncio._set_running_loop(self.loop)
            try:
                while not self._stopping:
                    self.loop.turn()
            except BaseException:  # a bug in the core: say so, then fail whoever waits
                log.exception("the aiomooncake loop failed")
                self._stopping = True
            finally:
                asyncio._set_running_loop(None)
                try:
                    self._cancel_all()
                    self.loop.run_until_complete(self.loop.shutdown_asyncgens())
                except Exception:  # the loop is going away; nothing the user can act on
                    log.debug("error while closing the aiomooncake loop", exc_info=True)
                finally:
                    asyncio.set_event_loop(None)
                    self.loop.close()
                    self._fg_cv.notify_all()

    def _cancel_all(self) -> None:
        tasks = [t for t in asyncio.all_tasks(self.loop) if not t.done()]
        for t in tasks:
            t.cancel()
        if tasks:
            self.loop.run_until_complete(asyncio.wait(tasks, timeout=_STOP_TIMEOUT))

    def _stop(self) -> None:
        if not self._thread.is_alive():
            return
        if self.in_loop_thread():
            self._stopping = True  # joining ourselves is impossible; the thread ends after this turn
            return
        with self.lock:
            self._stopping = True
            self._bg_cv.notify_all()
            with contextlib.suppress(Exception):
                self.loop.wake()
        self._thread.join(_STOP_TIMEOUT + 5.0)
        if self._thread.is_alive():
            log.warning("the aiomooncake loop thread did not stop within %.0f s", _STOP_TIMEOUT + 5.0)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self.loop.is_closed() and not self._stopping

    def in_loop_thread(self) -> bool:
        """Whether the calling thread is running the loop now (the background thread, or a waiter
        driving it)."""
        me = threading.get_ident()
        return me == self._bg_ident or me == self._driver

    def _check_usable(self) -> None:
        if self._fork_generation != _fork_generation:
            raise LoopUnusable("this aiomooncake group was made before the process forked; make a new "
                               "one in the child")
        if self._stopping:  # set before the loop closes
            raise LoopUnusable("the aiomooncake loop has stopped")

    # --------------------------------------------------------------- posting
    def submit(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn(*args)`` on the calling thread under the core lock (posting an operation writes
        its frames at once), then let the loop act on whatever it scheduled: run that turn here, or
        wake the thread polling the loop. Never blocks beyond the lock, which the loop releases
        while it polls."""
        self._check_usable()
        loop = self.loop
        with self.lock:
            prev = asyncio._get_running_loop()
            asyncio._set_running_loop(loop)
            try:
                ready = loop._ready  # type: ignore[attr-defined]
                before = len(ready)
                fn(*args)
                added = len(ready) > before
                if added or self._polling:
                    self._kick(added)
            finally:
                asyncio._set_running_loop(prev)

    def submit_later(self, fn: Callable[..., Any], *args: Any) -> None:
        """Like :meth:`submit`, without the loop turn: the caller knows more posts follow at once (the
        rest of a ``batch_isend_irecv``), whose frames then leave together after the last one's
        :meth:`submit` (or a :meth:`flush`)."""
        self._check_usable()
        with self.lock:
            prev = asyncio._get_running_loop()
            asyncio._set_running_loop(self.loop)
            try:
                fn(*args)
            finally:
                asyncio._set_running_loop(prev)
                self._left_at = time.monotonic()  # the background thread keeps out of the burst

    def flush(self) -> None:
        """Let the loop act on what :meth:`submit_later` left (held frames leave)."""
        if self._fork_generation != _fork_generation or self.loop.is_closed():
            return
        with self.lock:
            prev = asyncio._get_running_loop()
            asyncio._set_running_loop(self.loop)
            try:
                self._kick(True)
            finally:
                asyncio._set_running_loop(prev)

    def _kick(self, added: bool) -> None:
        """After the calling thread scheduled callbacks or timers (lock held): callbacks that are
        due run now, on this thread if nobody drives the loop in the foreground, else on that
        driver (woken through the self-pipe); a timer due before a sleeping poller wakes makes it
        wake. (Callbacks left from earlier turns, e.g. handles' done-callbacks of operations their
        waiter finished, do not need a turn of their own: whoever drives next runs them.)"""
        loop = self.loop
        if loop.is_closed():
            return
        driver = self._driver
        if added and loop.busy():
            if driver is None:
                self._turn_here()
                if loop.busy():
                    loop.wake()  # what that turn scheduled: the poller's next turn runs it
                elif self._polling and loop.next_timer() < self._poll_until:
                    loop.wake()
            elif driver != threading.get_ident():
                loop.wake()  # the driver runs them (it would not notice them in its poll)
        elif self._polling and loop.next_timer() < self._poll_until:
            loop.wake()

    def completed_elsewhere(self) -> None:
        """An operation completed on a thread other than the foreground driver (lock held): wake the
        driver, whose poll would not notice, and the waiters asleep on the condition."""
        driver = self._driver
        if driver is not None and driver != threading.get_ident():
            self.loop.wake()
        if self._fg_waiting:
            self._fg_cv.notify_all()

    # --------------------------------------------------------------- waiting
    def wait_for(self, done: Callable[[], bool], deadline: float | None = None) -> bool:
        """Block the calling thread until ``done()`` (evaluated under the lock) is true; False if
        ``deadline`` (monotonic) passes first. The caller drives the loop while it waits, unless
        another thread does; then it sleeps until that one completes something or leaves."""
        self._check_usable()
        me = threading.get_ident()
        if me == self._bg_ident or me == self._driver:
            raise RuntimeError("an aiomooncake operation was waited for from inside the loop; "
                               "wait from another thread, or use Work.get_future()")
        with self.lock:
            while not done():
                if self._stopping or self.loop.is_closed():
                    raise LoopUnusable("the aiomooncake loop has stopped")
                if self._driver is None:
                    return self._drive(done, deadline)
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._fg_waiting += 1
                try:
                    self._fg_cv.wait(left)
                finally:
                    self._fg_waiting -= 1
            return True

    def _drive(self, done: Callable[[], bool], deadline: float | None) -> bool:
        """Run the loop on this thread until ``done()`` or ``deadline`` (lock held)."""
        loop = self.loop
        self._driver = threading.get_ident()
        prev = asyncio._get_running_loop()
        asyncio._set_running_loop(loop)
        alarm = loop.call_at(deadline, _noop) if deadline is not None else None  # bounds the poll
        try:
            while not done():
                if deadline is not None and time.monotonic() >= deadline:
                    return False
                if self._stopping or loop.is_closed():
                    raise LoopUnusable("the aiomooncake loop has stopped")
                loop.turn()
            return True
        finally:
            if alarm is not None:
                alarm.cancel()
            asyncio._set_running_loop(prev)
            self._driver = None
            self._left_at = time.monotonic()
            if self._fg_waiting:
                self._fg_cv.notify_all()  # one of them may need to drive now

    def poll(self) -> None:
        """Give the loop one non-blocking turn on this thread if nobody else is running it (for
        ``is_completed()`` in a polling loop); return at once otherwise."""
        if self._fork_generation != _fork_generation or self.in_loop_thread():
            return
        if not self.lock.acquire(blocking=False):
            return
        try:
            if self._driver is not None or self.loop.is_closed():
                return
            prev = asyncio._get_running_loop()
            asyncio._set_running_loop(self.loop)
            try:
                self.loop.call_soon(_noop)  # makes the turn's poll non-blocking
                self._turn_here()
            finally:
                asyncio._set_running_loop(prev)
        finally:
            self.lock.release()

    def _turn_here(self) -> None:
        """One non-blocking turn on the calling thread, which counts as the loop's driver meanwhile
        (lock held, callbacks due): what completes there wakes nobody, and a wait from inside a
        callback is refused instead of deadlocking on the lock."""
        self._driver = threading.get_ident()
        try:
            self.loop.turn()
        finally:
            self._driver = None

    def _blocking_select(self, sel: _Selector, timeout: float | None
                         ) -> list[tuple[selectors.SelectorKey, int]]:
        """The loop's poll found nothing due (lock held). The background thread steps aside while
        a foreground driver runs (and shortly after); the poll itself runs without the lock."""
        background = threading.get_ident() == self._bg_ident
        if background:
            if self._step_aside():
                return []  # the timeout is stale now: the loop's next turn computes a new one
        elif WAITER_SPIN_S > 0:
            spin = WAITER_SPIN_S if timeout is None else min(timeout, WAITER_SPIN_S)
            end = time.monotonic() + spin
            while True:
                events = sel.ready_now()
                if events:
                    return events
                if time.monotonic() >= end:
                    break
                self.lock.release()
                try:
                    os.sched_yield()  # without the GIL: a thread that wants to post gets in
                finally:
                    self._reacquire()
                if self.loop.busy():
                    return []  # a post scheduled callbacks: run them
            if timeout is not None:
                timeout = max(0.0, timeout - spin)
        until = math.inf if timeout is None else self.loop.time() + timeout
        prev_until = self._poll_until
        self._poll_until = min(prev_until, until)
        self._polling += 1
        self.lock.release()
        try:
            sel.wait(timeout)
        finally:
            self._reacquire()
            self._polling -= 1
            self._poll_until = prev_until if self._polling else math.inf
        if background and self._step_aside():
            return []  # a foreground driver started meanwhile: what is ready is its to handle
        return sel.ready_now()

    def _reacquire(self) -> None:
        """Take the lock back after a poll, even if a signal handler raises meanwhile (Ctrl-C in a
        main thread that waits): the lock must be held when the exception leaves the turn."""
        interrupted: BaseException | None = None
        while True:
            try:
                self.lock.acquire()
                break
            except BaseException as e:  # a signal handler raised: retry, raise it afterwards
                interrupted = e
        if interrupted is not None:
            raise interrupted

    def _step_aside(self) -> bool:
        """Background thread, lock held: wait while a foreground driver runs and for the grace
        period after it left (see BACKGROUND_GRACE_S). Returns whether it waited."""
        waited = False
        while not self._stopping:
            if self._driver is not None:
                self._bg_cv.wait(PARKED_CHECK_S)
            else:
                left = self._left_at + BACKGROUND_GRACE_S - time.monotonic()
                if left <= 0:
                    break
                self._bg_cv.wait(left)
            waited = True
        return waited

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run ``coro`` on the loop and block the calling thread (which drives the loop meanwhile)
        until it finishes. ``timeout`` cancels it (raising ``TimeoutError``). Calling this from
        inside the loop would deadlock, so that raises ``RuntimeError``."""
        if self.in_loop_thread():
            coro.close()
            raise RuntimeError("LoopThread.run() was called on the loop thread; await the coroutine instead")
        try:
            self._check_usable()
        except BaseException:
            coro.close()
            raise
        fut = asyncio.run_coroutine_threadsafe(coro, self.loop)
        deadline = None if timeout is None else time.monotonic() + timeout
        if not self.wait_for(fut.done, deadline):
            fut.cancel()
            raise TimeoutError(f"the operation did not finish within {timeout:g} s")
        try:
            return fut.result(0)
        except concurrent.futures.CancelledError:
            raise TimeoutError("the operation was cancelled") from None


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
    # The parent's threads do not exist in the child, and its locks may be held by them forever.
    global _fork_generation
    _fork_generation += 1
    LoopThread._lock = threading.Lock()
    LoopThread._instance = None
    _closables.clear()


atexit.register(_at_exit)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


__all__ = ["LoopThread", "LoopUnusable", "register_closable", "unregister_closable"]
