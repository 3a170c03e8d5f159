"""Entry points: :func:`listen` (a :class:`Listener` accepting peers) and :func:`connect`."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from .errors import AiomooncakeError, ConfigurationError, PeerClosed
from .handshake import client_handshake, server_handshake
from .options import Options
from .peer import Peer
from .transport.connection import Connection

log = logging.getLogger(__name__)


class Listener:
    """Accepts connections on ``host:port``; each one that completes the handshake becomes a Peer."""

    def __init__(self, options: Options) -> None:
        self._opts = options
        self._server: asyncio.Server | None = None
        self._ready: asyncio.Queue[Peer | BaseException] = asyncio.Queue()
        self._pending: set[asyncio.Task[None]] = set()
        self._closed = False
        self._rejected = 0  # connections closed because max_handshakes were running
        self.host = ""
        self.port = 0

    async def _start(self, host: str, port: int) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._make_connection, host, port)
        sock = self._server.sockets[0].getsockname()
        self.host, self.port = sock[0], sock[1]
        log.info("listening on %s:%s", self.host, self.port)

    def _make_connection(self) -> asyncio.Protocol:
        if len(self._pending) >= self._opts.max_handshakes:
            self._rejected += 1
            if self._rejected == 1 or self._rejected % 1000 == 0:
                log.warning("%d handshakes already running (max_handshakes): closing a new connection "
                            "at once (%d so far)", len(self._pending), self._rejected)
            return _Reject()
        conn = Connection(self._opts.max_frame)
        task = asyncio.get_running_loop().create_task(self._handshake(conn))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)
        return conn

    async def _handshake(self, conn: Connection) -> None:
        try:
            agreement = await server_handshake(conn, self._opts)
        except AiomooncakeError as e:
            log.warning("handshake with %s failed: %s", conn.peername, e)
            conn.close(e)
            return
        except Exception:
            log.exception("handshake with %s crashed", conn.peername)
            conn.close(PeerClosed("internal error during the handshake"))
            return
        if self._closed:
            conn.close(None, reason="the listener is closing")
            return
        self._ready.put_nowait(Peer(conn, agreement, self._opts))

    async def accept(self) -> Peer:
        """Wait for the next peer that completed the handshake."""
        if self._closed:
            raise PeerClosed("the listener is closed")
        item = await self._ready.get()
        if isinstance(item, BaseException):
            raise item
        return item

    async def close(self) -> None:
        """Stop accepting; peers already accepted stay open."""
        if self._closed:
            return
        self._closed = True
        if self._server is not None:
            # close() stops listening at once. Not Server.wait_closed(): since Python 3.12 it also
            # waits for every accepted connection to close, and accepted peers stay open (a torch
            # group closed its listener first and hung until its 15 s timeout).
            self._server.close()
        for t in list(self._pending):
            t.cancel()
        self._ready.put_nowait(PeerClosed("the listener is closed"))

    async def __aenter__(self) -> Listener:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class _Reject(asyncio.Protocol):
    """A connection over the handshake limit: closed as soon as it is made."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.close()


async def listen(host: str = "127.0.0.1", port: int = 0, *, options: Options | None = None,
                 **kwargs: Any) -> Listener:
    """Listen for peers on exactly ``host`` (never silently on all interfaces); ``port=0`` picks a
    free port, see ``listener.port``. Keyword arguments are :class:`Options` fields."""
    if not host:
        raise ConfigurationError("listen() needs an explicit host; pass '0.0.0.0' to bind all interfaces")
    opts = Options.build(options, **kwargs)
    lst = Listener(opts)
    await lst._start(host, port)
    return lst


async def connect(host: str, port: int, *, options: Options | None = None, **kwargs: Any) -> Peer:
    """Connect to a listener and complete the handshake. Keyword arguments are :class:`Options`."""
    opts = Options.build(options, **kwargs)
    loop = asyncio.get_running_loop()
    try:
        _, conn = await asyncio.wait_for(
            loop.create_connection(lambda: Connection(opts.max_frame), host, port), opts.handshake_timeout)
    except OSError as e:
        raise PeerClosed(f"could not connect to {host}:{port}: {e}; is the listener running?") from e
    try:
        agreement = await client_handshake(conn, opts)
    except BaseException as e:
        conn.close(e if isinstance(e, AiomooncakeError) else None)
        raise
    return Peer(conn, agreement, opts)
