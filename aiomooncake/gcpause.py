"""Pausing Python's cyclic garbage collector while a burst of operations is in flight.

Each operation in flight holds a handful of tracked objects (its future, its state, the task
awaiting it). In a burst (an EPLB exchange: hundreds of messages for tens of milliseconds) a young
collection during the burst promotes all of them to the old generation, and enough promotions
trigger a full collection, which scans every tracked object of the process (torch's are many): on
the 2-core VM 60-70 ms once every ~17 batches of 512 operations, on the H100 host 82-87 ms about
every fifth 64-expert batch. Collecting nothing while a burst runs lets those objects die young,
freed by their reference counts, and the full collections mostly stop.

So from the moment ``BURST`` operations are in flight until none is, the collector is disabled,
for at most ``MAX_HOLD_S`` (+ ``CHECK_S``) at a time: a daemon watchdog re-enables it then, whatever
the event loops do (a loop closed with operations pending never completes them), and no new hold
starts until the in-flight count has been back to zero. The watchdog looks every ``CHECK_S`` while
holds happen and exits after 5 s without one. A collector the user disabled stays disabled (no
hold starts); one the user disables during a hold is enabled again when the hold ends.
``AIOMOONCAKE_GC_PAUSE=0`` in the environment (or ``enabled = False``) turns this off.
"""

from __future__ import annotations

import gc
import logging
import os
import threading
import time

log = logging.getLogger(__name__)

BURST = 8  # operations in flight before the collector pauses (a lone round trip never pauses it)
MAX_HOLD_S = 0.25
enabled = os.environ.get("AIOMOONCAKE_GC_PAUSE", "1") != "0"

CHECK_S = 0.05  # how often the watchdog looks while holds happen
_IDLE_CHECKS = 100  # it exits after this many looks without a hold (5 s)

_lock = threading.Lock()
_inflight = 0
_hold: float | None = None  # when the hold in force began (we disabled the collector), else None
_spent = False  # a hold ran out: no new one until nothing is in flight
_watchdog: threading.Thread | None = None
holds = 0  # how many holds started (for tests and benchmarks)


def begin() -> None:
    """One more operation in flight (call :func:`end` once when it is over)."""
    global _inflight, _hold, holds, _watchdog
    with _lock:
        _inflight += 1
        if (_inflight == BURST and _hold is None and not _spent and enabled and gc.isenabled()):
            gc.disable()
            _hold = time.monotonic()
            holds += 1
            if _watchdog is None:  # not woken per hold: a wake-up per burst cost the GIL a handoff
                _watchdog = threading.Thread(target=_watch, name="aiomooncake-gc-watchdog", daemon=True)
                _watchdog.start()


def end(_: object = None) -> None:
    """One operation fewer in flight (takes and ignores a future: usable as a done-callback)."""
    global _inflight, _spent
    with _lock:
        _inflight -= 1
        if _inflight <= 0:
            _inflight = 0
            _spent = False
            _release()


def _release() -> None:
    """End the hold in force, if any (``_lock`` held)."""
    global _hold
    if _hold is not None:
        _hold = None
        gc.enable()


def _watch() -> None:
    """Every ``CHECK_S``, end a hold older than ``MAX_HOLD_S``; exit after a while without holds."""
    global _spent, _watchdog
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
                log.debug("operations in flight for over %.2f s: the garbage collector runs again",
                          MAX_HOLD_S)
                _spent = True
                _release()


def _after_fork_in_child() -> None:
    global _lock, _inflight, _hold, _spent, _watchdog
    held = _hold is not None
    _lock = threading.Lock()
    _inflight, _hold, _spent, _watchdog = 0, None, False, None
    if held:
        gc.enable()  # the child starts with nothing in flight


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


__all__ = ["BURST", "MAX_HOLD_S", "begin", "end"]
