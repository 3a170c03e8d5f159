"""Busy-polling of the event loop for a short window after activity.

On virtual machines, waking a process that sleeps in epoll costs tens of microseconds per hop (an
inter-processor interrupt and an idle-state exit); a small message's round trip pays it twice. While
an operation is pending and traffic is flowing, we keep the loop turning (``sleep(0)``: the loop
polls its sockets without blocking) for ``window`` seconds after the last activity, then let it
sleep. An idle process therefore burns nothing; a busy one trades a little CPU for latency.
"""

from __future__ import annotations

import asyncio
import os
import time
import weakref
from typing import ClassVar

from .. import tuning


class BusyPoller:
    _by_loop: ClassVar[weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, BusyPoller]] = (
        weakref.WeakKeyDictionary())

    def __init__(self, loop: asyncio.AbstractEventLoop, window: float) -> None:
        self._loop = loop
        self.window = window
        self._deadline = 0.0
        self._task: asyncio.Task[None] | None = None

    @classmethod
    def for_loop(cls, window: float) -> BusyPoller | None:
        if window <= 0:
            return None
        loop = asyncio.get_running_loop()
        bp = cls._by_loop.get(loop)
        if bp is None:
            bp = cls._by_loop[loop] = cls(loop, window)
        else:
            bp.window = max(bp.window, window)
        return bp

    def kick(self) -> None:
        """Activity happened: keep the loop hot for another window."""
        self._hold(self.window)

    def expect(self, seconds: float) -> None:
        """A frame is due within about ``seconds`` (a DONE after the remote's GPU write): keep the
        loop hot until then, at most ``tuning.BUSY_EXPECT_MAX_S``, so it need not wake from sleep
        when it comes (on the lent H100's VM a frame reached a loop idle for a few ms 80-200 us
        after it left, one in a tight ping-pong 13-22 us)."""
        self._hold(max(self.window, min(seconds, tuning.BUSY_EXPECT_MAX_S)))

    def _hold(self, seconds: float) -> None:
        """Spin for at least ``seconds`` from now (never cutting short a longer hold)."""
        deadline = time.perf_counter() + seconds
        if deadline > self._deadline:
            self._deadline = deadline
        if self._task is None:
            self._task = self._loop.create_task(self._spin())

    def stop(self) -> None:
        """Stop spinning now (the spinner exits at its next turn)."""
        self._deadline = 0.0

    async def _spin(self) -> None:
        try:
            clock = time.perf_counter
            yield_cpu = os.sched_yield
            while clock() < self._deadline:
                # Give the core away if anything else wants it (the peer may share our core):
                # spinning must never starve the process we are waiting for.
                yield_cpu()
                await asyncio.sleep(0)
        finally:
            self._task = None
