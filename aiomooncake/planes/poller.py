"""Completion by polling: one :class:`Poller` per event loop drives every copy job that needs it.

The Transfer Engine reports completion by polling only, and a CUDA event is polled the same way,
so a poller per loop steps each in-flight job (a non-blocking status check, topping up its window)
and yields: no OS thread per operation, no loop blocking beyond one status call. It spins (yielding
the loop and ``sched_yield``-ing the core) while copies progress, backs off to sleeps of up to
``tuning.POLL_MAX_SLEEP`` once nothing moved for ``tuning.POLL_SPIN_S``, and exits when nothing is
in flight, so an idle process costs nothing.

Planes whose copies complete in submission order per device (``DataPlane.in_order``: the NVLink
transport and CUDA streams) keep their jobs in lanes, oldest first, and a round steps only each
lane's oldest job: one status check per round for a burst of hundreds of copies in flight.

While a peer handles the frames of one socket read it :meth:`Poller.hold`\\ s submissions: the
copies those frames start are then handed to their plane together (``DataPlane.submit_together``),
in groups of at most ``tuning.MAX_GROUP``; a copy over ``tuning.HOLD_BYTES`` goes at once.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import weakref
from collections import deque
from typing import ClassVar

from .. import _trace, tuning
from .base import Job

log = logging.getLogger(__name__)


class Poller:
    """Drives the polled copy jobs of one event loop (see the module docstring)."""

    _by_loop: ClassVar[weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Poller]] = (
        weakref.WeakKeyDictionary())

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.jobs: list[Job] = []  # jobs of planes that complete out of order
        self.lanes: dict[tuple[int, int], deque[Job]] = {}  # in-order planes: (plane, lane) -> jobs
        self.task: asyncio.Task[None] | None = None
        self.holds = 0
        self.held: list[Job] = []

    @classmethod
    def for_loop(cls) -> Poller:
        loop = asyncio.get_running_loop()
        p = cls._by_loop.get(loop)
        if p is None:
            p = cls._by_loop[loop] = cls(loop)
        return p

    def hold(self) -> None:
        """Until the matching :meth:`release`, keep new jobs of in-order planes back, to submit them
        together (a peer holds while it handles the frames of one socket read)."""
        self.holds += 1

    def release(self) -> None:
        self.holds -= 1
        if not self.holds and self.held:
            self._submit_held()

    def add(self, job: Job) -> None:
        """Start driving ``job`` (its first copies are submitted now, or with its burst)."""
        if (self.holds and job.plane.in_order and job.pieces
                and job.pieces[0][2] <= tuning.HOLD_BYTES):
            self.held.append(job)
            if len(self.held) >= tuning.MAX_GROUP:
                self._submit_held()
            return
        _safe_step(job)  # submit the first window right away
        self.watch(job)

    def watch(self, job: Job) -> None:
        """Drive ``job`` (its first copies submitted already) until it completes."""
        if job.future.done():
            return
        if job.plane.in_order:
            key = (id(job.plane), job.lane)
            lane = self.lanes.get(key)
            if lane is None:
                lane = self.lanes[key] = deque()
            lane.append(job)
        else:
            self.jobs.append(job)
        if self.task is None or self.task.done():
            self.task = self.loop.create_task(self._run())

    def _submit_held(self) -> None:
        held, self.held = self.held, []
        groups: dict[tuple[object, ...], list[Job]] = {}
        for j in held:
            groups.setdefault((id(j.plane), *j.batch_key), []).append(j)
        for js in groups.values():
            together = len(js) > 1 and _safe_submit_together(js)
            for j in js:
                if not (together and j.pending()):  # alone, or nothing to submit (stopped): settle
                    _safe_step(j)
                self.watch(j)

    async def _run(self) -> None:
        last_progress = time.perf_counter()
        delay = 0.0
        while self.jobs or self.lanes:
            if _trace.on:
                _trace.mark("poll:round")
            progressed = self._round()
            now = time.perf_counter()
            if progressed:
                last_progress = now
                delay = 0.0
            if not (self.jobs or self.lanes):
                break
            if now - last_progress < tuning.POLL_SPIN_S:
                os.sched_yield()  # let the planes' own threads run if they share our core
                await asyncio.sleep(0)
            else:
                delay = min(tuning.POLL_MAX_SLEEP, delay * 2 if delay else 0.00005)
                await asyncio.sleep(delay)

    def _round(self) -> bool:
        """Step the jobs that can have moved; True if any submitted, completed or finished. On an
        in-order plane a lane whose oldest job is still pending holds only younger, also pending
        work: only its oldest job is stepped."""
        progressed = False
        for key in list(self.lanes):
            lane = self.lanes[key]
            while lane:
                finished, moved = _advance(lane[0])
                progressed = progressed or moved
                if not finished:
                    break
                lane.popleft()
            if not lane:
                del self.lanes[key]
        if self.jobs:
            left: list[Job] = []
            current, self.jobs = self.jobs, []  # completion handlers may add jobs meanwhile
            for j in current:
                finished, moved = _advance(j)
                progressed = progressed or moved
                if not finished:
                    left.append(j)
            self.jobs = left + self.jobs
        return progressed


def poller() -> Poller:
    """The running loop's poller (to :meth:`~Poller.hold` submissions over a burst of frames)."""
    return Poller.for_loop()


def _advance(job: Job) -> tuple[bool, bool]:
    """Step ``job``: whether it finished, and whether it moved (finished, submitted or completed)."""
    before = (job.next, job.pending())
    if _safe_step(job):
        return True, True
    return False, (job.next, job.pending()) != before


def _safe_submit_together(jobs: list[Job]) -> bool:
    try:
        return jobs[0].plane.submit_together(jobs)
    except Exception:  # the jobs then try alone, each reporting its own error
        log.exception("submitting a batch of %d jobs failed", len(jobs))
        return False


def _safe_step(job: Job) -> bool:
    try:
        return job.step()
    except Exception as e:  # never let one job kill the poller
        log.exception("copy job failed")
        job.settle(f"data plane error: {e}")
        return True
