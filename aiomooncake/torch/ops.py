"""One point-to-point operation: the record the caller's thread and the loop thread share.

The caller's thread builds an :class:`Op` (after validating its arguments) and submits it; from then
on only the loop thread touches the loop-side fields. The caller's thread only reads ``future``,
which the loop completes once, with the source rank (or -1) or with a torch-facing exception; by then
``done_event`` is set, so a waiter that saw the future complete also sees the event.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from dataclasses import dataclass, field
from typing import Any, Union

import torch

from aiomooncake import PendingRecv, PendingSend
from aiomooncake.tensors import recycle

# what Peer.post_send / post_recv gave
Posted = Union[PendingSend, PendingRecv]  # noqa: UP007 (a runtime alias)

SEND, RECV, RECV_ANY, BARRIER = "send", "recv", "recv from any source", "barrier"


@dataclass(eq=False)
class Op:
    kind: str
    tag: int
    peer: int  # the destination or source rank; -1 for any-source receives and barriers
    tensor: torch.Tensor | None = None  # what the caller passed (kept alive until the op ends)
    wire: torch.Tensor | None = None  # the flat uint8 view of it that travels
    timeout: float | None = None
    ready_event: Any = None  # torch.cuda.Event recorded on the caller's stream at submission
    future: concurrent.futures.Future[int] = field(default_factory=concurrent.futures.Future)
    done_event: Any = None  # torch.cuda.Event after which the received bytes are in ``tensor``
    # ---- loop-side state
    task: asyncio.Task[int] | None = None
    timer: asyncio.TimerHandle | None = None
    expired: BaseException | None = None
    finished: asyncio.Future[int] | None = None
    posted: Posted | None = None  # a transfer posted on its peer

    def __del__(self) -> None:
        # Nothing can wait on the done event of an op nobody holds: it may be recorded again.
        if self.done_event is not None:
            recycle(self.done_event)

    @property
    def device(self) -> torch.device | None:
        return self.tensor.device if self.tensor is not None else None

    def describe(self) -> str:
        if self.kind == SEND:
            what = f"send to rank {self.peer}"
        elif self.kind == RECV:
            what = f"recv from rank {self.peer}"
        else:
            what = self.kind
        if self.kind != BARRIER:
            what += f" (tag {self.tag}"
            if self.wire is not None:
                what += f", {self.wire.numel()} B"
            what += ")"
        return what


__all__ = ["BARRIER", "RECV", "RECV_ANY", "SEND", "Op", "Posted"]
