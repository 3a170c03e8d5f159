"""The versioned, optionally authenticated handshake: prove the shared secret, then agree on the
protocol version and the data planes (what goes into those messages, and what is made of the
answer, is :mod:`aiomooncake.planes.negotiate`'s).

::

    client                                         server
      HELLO   {version, auth, nonce_c}           ->
                                                 <- WELCOME {version, auth, nonce_s, proof_s} | REFUSE
      (client checks proof_s)
      READY   {proof_c, info: caps, transport..} ->
                                                    (server checks proof_c)
                                                 <- WELCOME {self, links, segments}           | REFUSE
      READY   {segments}                         ->

``auth`` is ``"hmac-sha256"`` when the side has a shared secret (``Options.secret`` or
``$AIOMOONCAKE_SECRET``) and ``"none"`` otherwise; nonces and proofs are only present with a secret
(see :mod:`.auth`). Until both sides proved the secret, nothing but the protocol version, the scheme
and the nonces leaves either side: no capabilities, host, pid, engine segment name or address, and
no Transfer Engine is started for the connection. If only one side has a secret, the handshake is
refused with a message that says so. Either side can end the handshake with REFUSE {reason}; the
other raises :class:`~aiomooncake.errors.HandshakeError` with that reason.

Without secrets the same five messages flow, with ``auth: "none"`` and no proofs.
"""

from __future__ import annotations

import logging
from typing import Any

from .core.messages import PROTOCOL_VERSION, Hello, Ready, Refuse, Welcome
from .errors import AiomooncakeError, HandshakeError, ProtocolError
from .options import Options
from .planes import negotiate
from .planes.negotiate import Agreement
from .transport import auth
from .transport.connection import Connection

log = logging.getLogger(__name__)


def _engine_host(conn: Connection, options: Options) -> str:
    return options.engine_host or conn.sockname[0] or "127.0.0.1"


def _refuse(conn: Connection, reason: str) -> None:
    """Tell the other side why the handshake ends here (it raises HandshakeError with ``reason``)."""
    conn.send(Refuse(reason))


async def _expect(conn: Connection, options: Options, kind: type[Any], what: str) -> Any:
    """The next handshake message, which must be ``kind``; a REFUSE becomes HandshakeError."""
    msg = await conn.next_handshake_message(options.handshake_timeout)
    if isinstance(msg, Refuse):
        raise HandshakeError(f"{conn.peername} refused the connection: {msg.reason}")
    if not isinstance(msg, kind):
        reason = f"expected {what}, got {type(msg).__name__}"
        _refuse(conn, f"protocol error: {reason}")
        raise ProtocolError(reason)
    return msg


def _check_version(conn: Connection, version: int, server: bool) -> None:
    if version == PROTOCOL_VERSION:
        return
    if server:
        _refuse(conn, f"protocol version {version} is not supported: this server speaks "
                      f"{PROTOCOL_VERSION}; install matching aiomooncake versions")
        raise HandshakeError(f"refused {conn.peername}: client speaks protocol version {version}, "
                             f"this server speaks {PROTOCOL_VERSION}")
    _refuse(conn, f"this client speaks protocol version {PROTOCOL_VERSION}, not {version}")
    raise HandshakeError(f"{conn.peername} speaks protocol version {version}, this client "
                         f"speaks {PROTOCOL_VERSION}; install matching aiomooncake versions")


def _guarded(conn: Connection, fn: Any, *args: Any) -> Any:
    """Run a validator; on ProtocolError tell the other side before raising."""
    try:
        return fn(*args)
    except ProtocolError as e:
        _refuse(conn, f"protocol error: {e}")
        raise


async def client_handshake(conn: Connection, options: Options) -> Agreement:
    key = auth.key_of(options.secret)
    nonce_c = auth.new_nonce() if key is not None else b""
    hello: dict[str, Any] = {"auth": auth.SCHEME if key is not None else auth.NONE}
    if key is not None:
        hello["nonce"] = nonce_c
    conn.send(Hello(PROTOCOL_VERSION, hello))

    # 1. The server proves the secret (or says it has none); nothing about us has left yet.
    challenge: Welcome = await _expect(conn, options, Welcome, "WELCOME")
    _check_version(conn, challenge.version, server=False)
    scheme = _guarded(conn, auth.scheme_of, challenge.info, "WELCOME")
    ready: dict[str, Any] = {}
    if key is not None:
        if scheme != auth.SCHEME:
            _refuse(conn, "this client requires a shared secret and the listener has none")
            raise HandshakeError(
                f"the listener at {conn.peername} has no shared secret, but this side is configured "
                "with one (secret= or AIOMOONCAKE_SECRET): refusing to connect unauthenticated; "
                "configure the same secret on both sides")
        nonce_s = _guarded(conn, auth.field_bytes, challenge.info, "nonce", auth.NONCE_BYTES, "WELCOME")
        proof_s = _guarded(conn, auth.field_bytes, challenge.info, "proof", auth.PROOF_BYTES, "WELCOME")
        if not auth.verify(key, "server", nonce_c, nonce_s, proof_s):
            _refuse(conn, "authentication failed: the listener's proof does not match this "
                          "client's shared secret")
            raise HandshakeError(
                f"authentication failed: the listener at {conn.peername} does not know this side's "
                "shared secret (the secrets differ, or it is not the listener you meant)")
        ready["proof"] = auth.proof(key, "client", nonce_c, nonce_s)
    elif scheme != auth.NONE:
        raise HandshakeError(f"the listener at {conn.peername} requires a shared secret: pass "
                             "secret=... or set AIOMOONCAKE_SECRET on this side too")
    conn.handshake_backlog = None  # the server is who we meant
    mine = negotiate.local_info(options)
    ready["info"] = mine
    conn.send(Ready(ready))

    # 2. Both proved the secret: agree on the links and exchange the engine segments.
    msg: Welcome = await _expect(conn, options, Welcome, "WELCOME")
    remote = msg.info.get("self")
    plan = msg.info.get("links")
    if not isinstance(remote, dict) or not isinstance(plan, dict):
        _refuse(conn, "protocol error: WELCOME without self or links")
        raise ProtocolError("WELCOME without self or links")
    try:
        expected = negotiate.plan(mine, remote)
        negotiate.confirm(expected, remote, conn.sockname, conn.peername)
    except HandshakeError as e:
        _refuse(conn, str(e))
        raise
    if plan != expected:
        reason = f"the peers disagree on transports: server chose {plan}, the client computes {expected}"
        _refuse(conn, reason)
        raise HandshakeError(reason)
    try:
        planes = await negotiate.start(plan, _engine_host(conn, options))
    except AiomooncakeError as e:
        _refuse(conn, f"the client could not start its data plane: {e}")
        raise
    conn.send(Ready({"segments": negotiate.segments(planes)}))
    return await negotiate.links(plan, planes, msg.info.get("segments"), mine, remote, options)


async def server_handshake(conn: Connection, options: Options) -> Agreement:
    hello: Hello = await _expect(conn, options, Hello, "HELLO")
    _check_version(conn, hello.version, server=True)
    scheme = _guarded(conn, auth.scheme_of, hello.info, "HELLO")
    key = auth.key_of(options.secret)
    welcome: dict[str, Any] = {"auth": auth.SCHEME if key is not None else auth.NONE}
    nonce_c = nonce_s = b""
    if key is not None:
        if scheme != auth.SCHEME:
            _refuse(conn, "this listener requires a shared secret: pass secret=... or set "
                          "AIOMOONCAKE_SECRET on the connecting side")
            raise HandshakeError(f"refused {conn.peername}: it has no shared secret")
        nonce_c = _guarded(conn, auth.field_bytes, hello.info, "nonce", auth.NONCE_BYTES, "HELLO")
        nonce_s = auth.new_nonce()
        welcome["nonce"] = nonce_s
        welcome["proof"] = auth.proof(key, "server", nonce_c, nonce_s)
    elif scheme != auth.NONE:
        _refuse(conn, "the connecting side uses a shared secret but this listener has none; "
                      "configure the same secret on both sides")
        raise HandshakeError(f"refused {conn.peername}: it requires a shared secret and this "
                             "listener has none")
    conn.send(Welcome(PROTOCOL_VERSION, welcome))

    ready: Ready = await _expect(conn, options, Ready, "READY")
    if key is not None:
        claimed = _guarded(conn, auth.field_bytes, ready.info, "proof", auth.PROOF_BYTES, "READY")
        if not auth.verify(key, "client", nonce_c, nonce_s, claimed):
            _refuse(conn, "authentication failed: the shared secrets differ")
            raise HandshakeError(f"refused {conn.peername}: authentication failed (wrong shared secret)")
    remote = ready.info.get("info")
    if not isinstance(remote, dict):
        _refuse(conn, "protocol error: READY without info")
        raise ProtocolError("READY without info")

    # Both proved the secret (or neither has one): only now reveal anything and start engines. The
    # client may stream data frames right behind its last READY: stop bounding the backlog.
    conn.handshake_backlog = None
    mine = negotiate.local_info(options)
    negotiate.screen(mine, remote, conn.sockname, conn.peername)  # what the client cannot reach goes
    try:
        plan = negotiate.plan(remote, mine)
    except HandshakeError as e:
        _refuse(conn, str(e))
        raise
    try:
        planes = await negotiate.start(plan, _engine_host(conn, options))
    except AiomooncakeError as e:
        _refuse(conn, f"the listener could not start its data plane: {e}")
        raise
    conn.send(Welcome(PROTOCOL_VERSION, {"self": mine, "links": plan,
                                         "segments": negotiate.segments(planes)}))
    final: Ready = await _expect(conn, options, Ready, "READY")
    return await negotiate.links(plan, planes, final.info.get("segments"), mine, remote, options)
