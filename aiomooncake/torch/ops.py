"""One point-to-point operation: the record the calling threads and the loop share.

The caller's thread builds an :class:`Op` (after validating its arguments) and posts it under the
loop's core lock; whoever runs the loop (a waiting thread, or the background thread) completes it
there, once, setting ``done`` after ``error``/``result``. A waiter reads ``done`` under the lock;
the other fields are final once it is set.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, Union

import torch

from aiomooncake import PendingRecv, PendingSend
from aiomooncake.tensors import recycle

# what Peer.post_send / post_recv gave
Posted = Union[PendingSend, PendingRecv]  # noqa: UP007 (a runtime alias)

SEND, RECV, RECV_ANY, BARRIER = "send", "recv", "recv from any source", "barrier"


class Op:
    """A send, receive or barrier, from its post to its completion."""

    __slots__ = ("burst", "callbacks", "deadline", "done", "done_event", "error", "expired", "finished",
                 "kind", "mesh", "peer", "posted", "ready_event", "result", "tag", "task", "tensor",
                 "timeout", "wire")

    def __init__(self, kind: str, tag: int, peer: int, tensor: torch.Tensor | None = None,
                 wire: torch.Tensor | None = None, timeout: float | None = None,
                 ready_event: Any = None, burst: bool = False) -> None:
        self.kind = kind
        self.tag = tag
        self.peer = peer  # the destination or source rank; -1 for any-source receives and barriers
        self.tensor = tensor  # what the caller passed (kept alive until the op ends)
        self.wire = wire  # the uint8 view of it that travels (its bytes; the shape is the view's)
        self.timeout = timeout  # the group's timeout when it was posted
        self.ready_event = ready_event  # CUDA: marks the caller's stream at submission (a pooled event)
        self.burst = burst  # more posts of its batch follow: its frames may wait for them
        # ---- the outcome (set once, under the lock, by Mesh._finish)
        self.done = False
        self.error: BaseException | None = None
        self.result = -1  # the source rank of a receive, else -1
        self.done_event: Any = None  # CUDA: after it, the received bytes are in ``tensor``
        self.callbacks: list[Callable[[Op], None]] | None = None  # run by _finish (lock held)
        # ---- loop-side state
        self.deadline = 0.0  # loop time after which the group's timeout cancels it
        self.task: asyncio.Task[int] | None = None
        self.expired: BaseException | None = None
        self.finished: asyncio.Future[int] | None = None  # only for the barrier's own messages
        self.posted: Posted | None = None  # a transfer posted on its peer

    def __del__(self) -> None:
        # Nothing can wait on the done event of an op nobody holds: it may be recorded again.
        if self.done_event is not None:
            recycle(self.done_event)

    def is_done(self) -> bool:
        """Whether it completed (lock held). A transfer completes as the peer ends it (its
        ``on_end``), on whichever thread runs the loop then."""
        return self.done

    def add_callback(self, fn: Callable[[Op], None]) -> None:
        """Run ``fn(op)`` when it completes, at once if it has (lock held)."""
        if self.done:
            fn(self)
        elif self.callbacks is None:
            self.callbacks = [fn]
        else:
            self.callbacks.append(fn)

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
