"""Posted operations: the handles :meth:`Peer.post_send` and :meth:`Peer.post_recv` return.

One object per operation is both the caller's handle (await it, :meth:`~PendingSend.withdraw` it,
``await`` its :meth:`~PendingSend.cancel`) and the peer's record of it (its tensor, the plane's
job, the registration it holds), with one future from posting to completion. ``Peer.send`` and
``Peer.recv`` are a post and an await; :class:`~aiomooncake.Batch` and the torch backend post many
and wait for them together.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Generator
from typing import Any, Protocol

import torch

from ..core.regions import Region
from ..core.session import RecvOp, SendOp
from ..options import Options
from ..planes.base import DataPlane, Job
from ..tensors import ReadyMark


class Owner(Protocol):
    """The peer an operation was posted on, as its handle sees it (:class:`aiomooncake.Peer`)."""

    options: Options

    def _withdraw_send(self, p: PendingSend) -> None: ...

    def _withdraw_recv(self, p: PendingRecv) -> None: ...

    async def _cancel_recv(self, p: PendingRecv) -> None: ...


class PendingSend:
    """A posted send: awaiting it returns once its bytes are in the receiver's tensor (or raises)."""

    __slots__ = ("future", "held", "job", "on_end", "op", "peer", "ready", "retries", "src", "stop")

    def __init__(self, peer: Owner, future: asyncio.Future[None], src: torch.Tensor,
                 ready: ReadyMark | None, held: tuple[DataPlane, Region] | None,
                 on_end: Callable[[PendingSend], object] | None = None) -> None:
        self.peer = peer
        self.on_end = on_end  # called once, on the loop, when the operation is over (see Peer.post_send)
        self.future = future
        self.src = src  # what the plane reads (a contiguous tensor, or its host copy)
        self.ready = ready  # the caller's stream mark the copy must wait for (CUDA)
        self.held = held  # our source's exposure, offered for the remote to pull
        self.op: SendOp | None = None  # set right after posting; None again once it is over
        self.job: Job | None = None
        self.stop = False
        self.retries = 0

    def __await__(self) -> Generator[Any, None, None]:
        return self.future.__await__()

    def done(self) -> bool:
        return self.future.done()

    def withdraw(self) -> None:
        """Give up on the send now (no await): abort it, or stop its copies (idempotent). Awaiting
        it then raises (unless it completed first)."""
        self.peer._withdraw_send(self)

    async def cancel(self) -> None:
        """Withdraw it and return once no copy of its source is in flight any more."""
        self.peer._withdraw_send(self)
        job = self.job
        if job is not None:
            await asyncio.wait([job.future], timeout=self.peer.options.cancel_timeout)


class PendingRecv:
    """A posted receive: awaiting it gives the filled tensor (or raises)."""

    __slots__ = ("dest", "device", "device_work", "future", "on_end", "op", "peer", "pull", "ready",
                 "region", "released", "stream", "withdrawn", "work")

    def __init__(self, peer: Owner, future: asyncio.Future[torch.Tensor], dest: torch.Tensor | None,
                 device: torch.device | None, ready: ReadyMark | None, stream: Any,
                 on_end: Callable[[PendingRecv], object] | None = None) -> None:
        self.peer = peer
        self.on_end = on_end  # called once, on the loop, when the operation is over (see Peer.post_recv)
        self.future = future
        self.dest = dest  # what the caller gave (None for recv_tensor)
        self.device = device  # recv_tensor's requested device
        self.ready = ready  # the caller's stream mark the copy must wait for (CUDA)
        self.stream = stream  # the caller's current CUDA stream at post time
        self.op: RecvOp | None = None  # set right after posting; None again once it is over
        self.work: torch.Tensor | None = None  # the contiguous tensor the bytes land in
        self.device_work: torch.Tensor | None = None  # the CUDA destination of a host-staged receive
        self.region: tuple[DataPlane, Region] | None = None
        self.released: asyncio.Future[None] | None = None
        self.pull: Job | None = None  # a pull into ``work`` still copying
        self.withdrawn = False

    def __await__(self) -> Generator[Any, None, torch.Tensor]:
        return self.wait().__await__()

    def done(self) -> bool:
        return self.future.done()

    async def wait(self) -> torch.Tensor:
        """The filled tensor. Cancelled while waiting, the receive is withdrawn and this returns
        (raising CancelledError) only once no byte can land in its buffer any more."""
        try:
            return await self.future
        except asyncio.CancelledError:
            await self.peer._cancel_recv(self)
            raise

    def withdraw(self) -> None:
        """Withdraw the receive now (no await): a message not matched yet goes to the next receive;
        one being written is asked to stop. :meth:`cancel` also waits until the buffer is safe."""
        self.peer._withdraw_recv(self)

    async def cancel(self) -> None:
        """Withdraw the receive; return once no byte can land in its buffer any more."""
        await self.peer._cancel_recv(self)
