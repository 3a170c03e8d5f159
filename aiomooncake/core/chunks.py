"""Chunk plans for the data plane, and the bounds check every write must pass.

Large messages are split so several engine requests are in flight at once (pipelining inside the
engine, and a bounded amount of work per completion check). The receiver announces
``[addr, addr + capacity)``; the intra-node NVLink transport does not bound-check remote writes,
so the sender checks every planned write against that announcement before submitting it.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import MessageMismatch


@dataclass(frozen=True, slots=True)
class Chunk:
    offset: int
    length: int


def plan_chunks(nbytes: int, chunk_bytes: int, min_chunks: int = 1) -> list[Chunk]:
    """Split ``nbytes`` into chunks of at most ``chunk_bytes`` (and at least ``min_chunks`` pieces
    when the message is large enough that splitting helps), aligned to 4 KiB where possible."""
    if nbytes < 0 or chunk_bytes <= 0 or min_chunks <= 0:
        raise ValueError("nbytes must be >= 0, chunk_bytes and min_chunks > 0")
    if nbytes == 0:
        return []
    # Round the size *down* to 4 KiB: rounding up could exceed chunk_bytes and, by making pieces
    # bigger, yield fewer than min_chunks of them.
    size = min(chunk_bytes, max(4096, nbytes // min_chunks))
    if size < nbytes and size > 4096:
        size = size // 4096 * 4096
    return [Chunk(off, min(size, nbytes - off)) for off in range(0, nbytes, size)]


def plan_copies(local: int, remote: int, nbytes: int, chunk_bytes: int,
                capacity: int | None = None) -> list[tuple[int, int, int]]:
    """The pieces ``(local + offset, remote + offset, length)`` of one message's copy, chunks of at
    most ``chunk_bytes``; with ``capacity`` (the destination the receiver announced at ``remote``)
    every piece is checked against it (:func:`check_write`). One piece needs no chunk objects."""
    if nbytes <= chunk_bytes:
        if capacity is not None and not 0 <= nbytes <= capacity:  # (no Chunk on the hot path)
            check_write(remote, capacity, Chunk(0, nbytes))  # raises, saying why
        return [(local, remote, nbytes)] if nbytes else []
    chunks = plan_chunks(nbytes, chunk_bytes)
    if capacity is None:
        return [(local + c.offset, remote + c.offset, c.length) for c in chunks]
    return [(local + c.offset, check_write(remote, capacity, c), c.length) for c in chunks]


def check_write(addr: int, capacity: int, chunk: Chunk) -> int:
    """Return the remote address of ``chunk``, or raise if it would land outside the destination."""
    if chunk.offset < 0 or chunk.length < 0 or chunk.offset + chunk.length > capacity:
        raise MessageMismatch(
            f"refusing a write of {chunk.length} B at offset {chunk.offset}: the receiver's "
            f"destination holds only {capacity} B"
        )
    return addr + chunk.offset
