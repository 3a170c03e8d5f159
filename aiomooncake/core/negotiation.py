"""Which data-plane transport each link uses: a pure function both peers can evaluate.

A peer has up to two links: "cpu" (host memory) and "cuda" (device memory). The receiver picks the
link per message from where the bytes live on both sides; this module decides which transport
carries each link, from what each side can do and asked for.
"""

from __future__ import annotations

from typing import Any

from ..errors import HandshakeError


def plan_links(client: dict[str, Any], server: dict[str, Any]) -> dict[str, str]:
    """Return ``{"cpu": transport, "cuda": transport}`` or raise HandshakeError saying why not.

    Each info holds ``caps`` (transports it can provide), ``transport`` (its option: "auto" or a
    fixed one) and ``host_id``.
    """
    ccaps, want_c = _side(client, "client")
    scaps, want_s = _side(server, "server")
    same_host = bool(client.get("host_id")) and client.get("host_id") == server.get("host_id")
    if want_c != "auto" and want_s != "auto" and want_c != want_s:
        raise HandshakeError(f"transport mismatch: the client asks for {want_c!r}, the server for "
                             f"{want_s!r}; configure both peers with the same transport (or 'auto')")
    want = want_s if want_c == "auto" else want_c
    common = ccaps & scaps
    host_t = "rdma" if "rdma" in common else "tcp"
    if want == "auto":
        dev_t = "nvlink" if same_host and "nvlink" in common else host_t
        return {"cpu": host_t, "cuda": dev_t}
    if want not in common:
        lacking = [side for side, caps in (("client", ccaps), ("server", scaps)) if want not in caps]
        raise HandshakeError(f"transport {want!r} is not available on the {' and '.join(lacking)} "
                             f"(client can do {sorted(ccaps)}, server {sorted(scaps)})")
    if want == "nvlink":
        if not same_host:
            raise HandshakeError("transport 'nvlink' needs both peers on the same host; use 'rdma' or "
                                 "'tcp' across hosts")
        return {"cpu": host_t, "cuda": "nvlink"}
    return {"cpu": want, "cuda": want}


def _side(info: Any, who: str) -> tuple[set[str], str]:
    """The capabilities and wanted transport of one side; the info comes from the network."""
    caps = info.get("caps", []) if isinstance(info, dict) else None
    want = info.get("transport", "auto") if isinstance(info, dict) else None
    if (not isinstance(caps, list) or not all(isinstance(c, str) for c in caps)
            or not isinstance(want, str)):
        raise HandshakeError(f"the {who} sent malformed capabilities: {info!r:.120}")
    return set(caps), want
