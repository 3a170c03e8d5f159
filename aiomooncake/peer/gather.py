"""Copies gathered per loop turn, so that a burst of messages costs its plane one job.

A plane that ``gathers`` a message's size (:meth:`aiomooncake.planes.base.DataPlane.gathers`: the
CUDA IPC plane up to ``tuning.HOLD_BYTES``) takes the copies of many messages as one shared job
(:meth:`~aiomooncake.planes.base.DataPlane.copy_all`): one submission, one event, one completion,
where a job, a future and a status check per message cost the copier ~half its host time in a
64-expert EPLB exchange. The peer queues each message's checked pieces here (:meth:`Gather.add`);
they go to the plane at the end of the loop turn, or as soon as ``tuning.MAX_GROUP`` messages are
queued for one plane and device, so the head of a long burst copies while the rest is parsed.
What was withdrawn, stopped or failed in the meantime is left out (a write that was stopped is
settled as cancelled); the peer settles the group's messages when the shared job settles.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Union

from .. import _trace, tuning
from ..core.session import RecvOp, RecvState, SendOp, SendState
from ..errors import TransferCancelled
from ..planes.base import DataPlane, Job
from .pending import PendingRecv, PendingSend


@dataclass(slots=True)
class PullCopy:
    """A receive pulling the source its sender offered."""

    op: RecvOp
    p: PendingRecv

    def live(self) -> bool:
        return self.op.state is RecvState.MATCHED


@dataclass(slots=True)
class WriteCopy:
    """A send writing into the destination its receiver announced (``region``: our source's
    exposure, released once the copy settled; ``pieces``: how many were planned)."""

    op: SendOp
    p: PendingSend
    region: Any
    pieces: int

    def live(self) -> bool:
        return not self.p.stop and self.op.state is SendState.WRITING


Copy = Union[PullCopy, WriteCopy]  # noqa: UP007 (a runtime alias)
# (the shared job or None if it could not start, its plane, its messages, the error that stopped it)
Settle = Callable[[Union[Job, None], DataPlane, list[Copy], Union[BaseException, None]], None]  # noqa: UP007


class Gather:
    """One peer's copies queued in this loop turn, per plane and device (see the module docstring).
    The shared jobs it starts join the peer's ``jobs`` in flight until they settle; ``settle`` ends
    a group's messages (with the job, or None and the error that kept it from starting)."""

    __slots__ = ("_due", "_groups", "_jobs", "_loop", "_settle")

    def __init__(self, loop: asyncio.AbstractEventLoop, jobs: set[Job], settle: Settle) -> None:
        self._loop = loop
        self._jobs = jobs
        self._settle = settle
        self._groups: dict[tuple[DataPlane, int], list[tuple[list[Any], Copy]]] = {}
        self._due = False

    def __bool__(self) -> bool:
        return bool(self._groups)

    def add(self, plane: DataPlane, lane: int, routed: list[Any], copy: Copy) -> None:
        """Queue one message's pieces, routed by ``plane`` (checked against what the remote
        announced), for the end of this loop turn."""
        group = self._groups.get((plane, lane))
        if group is None:
            group = self._groups[(plane, lane)] = []
            if not self._due:
                self._due = True
                self._loop.call_soon(self.start)
        group.append((routed, copy))
        if len(group) >= tuning.MAX_GROUP:  # a long burst: its head starts copying now
            self.start()

    def start(self) -> None:
        """Hand every queued group to its plane now (one shared job each)."""
        self._due = False
        groups, self._groups = self._groups, {}
        for (plane, lane), group in groups.items():
            routed: list[Any] = []
            copies: list[Copy] = []
            for pieces, c in group:
                if c.live():
                    routed += pieces
                    copies.append(c)
                elif isinstance(c, WriteCopy):  # stopped while queued: nothing was written
                    self._settle(None, plane, [c], TransferCancelled("cancelled before any byte was written"))
                # (a receive withdrawn while queued was failed and released by its withdrawal)
            if not copies:
                continue
            if _trace.on:
                _trace.mark("copy:submit")
            try:
                job = plane.copy_all(routed, lane)
            except Exception as e:
                self._settle(None, plane, copies, e)
                continue
            for c in copies:
                if isinstance(c, PullCopy):
                    c.p.pull = job
                else:
                    c.p.job = job
            self._jobs.add(job)
            job.then(functools.partial(self._done, job, plane, copies))

    def _done(self, job: Job, plane: DataPlane, copies: list[Copy]) -> None:
        if _trace.on:
            _trace.mark("copy:done")
        self._jobs.discard(job)
        self._settle(job, plane, copies, None)
