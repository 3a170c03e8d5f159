"""Pausing Python's cyclic garbage collector while a burst of operations is in flight.

Each operation in flight holds a handful of tracked objects (its future, its state, the task
awaiting it). In a burst (an EPLB exchange: hundreds of messages for tens of milliseconds) a young
collection during the burst promotes all of them to the old generation, and enough promotions
trigger a full collection, which scans every tracked object of the process (torch's are many): on
the 2-core VM 60-70 ms once every ~17 batches of 512 operations, on the H100 host 82-87 ms about
every fifth 64-expert batch. Collecting nothing while a burst runs lets those objects die young,
freed by their reference counts, and the full collections mostly stop.

So from the moment ``BURST`` operations are in flight until none is, the collector is disabled,
for at most ``MAX_HOLD_S`` at a time: a daemon watchdog re-enables it then, whatever the event
loops do (a loop closed with operations pending never completes them), and no new hold starts
until the in-flight count has been back to zero. A collector the user disabled stays disabled (no
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

_lock = threading.Lock()
_wake = threading.Condition(_lock)
_inflight = 0
_hold: int | None = None  # the id of the hold in force (we disabled the collector), else None
_next_hold = 0
_spent = False  # a hold ran out: no new one until nothing is in flight
_watchdog: threading.Thread | None = None
holds = 0  # how many holds started (for tests and benchmarks)


def begin() -> None:
    """One more operation in flight (call :func:`end` once when it is over)."""
    global _inflight, _hold, _next_hold, holds
    with _lock:
        _inflight += 1
        if (_inflight == BURST and _hold is None and not _spent and enabled and gc.isenabled()):
            gc.disable()
            _next_hold += 1
            _hold = _next_hold
            holds += 1
            _ensure_watchdog()
            _wake.notify()


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


def _ensure_watchdog() -> None:
    global _watchdog
    if _watchdog is None or not _watchdog.is_alive():
        _watchdog = threading.Thread(target=_watch, name="aiomooncake-gc-watchdog", daemon=True)
        _watchdog.start()


def _watch() -> None:
    """Re-enable the collector when a hold outlasts ``MAX_HOLD_S``."""
    global _spent
    with _lock:
        while True:
            while _hold is None:
                _wake.wait()
            hold, deadline = _hold, time.monotonic() + MAX_HOLD_S
            while _hold == hold and (left := deadline - time.monotonic()) > 0:
                _wake.wait(left)
            if _hold == hold:
                log.debug("operations in flight for over %.2f s: the garbage collector runs again",
                          MAX_HOLD_S)
                _spent = True
                _release()


def _after_fork_in_child() -> None:
    global _lock, _wake, _inflight, _hold, _spent, _watchdog
    held = _hold is not None
    _lock = threading.Lock()
    _wake = threading.Condition(_lock)
    _inflight, _hold, _spent, _watchdog = 0, None, False, None
    if held:
        gc.enable()  # the child starts with nothing in flight


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


__all__ = ["BURST", "MAX_HOLD_S", "begin", "end"]
