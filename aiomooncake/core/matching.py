"""Per-peer matching of receives to messages, by tag and in send order (MPI/gloo semantics).

Messages between two peers travel over one ordered control connection, so arrival order is send
order. The k-th message with tag t matches the k-th receive posted with tag t; tags are
independent queues. Whichever side arrives first waits in its queue.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from typing import Generic, TypeVar

P = TypeVar("P")  # a posted receive
U = TypeVar("U")  # an unexpected (arrived, unmatched) message


class TagMatcher(Generic[P, U]):
    __slots__ = ("_posted", "_unexpected")

    def __init__(self) -> None:
        self._posted: dict[int, deque[P]] = {}
        self._unexpected: dict[int, deque[U]] = {}

    def post(self, tag: int, recv: P) -> U | None:
        """A receive is posted: return the message it matches now, or queue it."""
        q = self._unexpected.get(tag)
        if q:
            msg = q.popleft()
            if not q:
                del self._unexpected[tag]
            return msg
        self._posted.setdefault(tag, deque()).append(recv)
        return None

    def arrive(self, tag: int, msg: U) -> P | None:
        """A message arrives: return the receive it matches now, or queue it as unexpected."""
        q = self._posted.get(tag)
        if q:
            recv = q.popleft()
            if not q:
                del self._posted[tag]
            return recv
        self._unexpected.setdefault(tag, deque()).append(msg)
        return None

    def withdraw_posted(self, tag: int, recv: P) -> bool:
        """Remove a posted receive that has not matched yet (cancellation). True if it was there."""
        return _remove(self._posted, tag, recv)

    def withdraw_unexpected(self, tag: int, msg: U) -> bool:
        """Remove an unmatched message (its sender aborted it). True if it was there."""
        return _remove(self._unexpected, tag, msg)

    def has_unexpected(self, tag: int) -> bool:
        return tag in self._unexpected

    def unexpected_count(self) -> int:
        return sum(len(q) for q in self._unexpected.values())

    def posted_count(self) -> int:
        return sum(len(q) for q in self._posted.values())

    def drain(self) -> tuple[list[P], list[U]]:
        """Empty both queues (connection lost) and return what they held."""
        posted = [r for q in self._posted.values() for r in q]
        unexpected = [m for q in self._unexpected.values() for m in q]
        self._posted.clear()
        self._unexpected.clear()
        return posted, unexpected

    def iter_posted(self) -> Iterator[P]:
        for q in self._posted.values():
            yield from q


def _remove(table: dict[int, deque[P]], tag: int, item: P) -> bool:
    q = table.get(tag)
    if not q:
        return False
    for i, x in enumerate(q):
        if x is item:
            del q[i]
            if not q:
                del table[tag]
            return True
    return False
