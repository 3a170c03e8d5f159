"""``Peer.batch()``: many sends and receives on one peer, posted together and awaited together.

What ``batch_isend_irecv`` is to torch, for asyncio callers (the EPLB expert exchange)::

    async with peer.batch() as b:
        for i, t in enumerate(outgoing):
            b.send(t, tag=i)
        for i, t in enumerate(incoming):
            b.recv(t, tag=i)
    # every operation has completed here

Each call posts its operation at once, in call order, exactly as the matching ``send``/``recv``
would (same tags, same order, same completion guarantees), but without a coroutine and a task per
operation; and the control frames that the calls of one loop turn produce leave together, in one
write, so the other side handles the whole batch in one read (a message above 32 MiB is announced
at once: its copy outlasts parsing the rest). Leaving the block waits for all of
them. Structured like a ``TaskGroup``: the first failure, a ``timeout``, an exception in the block
or a cancellation withdraws every operation still pending, waits until none of them can touch its
tensor any more, and then raises.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from types import TracebackType
from typing import Any, Protocol

import torch

from .errors import ConfigurationError, Timeout


class Posted(Protocol):
    """A posted operation (:class:`aiomooncake.PendingSend` / :class:`aiomooncake.PendingRecv`)."""

    @property
    def future(self) -> asyncio.Future[Any]: ...

    def withdraw(self) -> None: ...

    async def cancel(self) -> None: ...


class Poster(Protocol):
    """What a batch needs of its peer: the public posting calls (a :class:`aiomooncake.Peer`)."""

    @property
    def address(self) -> str: ...

    def post_send(self, tensor: torch.Tensor, tag: int = 0, *, burst: bool = False,
                  on_end: Callable[[Any], object] | None = None) -> Posted: ...

    def post_recv(self, tensor: torch.Tensor, tag: int = 0, *, burst: bool = False,
                  on_end: Callable[[Any], object] | None = None) -> Posted: ...

    def post_recv_tensor(self, tag: int = 0, device: torch.device | str | None = None, *,
                         burst: bool = False, on_end: Callable[[Any], object] | None = None) -> Posted: ...


class Batch:
    """Operations on one :class:`~aiomooncake.Peer`; get one with :meth:`Peer.batch`."""

    __slots__ = ("_done", "_failed", "_left", "_peer", "_recvs", "_sends", "_timeout", "_wake")

    def __init__(self, peer: Poster, timeout: float | None = None) -> None:
        self._peer = peer
        self._timeout = timeout
        self._sends: list[Posted] = []
        self._recvs: list[Posted] = []
        self._done = False
        # Counted by the peer's on_end calls, not by a callback per future: each of those costs a
        # loop-turn hop (~2 us an operation on the 2-core VM, 512 of them per EPLB exchange).
        # Operations posted and not over. One may end before its post returns: the count then dips
        # below its due for that moment, while nothing waits on it (wait() closes the batch first).
        self._left = 0
        self._failed: asyncio.Future[Any] | None = None  # the first that failed (or was cancelled)
        self._wake: asyncio.Future[None] | None = None  # wait() sleeps on it

    def send(self, tensor: torch.Tensor, tag: int = 0) -> asyncio.Future[None]:
        """Post a send of ``tensor`` now; the future completes once its bytes are in the
        receiver's tensor (as :meth:`Peer.send` returns)."""
        self._check_open()
        return self._counted(self._sends, self._peer.post_send(tensor, tag, burst=True, on_end=self._ended))

    def recv(self, tensor: torch.Tensor, tag: int = 0) -> asyncio.Future[torch.Tensor]:
        """Post a receive into ``tensor`` now (as :meth:`Peer.recv`); the future gives ``tensor``."""
        self._check_open()
        return self._counted(self._recvs, self._peer.post_recv(tensor, tag, burst=True, on_end=self._ended))

    def recv_tensor(self, tag: int = 0,
                    device: torch.device | str | None = None) -> asyncio.Future[torch.Tensor]:
        """Post a receive into a new tensor of the sender's shape and dtype (as
        :meth:`Peer.recv_tensor`); the future gives that tensor."""
        self._check_open()
        return self._counted(self._recvs,
                             self._peer.post_recv_tensor(tag, device, burst=True, on_end=self._ended))

    def _counted(self, into: list[Posted], posted: Posted) -> asyncio.Future[Any]:
        """Keep a posted operation and count it as not over until its ``_ended``."""
        self._left += 1
        into.append(posted)
        return posted.future

    def _ended(self, posted: Posted) -> None:
        """The peer's word that one of our operations is over (on the loop, once each)."""
        self._left -= 1
        fut = posted.future
        if self._failed is None and (fut.cancelled() or fut.exception() is not None):
            self._failed = fut
        wake = self._wake
        if wake is not None and (self._left == 0 or self._failed is not None) and not wake.done():
            wake.set_result(None)

    def __len__(self) -> int:
        return len(self._sends) + len(self._recvs)

    def _check_open(self) -> None:
        if self._done:
            raise ConfigurationError("this batch has ended: post new operations in a new peer.batch()")

    # ------------------------------------------------------------------ waiting
    async def __aenter__(self) -> Batch:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        if exc_type is not None:
            await self._abandon()
            return
        await self.wait()

    async def wait(self) -> None:
        """Wait for every operation posted so far (what leaving the ``async with`` block does)."""
        self._done = True
        try:
            if self._left and self._failed is None:
                wake = self._wake = asyncio.get_running_loop().create_future()
                if self._timeout is None:
                    await wake
                else:
                    await asyncio.wait_for(wake, self._timeout)
            failed = self._failed
            if failed is not None:
                if failed.cancelled():
                    raise asyncio.CancelledError()
                exc = failed.exception()
                assert exc is not None
                raise exc
        except asyncio.TimeoutError:
            await self._abandon()
            raise Timeout(f"a batch of {len(self)} operations with {self._peer.address} did not finish "
                          f"within {self._timeout:g} s; the unfinished ones were withdrawn") from None
        except BaseException:
            await self._abandon()
            raise
        finally:
            self._wake = None

    async def _abandon(self) -> None:
        """Withdraw every operation still pending; return once none can touch its tensor."""
        self._done = True
        for s in self._sends:
            if not s.future.done() or s.future.cancelled():
                s.future.cancel()
                s.withdraw()
        pending = []
        for r in self._recvs:
            if not r.future.done() or r.future.cancelled():
                r.future.cancel()
                pending.append(r.cancel())
        if pending:
            # shielded: the withdrawals go on even if this wait is cancelled again
            await asyncio.shield(asyncio.gather(*pending, return_exceptions=True))


__all__ = ["Batch"]
