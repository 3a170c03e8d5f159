"""aiomooncake: asyncio-native, zero-copy tensor send/recv over the Mooncake Transfer Engine.

    listener = await aiomooncake.listen("127.0.0.1", 0)
    peer = await aiomooncake.connect("127.0.0.1", listener.port)
    await peer.send(tensor, tag=1)        # on one side
    await peer.recv(buffer, tag=1)        # on the other
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

from ._version import __version__
from .batch import Batch
from .errors import (
    AiomooncakeError,
    ConfigurationError,
    HandshakeError,
    MessageMismatch,
    PeerClosed,
    ProtocolError,
    Timeout,
    TransferCancelled,
    TransferFailed,
)
from .listener import Listener, connect, listen
from .options import Options
from .peer import Peer, PendingRecv, PendingSend
from .planes import empty_cache, register, unregister

T = TypeVar("T")


def new_event_loop() -> asyncio.AbstractEventLoop:
    """A uvloop loop when uvloop is installed, else asyncio's default."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def run(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run`` on uvloop when it is installed."""
    loop = new_event_loop()
    try:
        asyncio.set_event_loop(loop)
        return loop.run_until_complete(main)
    finally:
        try:
            _cancel_all(loop)
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            asyncio.set_event_loop(None)
            loop.close()


def _cancel_all(loop: asyncio.AbstractEventLoop) -> None:
    """Cancel what is still running (heartbeats of peers left open), as ``asyncio.run`` does."""
    tasks = asyncio.all_tasks(loop)
    for t in tasks:
        t.cancel()
    if tasks:
        loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))


__all__ = [
    "AiomooncakeError",
    "Batch",
    "ConfigurationError",
    "HandshakeError",
    "Listener",
    "MessageMismatch",
    "Options",
    "Peer",
    "PeerClosed",
    "PendingRecv",
    "PendingSend",
    "ProtocolError",
    "Timeout",
    "TransferCancelled",
    "TransferFailed",
    "__version__",
    "connect",
    "empty_cache",
    "listen",
    "new_event_loop",
    "register",
    "run",
    "unregister",
]
