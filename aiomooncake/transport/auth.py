"""Shared-secret authentication for the handshake: HMAC-SHA256 challenge-response.

Each side sends a fresh random nonce; each proves it knows the secret by sending
``HMAC(secret, label || role || client_nonce || server_nonce)``. The role (``client`` or
``server``) is inside the MAC, so a proof cannot be reflected back at its author, and both fresh
nonces are, so a recorded proof cannot be replayed on another connection. Proofs are compared in
constant time (:func:`hmac.compare_digest`).

What this does not do: it neither encrypts nor integrity-protects the frames that follow, so an
active man-in-the-middle on the control connection can still tamper with them, and anyone who
records a handshake can try to guess a weak secret offline. Use a long random secret (e.g.
``python -c "import secrets; print(secrets.token_urlsafe(32))"``) and see docs/security.md.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
from typing import Any

from ..errors import ProtocolError

log = logging.getLogger(__name__)

SCHEME = "hmac-sha256"  # the only scheme; "none" when a side has no secret
NONE = "none"
NONCE_BYTES = 32
PROOF_BYTES = hashlib.sha256().digest_size
MIN_SECRET_BYTES = 16  # shorter secrets work but are logged as weak
_LABEL = b"aiomooncake handshake v1\x00"
_ROLES = ("client", "server")

_warned_short = False


def key_of(secret: str | bytes | None) -> bytes | None:
    """The HMAC key for ``secret`` (UTF-8 for a str); None when there is no (or an empty) secret."""
    global _warned_short
    if not secret:
        return None
    key = secret.encode("utf-8") if isinstance(secret, str) else bytes(secret)
    if len(key) < MIN_SECRET_BYTES and not _warned_short:
        _warned_short = True
        log.warning("the shared secret has only %d bytes; anyone who records a handshake can try to "
                    "guess it offline: use at least %d random bytes", len(key), MIN_SECRET_BYTES * 2)
    return key


def new_nonce() -> bytes:
    return secrets.token_bytes(NONCE_BYTES)


def proof(key: bytes, role: str, client_nonce: bytes, server_nonce: bytes) -> bytes:
    """What ``role`` sends to prove it holds ``key`` on the connection with these two nonces."""
    if role not in _ROLES:
        raise ValueError(f"role must be one of {_ROLES}, got {role!r}")
    msg = _LABEL + role.encode() + b"\x00" + client_nonce + server_nonce
    return hmac.new(key, msg, hashlib.sha256).digest()


def verify(key: bytes, role: str, client_nonce: bytes, server_nonce: bytes, claimed: bytes) -> bool:
    """True if ``claimed`` is ``role``'s proof for these nonces (constant-time comparison)."""
    return hmac.compare_digest(proof(key, role, client_nonce, server_nonce), claimed)


def field_bytes(info: dict[str, Any], name: str, size: int, what: str) -> bytes:
    """``info[name]`` as exactly ``size`` bytes, or ProtocolError naming ``what`` sent it badly."""
    v = info.get(name)
    if type(v) is not bytes or len(v) != size:
        raise ProtocolError(f"{what}: field {name!r} must be {size} bytes, got {_describe(v)}")
    return v


def scheme_of(info: dict[str, Any], what: str) -> str:
    """The authentication scheme a HELLO or WELCOME announces ("hmac-sha256" or "none")."""
    if "auth" not in info:
        raise ProtocolError(f"{what} names no authentication scheme: the other side runs an "
                            "aiomooncake whose handshake predates authentication; install matching "
                            "aiomooncake versions")
    v = info["auth"]
    if v not in (SCHEME, NONE):
        raise ProtocolError(f"{what}: unknown authentication scheme {_describe(v)}; "
                            f"expected {SCHEME!r} or {NONE!r}")
    return v  # type: ignore[no-any-return]


def _describe(v: Any) -> str:
    if isinstance(v, (bytes, str)):
        return f"{type(v).__name__} of length {len(v)}"
    return f"{type(v).__name__} {v!r:.40}"


__all__ = ["NONCE_BYTES", "NONE", "PROOF_BYTES", "SCHEME", "field_bytes", "key_of", "new_nonce",
           "proof", "scheme_of", "verify"]
