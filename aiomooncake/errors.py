"""The typed exception hierarchy.

Every error the library raises derives from :class:`AiomooncakeError`, so callers can catch one type.
Messages say what happened and what to do about it.
"""

from __future__ import annotations

import asyncio


class AiomooncakeError(Exception):
    """Root of every error raised by aiomooncake."""


class ConfigurationError(AiomooncakeError, ValueError):
    """An option or argument is invalid, or the environment lacks something the option needs."""


class HandshakeError(AiomooncakeError):
    """The two peers could not agree (protocol version, transport, authentication)."""


class PeerClosed(AiomooncakeError, ConnectionError):
    """The peer is gone: closed by either side, its process died, or heartbeats stopped."""


class TransferFailed(AiomooncakeError):
    """The data plane failed to move the bytes (engine error, remote abort)."""


class TransferCancelled(TransferFailed):
    """The other side cancelled its half of this message, so it was not delivered."""


class MessageMismatch(AiomooncakeError):
    """The send and the matching recv disagree on dtype or size; no byte was written."""


class ProtocolError(AiomooncakeError):
    """A malformed or unexpected control frame; the connection that sent it is closed."""


class Timeout(AiomooncakeError, asyncio.TimeoutError):
    """An operation did not finish within its deadline."""


__all__ = [
    "AiomooncakeError",
    "ConfigurationError",
    "HandshakeError",
    "MessageMismatch",
    "PeerClosed",
    "ProtocolError",
    "Timeout",
    "TransferCancelled",
    "TransferFailed",
]
