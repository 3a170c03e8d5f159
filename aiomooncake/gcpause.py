"""Pausing Python's cyclic garbage collector while bursts of operations are in flight.

Each operation in flight holds a handful of tracked objects (its future, its state, the task
awaiting it). In a burst (an EPLB exchange: hundreds of messages for tens of milliseconds) a young
collection during the burst promotes all of them to the old generation, and enough promotions
trigger a full collection, which scans every tracked object of the process (torch's are many): on
the 2-core VM 60-70 ms once every ~17 bursts of 512 operations through the async core, every ~4
through torch; on the H100 host 82-87 ms about every fifth 64-expert batch. Collecting nothing
while bursts run lets those objects die young, freed by their reference counts, and the full
collections stop.

So from the moment ``BURST`` operations are in flight until ``GRACE_S`` after none is, the
collector is disabled (a loop of bursts stays under one hold: the next burst's tasks are made
before its first operation is posted). A hold lasts at most ``MAX_HOLD_S`` (+ ``CHECK_S``): a
daemon watchdog then re-enables the collector, whatever the event loops do (a loop closed with
operations pending never completes them), and no new hold starts before ``GAP_S`` has passed and
the in-flight count has been back to zero. The watchdog looks every ``CHECK_S`` while holds
happen and exits after 5 s without one. Between holds the collector runs as usual. Objects made
and freed during a hold leave the young generation's count where it was, so a collection follows
a hold at once when more of what was made during it is still alive (cyclic garbage included) than
the young generation's threshold. A collector the user disabled stays disabled (no hold starts);
one the user disables during a hold is enabled again when the hold ends.
``AIOMOONCAKE_GC_PAUSE=0`` in the environment (or ``enabled = False``) turns this off.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import threading
import time

log = logging.getLogger(__name__)

BURST = 8  # operations in flight before the collector pauses (a lone round trip never pauses it)
MAX_HOLD_S = 0.25
enabled = os.environ.get("AIOMOONCAKE_GC_PAUSE", "1") != "0"

GRACE_S = 0.002  # a hold outlives the burst by this much (see end())
GAP_S = 0.01  # after a hold that ran out, the collector runs at least this long before the next
CHECK_S = 0.05  # how often the watchdog looks while holds happen
_IDLE_CHECKS = 100  # it exits after this many looks without a hold (5 s)

_lock = threading.Lock()
_inflight = 0
_hold: float | None = None  # when the hold in force began (we disabled the collector), else None
_spent = False  # a hold ran out: no new one until nothing is in flight
_resume_at = 0.0  # ... nor before this time (monotonic)
_watchdog: threading.Thread | None = None
holds = 0  # how many holds started (for tests and benchmarks)
ran_out = 0  # how many holds the watchdog ended


def begin() -> None:
    """One more operation in flight (call :func:`end` once when it is over)."""
    global _inflight, _hold, holds, _watchdog
    with _lock:
        _inflight += 1
        if (_inflight == BURST and _hold is None and not _spent and enabled and gc.isenabled()
                and time.monotonic() >= _resume_at):
            gc.disable()
            _hold = time.monotonic()
            holds += 1
            if _watchdog is None:  # not woken per hold: a wake-up per burst cost the GIL a handoff
                _watchdog = threading.Thread(target=_watch, name="aiomooncake-gc-watchdog", daemon=True)
                _watchdog.start()


def end() -> None:
    """One operation fewer in flight (the peer calls it as each operation ends: no future callback,
    which would cost a loop-turn hop per operation).

    When none is left, the hold ends ``GRACE_S`` later (at once outside an event loop): the next
    burst of a loop of bursts usually starts within it (its tasks are made before the first
    operation is posted), and a collection there would promote them all."""
    global _inflight, _spent
    with _lock:
        _inflight -= 1
        if _inflight > 0:
            return
        _inflight = 0
        _spent = False
        if _hold is None:
            return
        try:
            asyncio.get_running_loop().call_later(GRACE_S, _release_if_idle)
        except RuntimeError:
            _release()


def _release_if_idle() -> None:
    with _lock:
        if _inflight == 0:
            _release()


def _release() -> None:
    """End the hold in force, if any (``_lock`` held)."""
    global _hold
    if _hold is not None:
        _hold = None
        gc.enable()


def _watch() -> None:
    """Every ``CHECK_S``, end a hold older than ``MAX_HOLD_S``; exit after a while without holds."""
    global _spent, _watchdog, _resume_at, ran_out
    idle = 0
    while True:
        time.sleep(CHECK_S)
        with _lock:
            if _hold is None:
                idle += 1
                if idle >= _IDLE_CHECKS:
                    _watchdog = None  # begin() starts a new one with the next hold
                    return
                continue
            idle = 0
            if time.monotonic() - _hold > MAX_HOLD_S:
                log.debug("bursts for over %.2f s: the garbage collector runs again", MAX_HOLD_S)
                _spent = _inflight > 0  # no new hold until that burst is over,
                _resume_at = time.monotonic() + GAP_S  # and young collections get a chance to run
                ran_out += 1
                _release()


def _after_fork_in_child() -> None:
    global _lock, _inflight, _hold, _spent, _watchdog, _resume_at
    held = _hold is not None
    _lock = threading.Lock()
    _inflight, _hold, _spent, _watchdog, _resume_at = 0, None, False, None, 0.0
    if held:
        gc.enable()  # the child starts with nothing in flight


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


__all__ = ["BURST", "MAX_HOLD_S", "begin", "end"]
