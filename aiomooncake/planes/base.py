"""The data-plane seam: what every plane offers the peer, and the copy job it hands back.

A *data plane* moves the bytes of a rendezvous message between two processes: the Transfer Engine
(:mod:`.te`: TCP, RDMA, intra-node NVLink), the same-host CPU plane (:mod:`.shm`: one kernel copy)
and the same-host CUDA plane (:mod:`.cuda_ipc`). The peer drives every plane through this one
interface, so which plane carries a link is decided once, in the handshake (:mod:`.negotiate`, whose
choice is the pure :func:`aiomooncake.core.negotiation.plan_links`), and nothing downstream branches
on it:

* **reach** -- ``kind`` (the transport label both sides put in the plan);
* **exposure** -- :meth:`DataPlane.acquire` makes the allocation behind a tensor reachable by the
  remote (a TE registration, a CUDA IPC export, nothing for the kernel copy) and counts one user;
  :meth:`DataPlane.announce` is what the remote needs to reach it (``epoch``, ``gen``, ``desc``);
* **copies** -- :meth:`DataPlane.target` resolves what the remote announced into something to copy
  to or from; :meth:`DataPlane.write` / :meth:`DataPlane.pull` submit a batch of pieces (every
  piece already checked against the destination the receiver announced, see
  :func:`aiomooncake.core.chunks.plan_copies`) and return a :class:`Job`;
* **completion** -- a job's ``future``; jobs that need polling are driven by the loop's
  :mod:`.poller`, which may hand a burst of them to :meth:`DataPlane.submit_together`;
* **teardown** -- ``attach``/``detach`` per peer, :meth:`DataPlane.trim`, :meth:`DataPlane.unpin`.

Adding a plane is one module implementing :class:`DataPlane` plus one entry in the choice.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

from ..core.regions import Region, RegionCache
from ..errors import TransferFailed
from ..tensors import Allocation, allocation_of, release_allocation

log = logging.getLogger(__name__)

# (local address, remote address, length) for a pull; (local source, remote destination, length)
# for a write. Remote addresses are in the remote process's address space.
Piece = tuple[int, int, int]


@dataclass(frozen=True)
class Stats:
    registrations: int
    unregistrations: int
    cached_regions: int
    writes_submitted: int
    batches_submitted: int = 0  # plane calls that carried several requests at once


@dataclass(slots=True, unsafe_hash=True)
class Announcement:
    """What a remote needs to reach memory we exposed: the plane's registration state (``epoch``
    changes with every registration, ``gen`` with every unregistration; see the TE plane) and a
    plane-specific descriptor (``desc``: a CUDA IPC handle; None elsewhere). Treat it as immutable
    (not ``frozen``: the copier builds one per message, and a frozen one costs 4x to build)."""

    epoch: int = 0
    gen: int = 0
    desc: Any = None


NOTHING = Announcement()


@dataclass(eq=False)
class Job:
    """One batch of copies submitted to a plane. Await ``future`` (or the job), or :meth:`stop` it:
    nothing more is submitted and the future resolves once what is in flight settled."""

    plane: DataPlane
    target: Any
    pieces: list[Piece]
    window: int
    lane: int = -1  # the CUDA device of the local memory (-1: host memory): in-order planes' lanes
    read: bool = False  # a pull (pieces are local destination, remote source)
    future: asyncio.Future[None] = field(init=False)
    next: int = 0  # pieces submitted so far
    error: str | None = None
    stopped: bool = False
    shared: bool = False  # carries the copies of several messages (see DataPlane.copy_all)
    _then: Callable[[], None] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.future = asyncio.get_running_loop().create_future()

    def then(self, fn: Callable[[], None]) -> None:
        """Call ``fn`` as soon as the job settles, from the code that settles it (no loop turn per
        job, as a future's done callback would take): at once if it already has."""
        if self.future.done():
            fn()
        else:
            self._then = fn

    def settle(self, error: str | None = None) -> None:
        """Resolve the job (with ``error``, if any), then run what :meth:`then` registered."""
        if self.future.done():
            return
        if error is not None:
            self.error = self.error or error
            self.future.set_exception(TransferFailed(self.error))
            self.future.exception()  # retrieved: ``then`` reports it
        else:
            self.future.set_result(None)
        fn, self._then = self._then, None
        if fn is not None:
            try:
                fn()
            except Exception:  # the caller's handler must not break whoever settled the job
                log.exception("a copy job's completion handler failed")

    @property
    def batch_key(self) -> tuple[object, ...]:
        """Jobs with one key may be handed to :meth:`DataPlane.submit_together` as one group."""
        return (id(self.target), self.read, self.lane)

    def stop(self) -> None:
        """Submit nothing more; the future resolves once in-flight copies settle. A shared job runs
        to its end: one message giving up must not cut the others' copies (each is bounded by the
        destination its receiver announced, and its receiver waits for the job either way)."""
        if not self.shared:
            self.stopped = True

    def __await__(self):  # type: ignore[no-untyped-def]
        return self.future.__await__()

    def pending(self) -> int:
        """Copies submitted and not yet complete (the poller sees progress when this changes)."""
        return 0

    def step(self) -> bool:
        """Check in-flight copies, submit more; True when the job is finished (the poller's hook)."""
        return self.future.done()


class Joint(Job):
    """Several jobs settled as one (the first error, once every part settled)."""

    def __init__(self, plane: DataPlane, parts: list[Job]) -> None:
        super().__init__(plane, None, [], 0)
        self.shared = True
        self._left = len(parts)
        for part in parts:
            part.then(lambda part=part: self._part_done(part))  # type: ignore[misc]
        if not parts:
            self.settle()

    def _part_done(self, part: Job) -> None:
        self.error = self.error or part.error
        self._left -= 1
        if self._left == 0:
            self.settle(self.error)


class DataPlane:
    """The interface every data plane implements (see the module docstring). Subclasses set
    ``kind`` and ``segment`` and override what differs; the defaults describe a plane that needs no
    registration and no remote descriptors."""

    kind: str = ""
    in_order: bool = False  # copies from one thread complete in submission order per device lane
    exposes: bool = False  # acquire() counts users of regions (else it hands out NO_REGION)
    segment: str = ""  # how the remote addresses this plane (sent in the handshake)

    def __init__(self) -> None:
        self.peers = 0

    @property
    def name(self) -> str:
        """The data path's name, as :attr:`aiomooncake.Peer.data_path` shows it."""
        return self.kind

    # ------------------------------------------------------------ peers
    def attach(self, remote: str = "") -> None:
        """A peer linked to the remote plane ``remote`` through this plane."""
        self.peers += 1

    def detach(self, remote: str = "") -> None:
        """A peer closed (its copies settled); when none is left a plane may drop what it cached."""
        self.peers = max(0, self.peers - 1)

    # ---------------------------------------------------------- exposure
    def acquire(self, t: torch.Tensor, pin: bool = False) -> Region:
        """Make the allocation holding ``t`` reachable by remotes; count one user (``pin``: a user
        registration, :func:`aiomooncake.register`). :meth:`release` when the transfer is over."""
        return NO_REGION

    def release(self, r: Region, pin: bool = False) -> None:
        """One user of ``r`` is done."""

    def retain(self, r: Region) -> bool:
        """One more user of ``r``, which :meth:`acquire` handed out (the tensors of a burst that
        share one allocation look it up once: see ``peer.burst``); False, counting nothing, if the
        plane dropped it meanwhile (then :meth:`acquire` again)."""
        return True

    def prepare_local(self, t: torch.Tensor) -> Region:
        """Make ``t``'s memory usable by this process's own copies (the source of a write, the
        destination of a pull); :meth:`release` it after. Planes whose remote copies need nothing of
        it (CUDA IPC) skip the exposure :meth:`acquire` would make."""
        return self.acquire(t)

    def announce(self, r: Region) -> Announcement:
        """What the remote needs to reach memory in ``r`` (sent with the CTS or the pull offer)."""
        return NOTHING

    def unpin(self, t: torch.Tensor) -> None:
        """Drop one user registration of the allocation holding ``t`` (if any)."""

    def trim(self, cpu_only: bool = False) -> int:
        """Drop cached exposures nothing uses (``cpu_only``: host memory only); return how many."""
        return 0

    # ------------------------------------------------------------- copies
    def target(self, segment: str, announced: Announcement) -> Any:
        """Resolve what the remote behind ``segment`` announced into a copy target."""
        return segment

    def write(self, target: Any, pieces: Sequence[Piece], window: int, lane: int = -1) -> Job:
        """Copy each ``(local source, remote destination, length)`` piece to the remote."""
        raise NotImplementedError

    def pull(self, target: Any, pieces: Sequence[Piece], window: int, lane: int = -1) -> Job:
        """Copy each ``(local destination, remote source, length)`` piece from the remote."""
        raise NotImplementedError

    def gathers(self, nbytes: int) -> bool:
        """Whether a message of ``nbytes`` should share a job with the rest of its burst (then
        :meth:`route` and :meth:`copy_all`) rather than go alone (:meth:`write`, :meth:`pull`)."""
        return False

    def route(self, target: Any, pieces: Sequence[Piece], read: bool) -> list[Any]:
        """The pieces of one message (a pull if ``read``) checked against the remote memory they
        address and put in the form :meth:`copy_all` takes; raises TransferFailed for a piece
        outside it (that message alone then fails or falls back)."""
        raise NotImplementedError

    def copy_all(self, routed: list[Any], lane: int = -1) -> Job:
        """One shared job for the routed pieces of a burst of messages (pulls and writes mixed):
        one submission and one completion instead of a job, a future and a status check each."""
        raise NotImplementedError

    def submit_together(self, jobs: list[Job]) -> bool:
        """Submit the next copies of several held jobs (same plane, target, direction and lane) in
        one call; False if nothing was submitted (the poller then steps each job alone)."""
        return False

    async def refresh_remote(self, segment: str) -> bool:
        """Forget what is cached about the remote behind ``segment`` (a restarted process took its
        name); False if that could not be done."""
        return True

    def stats(self) -> Stats:
        return Stats(0, 0, 0, 0)


NO_REGION = Region(0, 0, None)  # what a plane without registrations hands out


class Exposures:
    """What a plane exposed (TE registrations, CUDA IPC exports), one region per *allocation*, never
    per tensor (the engine refuses overlapping registrations, and exposing costs milliseconds), each
    counted by its users: transfers in flight (``inflight``) and user registrations (``pinned``).
    The planes' :meth:`DataPlane.acquire`, :meth:`~DataPlane.release` and :meth:`~DataPlane.unpin`;
    the plane's own ``expose`` makes a region on first use, under :attr:`lock`."""

    __slots__ = ("lock", "regions")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.regions = RegionCache()

    def hold(self, alloc: Allocation, pin: bool, expose: Callable[[Allocation], Region]) -> Region:
        """The region of ``alloc`` (exposed now if it is not yet), with one more user."""
        with self.lock:
            r = self.regions.find(alloc.base, alloc.size, alloc.ident)
            if r is not None:
                release_allocation(alloc)
            else:
                r = expose(alloc)
            if pin:
                r.pinned += 1
            else:
                r.inflight += 1
            return r

    def retain(self, r: Region) -> bool:
        """One more transfer uses ``r``, if it is still cached (False: it was dropped meanwhile)."""
        with self.lock:
            if not self.regions.holds(r):
                return False
            r.inflight += 1
            return True

    def release(self, r: Region, pin: bool = False) -> None:
        """One user of ``r`` is done."""
        with self.lock:
            if pin:
                r.pinned -= 1
            else:
                r.inflight -= 1

    def unpin(self, t: torch.Tensor) -> None:
        """Drop one user registration of the allocation holding ``t`` (if it has one)."""
        alloc = allocation_of(t)
        with self.lock:
            r = self.regions.find(alloc.base, alloc.size, alloc.ident)
            release_allocation(alloc)
            if r is not None and r.pinned:
                r.pinned -= 1

# ------------------------------------------------------------------ the process's planes
_instances: dict[str, DataPlane] = {}
_lock = threading.Lock()
P = TypeVar("P", bound=DataPlane)


def instance(kind: str, factory: Callable[[], P]) -> P:
    """The process-wide plane for ``kind``, created by ``factory`` on first use (under a lock)."""
    with _lock:
        inst = _instances.get(kind)
        if inst is None:
            inst = _instances[kind] = factory()
            for t in list(_pinned.values()):
                inst.acquire(t, pin=True)
        return inst  # type: ignore[return-value]


def get(kind: str) -> DataPlane | None:
    """The process's plane for ``kind`` if it was started."""
    return _instances.get(kind)


def existing() -> list[DataPlane]:
    """Every plane this process started (for statistics, pinning and cache trimming)."""
    return list(_instances.values())


def forget(kind: str) -> None:
    """Drop the plane for ``kind`` from the registry (a forked child's copy of its parent's)."""
    with _lock:
        _instances.pop(kind, None)


_pinned: dict[int, torch.Tensor] = {}


def register(t: torch.Tensor) -> None:
    """Register ``t``'s memory with every plane now and later, and keep it registered until
    :func:`unregister`: sends and receives from it then never pay for registration."""
    if id(t) in _pinned:
        return
    _pinned[id(t)] = t
    for p in existing():
        p.acquire(t, pin=True)


def unregister(t: torch.Tensor) -> None:
    if _pinned.pop(id(t), None) is None:
        return
    for p in existing():
        p.unpin(t)


