"""User-tunable options shared by ``listen`` and ``connect``."""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, fields, replace
from typing import Any

from .errors import ConfigurationError

_TRANSPORTS = ("auto", "tcp", "rdma", "nvlink", "cuda-ipc")
_HOST_TRANSPORTS = ("auto", "te", "shm")
# "shm" copies a message in one piece (the plane cuts its own pieces for its threads)
_AUTO_CHUNK = {"tcp": 256 * 1024 * 1024, "nvlink": 256 * 1024 * 1024, "rdma": 64 * 1024 * 1024,
               "shm": 1 << 62, "cuda-ipc": 1 << 62}


@dataclass(frozen=True)
class Options:
    """Every knob, with the default that suits most users.

    transport: "auto" picks the same-host CUDA plane ("cuda-ipc": CUDA IPC mappings and our own
        device copies) for CUDA peers of one host where it works, else the Transfer Engine's
        intra-node NVLink, RDMA where both hosts have HCAs, TCP otherwise; a fixed value ("cuda-ipc",
        "nvlink", "rdma", "tcp") must be possible for both peers or the handshake fails.
    eager_threshold: messages up to this many bytes travel inside the control frame.
    shm_eager_threshold: the same, towards a peer on the same-host CPU path, where the receiver's
        one-copy pull beats the frame's copies above about 16 KiB (measured: 64 KiB streamed at
        2.1-2.3 GB/s pulled against 1.9 eager, round trip 71 against 95 us).
    chunk_bytes / window: large messages are written in chunks of at most ``chunk_bytes`` with up
        to ``window`` engine requests in flight; 0 picks per transport (measured: TCP and NVLink
        move one large request fastest, so 256 MiB; RDMA 64 MiB).
    heartbeat_interval / heartbeat_timeout: liveness of the control connection; a silent peer is
        declared dead after ``heartbeat_timeout`` seconds and its pending operations fail.
    max_frame: the largest control frame accepted (bounds what a peer can make us buffer).
    handshake_timeout: how long connecting and the handshake may take.
    cancel_timeout: how long a cancelled receive waits for the sender to confirm it stopped writing
        before the connection is closed.
    busy_poll: seconds the event loop keeps polling without sleeping after traffic (lower latency
        on VMs where waking a sleeping process is slow); 0 disables it.
    engine_host: the address the local Transfer Engine advertises (default: the control socket's);
        a host name or address only: the engine picks its own port.
    secret: shared secret for the authenticated handshake (default: $AIOMOONCAKE_SECRET).
    host_transport: CPU tensors between peers on one host under one uid: "shm" copies them once in
        the kernel, the receiver pulling with process_vm_readv (aiomooncake.planes.shm), "te" uses the
        Transfer Engine, "auto" (default, or
        $AIOMOONCAKE_HOST_TRANSPORT) is "shm" where possible unless ``transport`` forces tcp/rdma.
    max_handshakes: connections a listener lets handshake at once; further ones are closed at once
        (a flood of connections that never finish the handshake cannot pile up without bound).
    hold_acks: towards a remote that sleeps (``busy_poll=0``), an ACK alone waits up to two loop
        turns for the reply it can ride with, so the remote wakes once per round trip. False sends
        it at once: the torch backend's choice, whose replies come from another thread long after
        two turns, while a held ACK can lose the GIL to that thread for milliseconds.
    batch_replies: the replies to the frames of one socket read leave in one syscall.
    batch_frames: the messages of one burst (a batch's posts, the replies to one read) travel as
        one BATCH frame (one msgpack call each way, instead of one per message).
    one_copier: two peers on one GPU let one of them run every copy between them (two processes
        issuing copies on one GPU pay a context switch whenever theirs alternate; H100 4 KiB round
        trip 455-483 against 821-840 us). False: each sender writes.
    inline_cuda: a small CUDA tensor (up to the eager threshold) whose producer is done travels in
        the control frame through a pinned host buffer. None (default): except between two peers on
        one GPU, where those host copies in both processes measured slower than the one copier's
        copy (H200: 4 KiB round trip 776 against 599 us, EPLB 93 against 124 GB/s).

    Process-wide timing knobs (the poller's spin, the burst hold size, ...) live in
    :mod:`aiomooncake.tuning`.
    """

    transport: str = "auto"
    eager_threshold: int = 64 * 1024
    shm_eager_threshold: int = 16 * 1024
    chunk_bytes: int = 0
    window: int = 4
    heartbeat_interval: float = 1.0
    heartbeat_timeout: float = 2.0
    max_frame: int = 0  # 0: eager_threshold + 64 KiB
    handshake_timeout: float = 30.0
    cancel_timeout: float = 10.0
    busy_poll: float = 0.0005
    engine_host: str | None = None
    secret: str | None = None
    host_transport: str = "auto"
    max_handshakes: int = 64
    hold_acks: bool = True
    batch_replies: bool = True
    batch_frames: bool = True
    one_copier: bool = True
    inline_cuda: bool | None = None

    def __post_init__(self) -> None:
        if self.transport not in _TRANSPORTS:
            raise ConfigurationError(f"transport must be one of {_TRANSPORTS}, got {self.transport!r}")
        if min(self.eager_threshold, self.shm_eager_threshold, self.chunk_bytes) < 0 or self.window <= 0:
            raise ConfigurationError("eager_threshold, shm_eager_threshold and chunk_bytes must be >= 0, "
                                     "window > 0")
        if not 0 < self.heartbeat_interval < self.heartbeat_timeout:
            raise ConfigurationError("need 0 < heartbeat_interval < heartbeat_timeout")
        if self.max_frame == 0:
            object.__setattr__(self, "max_frame", self.eager_threshold + 64 * 1024)
        elif self.max_frame < self.eager_threshold + 1024:
            raise ConfigurationError("max_frame must exceed eager_threshold by at least 1 KiB")
        if self.secret is None and os.environ.get("AIOMOONCAKE_SECRET"):
            object.__setattr__(self, "secret", os.environ["AIOMOONCAKE_SECRET"])
        if self.host_transport == "auto" and os.environ.get("AIOMOONCAKE_HOST_TRANSPORT"):
            object.__setattr__(self, "host_transport", os.environ["AIOMOONCAKE_HOST_TRANSPORT"])
        if self.max_handshakes <= 0:
            raise ConfigurationError("max_handshakes must be > 0")
        if self.engine_host is not None:
            _check_engine_host(self.engine_host)
        if self.host_transport not in _HOST_TRANSPORTS:
            raise ConfigurationError(f"host_transport must be one of {_HOST_TRANSPORTS}, "
                                     f"got {self.host_transport!r}")

    def chunk_for(self, transport: str) -> int:
        """The chunk size used on a link of ``transport``."""
        return self.chunk_bytes or _AUTO_CHUNK.get(transport, 64 * 1024 * 1024)

    @classmethod
    def build(cls, options: Options | None = None, **overrides: Any) -> Options:
        base = options if options is not None else cls()
        if not overrides:
            return base
        known = {f.name for f in fields(cls)}
        unknown = set(overrides) - known
        if unknown:
            raise ConfigurationError(f"unknown option(s) {sorted(unknown)}; known: {sorted(known)}")
        return replace(base, **overrides)


def _check_engine_host(host: str) -> None:
    """The engine's segment name is ``host:rpc_port``; a port given here would make it unreachable."""
    if not host or host != host.strip() or "/" in host or host.startswith("["):
        raise ConfigurationError(f"engine_host must be a host name or an address, got {host!r}")
    if ":" in host:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ConfigurationError(
                f"engine_host must be a host name or an address without a port, got {host!r}: the "
                "Transfer Engine picks its own RPC port") from None
