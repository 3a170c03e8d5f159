#!/usr/bin/env python3
"""What the pure protocol core costs per rendezvous message, with no I/O, no plane and no peer:
``--messages`` sends offering their source (the same-host pull of the CUDA IPC and CPU planes) go
from one :class:`~aiomooncake.core.session.Session` to another through msgpack-encoded frames, are
matched against posted receives, pulled and acknowledged (the EPLB exchange's control work on each
side, without the peer's glue), ``--rounds`` times; prints the median microseconds per message of
each step.

    python experiments/core_cost.py --messages 512

Public modules of the core only (``aiomooncake.core``).
"""

from __future__ import annotations

import argparse
import statistics
import time

import msgpack

from aiomooncake.core.messages import decode, encode
from aiomooncake.core.session import RecvMatched, RecvSpec, Session

DESC = b"L" * 89  # a CUDA IPC descriptor's size


def one_round(n: int) -> tuple[float, float, float]:
    """Seconds per message: the sender's posts and their frames; the receiver's posts, matching,
    pulls and replies; the sender taking the ACKs."""
    a, b = Session(eager_threshold=0), Session(eager_threshold=0)
    spec = RecvSpec("uint8", 7168)
    t0 = time.perf_counter()
    for i in range(n):
        a.post_send(i, "uint8", (7168,), 7168, "cuda", None, src=0x7F0000000000 + i * 8192, desc=DESC)
    wire = msgpack.packb([encode(m) for m in a.outbox])
    a.outbox.clear()
    t1 = time.perf_counter()
    for i in range(n):
        b.post_recv(i, spec)
    for m in msgpack.unpackb(wire):
        b.receive(decode(m))
    events, b.events = b.events, []
    for e in events:
        if type(e) is RecvMatched:
            b.pulled(e.op)
    wire = msgpack.packb([encode(m) for m in b.outbox])
    b.outbox.clear()
    b.events.clear()
    t2 = time.perf_counter()
    for m in msgpack.unpackb(wire):
        a.receive(decode(m))
    a.events.clear()
    t3 = time.perf_counter()
    return (t1 - t0) / n, (t2 - t1) / n, (t3 - t2) / n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--messages", type=int, default=512)
    p.add_argument("--rounds", type=int, default=20)
    args = p.parse_args()
    for _ in range(3):
        one_round(args.messages)
    rounds = [one_round(args.messages) for _ in range(args.rounds)]
    post, recv, ack = (statistics.median(r[k] for r in rounds) * 1e6 for k in range(3))
    print(f"per message ({args.messages} a round, median of {args.rounds} rounds): sender posts and "
          f"frames {post:.2f} us; receiver posts, decodes, matches, pulls, replies {recv:.2f} us; "
          f"sender takes the ACK {ack:.2f} us; total {post + recv + ack:.2f} us")


if __name__ == "__main__":
    main()
