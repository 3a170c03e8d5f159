"""Which data-plane transport each link uses: a pure function both peers can evaluate.

A peer has up to two links: "cpu" (host memory) and "cuda" (device memory). The receiver picks the
link per message from where the bytes live on both sides; this module decides which transport
carries each link, from what each side can do and asked for.
"""

from __future__ import annotations

from typing import Any

from ..errors import HandshakeError

_SHM = "shm"
_IPC = "cuda-ipc"  # the same-host CUDA plane (CUDA IPC mappings, our own device copies)


def plan_links(client: dict[str, Any], server: dict[str, Any]) -> dict[str, str]:
    """Return ``{"cpu": transport, "cuda": transport}`` or raise HandshakeError saying why not.

    Each info holds ``caps`` (transports it can provide), ``transport`` (its option: "auto" or a
    fixed one) and ``host_id``; for the same-host CPU path (``"shm"``, see :func:`_use_shm`) also
    ``host_transport`` and ``uid``.
    """
    plan = _plan_engine(client, server)
    if _use_shm(client, server):
        plan["cpu"] = "shm"
    return plan


def _use_shm(client: dict[str, Any], server: dict[str, Any]) -> bool:
    """Whether the "cpu" link is the same-host path: both peers on one host under one uid with
    "shm" in their caps, neither asking for ``host_transport="te"``, and either one asking for
    "shm" or both for "auto" with no Transfer Engine transport forced (an "nvlink" one concerns
    the "cuda" link only)."""
    hc, hs = _host_side(client, "client"), _host_side(server, "server")
    same_host = bool(client.get("host_id")) and client.get("host_id") == server.get("host_id")
    if not same_host:
        return False
    if {hc, hs} == {"te", "shm"}:
        raise HandshakeError(f"host transport mismatch: the client asks for {hc!r}, the server for "
                             f"{hs!r}; configure both peers with the same host_transport (or 'auto')")
    if "te" in (hc, hs):
        return False
    uid = client.get("uid")
    possible = (_SHM in client["caps"] and _SHM in server["caps"] and isinstance(uid, int)
                and uid == server.get("uid"))
    if "shm" in (hc, hs):
        if not possible:
            raise HandshakeError("host_transport 'shm' needs both peers under one uid with the same-host "
                                 "path available on both (Linux process_vm_writev, ptrace access); "
                                 "use host_transport='te' or 'auto'")
        return True
    return possible and {client.get("transport", "auto"), server.get("transport", "auto")} <= {
        "auto", "nvlink", _IPC}


def _host_side(info: dict[str, Any], who: str) -> str:
    want = info.get("host_transport", "auto")
    if want not in ("auto", "te", "shm"):
        raise HandshakeError(f"the {who} sent a malformed host_transport: {want!r:.40}")
    return str(want)


def _plan_engine(client: dict[str, Any], server: dict[str, Any]) -> dict[str, str]:
    """The Transfer Engine transports of both links."""
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
        dev_t = host_t
        if same_host:  # the same-host CUDA plane where both offer it, else the engine's NVLink
            dev_t = _IPC if _IPC in common else "nvlink" if "nvlink" in common else host_t
        return {"cpu": host_t, "cuda": dev_t}
    if want == _SHM:
        raise HandshakeError("transport 'shm' is not available as a Transfer Engine transport: set "
                             "host_transport='shm' for the same-host CPU path")
    if want not in common:
        lacking = [side for side, caps in (("client", ccaps), ("server", scaps)) if want not in caps]
        raise HandshakeError(f"transport {want!r} is not available on the {' and '.join(lacking)} "
                             f"(client can do {sorted(ccaps)}, server {sorted(scaps)})")
    if want in ("nvlink", _IPC):
        if not same_host:
            raise HandshakeError(f"transport {want!r} needs both peers on the same host; use 'rdma' or "
                                 "'tcp' across hosts")
        return {"cpu": host_t, "cuda": want}
    return {"cpu": want, "cuda": want}


def _side(info: Any, who: str) -> tuple[set[str], str]:
    """The capabilities and wanted transport of one side; the info comes from the network."""
    caps = info.get("caps", []) if isinstance(info, dict) else None
    want = info.get("transport", "auto") if isinstance(info, dict) else None
    if (not isinstance(caps, list) or not all(isinstance(c, str) for c in caps)
            or not isinstance(want, str)):
        raise HandshakeError(f"the {who} sent malformed capabilities: {info!r:.120}")
    return set(caps), want


def roles(plan: dict[str, str], local: dict[str, Any], remote: dict[str, Any],
          local_segments: dict[str, str], remote_segments: dict[str, str],
          one_copier: bool = True) -> dict[str, tuple[bool, bool]]:
    """Who runs the copies on each link, as ``(offers, pulls)`` for this side: ``offers`` -- this
    side's rendezvous sends offer their source for the remote to pull; ``pulls`` -- this side pulls
    sources the remote offers (else the sender writes after a CTS).

    * ``shm``: the receiver pulls (no other process ever writes into our memory);
    * ``nvlink`` between two processes on one GPU (same GPU UUID): one of them, the lower engine
      segment, runs every copy between them (two processes issuing copies on one GPU pay a context
      switch each time theirs alternate); ``one_copier=False`` lets each sender write instead;
    * ``cuda-ipc``: on one GPU likewise one copier; otherwise (different GPUs, or ``one_copier``
      off) the receiver pulls, so a frozen or dead sender can never write into a receive that failed;
    * otherwise the sender writes.
    """
    out: dict[str, tuple[bool, bool]] = {}
    same_gpu = isinstance(local.get("gpu"), str) and local.get("gpu") == remote.get("gpu")
    for name, transport in plan.items():
        if transport == _SHM:
            out[name] = (True, True)
        elif transport in ("nvlink", _IPC) and one_copier and same_gpu:
            copier = local_segments[transport] < remote_segments[transport]
            out[name] = (not copier, copier)
        elif transport == _IPC:
            out[name] = (True, True)
        else:
            out[name] = (False, False)
    return out


def link_for(local_device: str, remote_device: str, links: Any) -> str:
    """The link a message takes: "cuda" when its bytes live on CUDA on both sides and the peers
    have a CUDA link, else "cpu" (a CUDA tensor is then staged through host memory)."""
    if local_device == "cuda" and remote_device == "cuda" and "cuda" in links:
        return "cuda"
    return "cpu"
