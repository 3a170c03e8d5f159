"""TagMatcher: the k-th message with tag t matches the k-th receive posted with tag t."""

from __future__ import annotations

from collections import defaultdict

from hypothesis import given, settings
from hypothesis import strategies as st

from aiomooncake.core.matching import TagMatcher


class Item:
    """A stand-in for a RecvOp or a message; equal to every other Item, so only identity tells."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Item)

    __hash__ = object.__hash__

    def __repr__(self) -> str:
        return f"Item({self.name})"


def test_posted_before_arrival() -> None:
    t: TagMatcher[Item, Item] = TagMatcher()
    r = Item("r")
    assert t.post(0, r) is None
    assert t.posted_count() == 1 and t.unexpected_count() == 0
    assert not t.has_unexpected(0)
    msg = Item("m")
    assert t.arrive(0, msg) is r
    assert t.posted_count() == 0 and t.unexpected_count() == 0


def test_unexpected_before_posted() -> None:
    t: TagMatcher[Item, Item] = TagMatcher()
    msg = Item("m")
    assert t.arrive(3, msg) is None
    assert t.has_unexpected(3)
    assert t.unexpected_count() == 1 and t.posted_count() == 0
    assert t.post(3, Item("r")) is msg
    assert not t.has_unexpected(3)
    assert t.unexpected_count() == 0 and t.posted_count() == 0


def test_fifo_of_posted_receives() -> None:
    t: TagMatcher[Item, Item] = TagMatcher()
    recvs = [Item(f"r{i}") for i in range(5)]
    for r in recvs:
        assert t.post(1, r) is None
    assert [t.arrive(1, Item(f"m{i}")) for i in range(5)] == recvs
    assert t.posted_count() == 0
    assert t.arrive(1, Item("late")) is None  # every receive is used up: the next one waits
    assert t.unexpected_count() == 1


def test_fifo_of_posted_receives_by_identity() -> None:
    t: TagMatcher[Item, Item] = TagMatcher()
    recvs = [Item(f"r{i}") for i in range(5)]
    for r in recvs:
        t.post(1, r)
    for r in recvs:
        assert t.arrive(1, Item("m")) is r


def test_fifo_of_unexpected_messages() -> None:
    t: TagMatcher[Item, Item] = TagMatcher()
    msgs = [Item(f"m{i}") for i in range(5)]
    for msg in msgs:
        assert t.arrive(7, msg) is None
    assert t.unexpected_count() == 5
    for msg in msgs:
        assert t.post(7, Item("r")) is msg
    assert t.unexpected_count() == 0 and not t.has_unexpected(7)


def test_tags_are_independent() -> None:
    t: TagMatcher[Item, Item] = TagMatcher()
    r0, r1 = Item("r0"), Item("r1")
    t.post(0, r0)
    t.post(1, r1)
    m2 = Item("m2")
    assert t.arrive(2, m2) is None  # nobody waits on tag 2
    assert t.has_unexpected(2) and not t.has_unexpected(0) and not t.has_unexpected(1)
    assert t.arrive(1, Item("m1")) is r1  # tag 1 is served even though tag 0 posted first
    assert t.arrive(0, Item("m0")) is r0
    assert t.post(2, Item("r2")) is m2
    assert t.posted_count() == 0 and t.unexpected_count() == 0


def test_extreme_tags() -> None:
    t: TagMatcher[Item, Item] = TagMatcher()
    lo, hi = -(2**63), 2**63 - 1
    r_lo, r_hi = Item("lo"), Item("hi")
    t.post(lo, r_lo)
    t.post(hi, r_hi)
    assert t.arrive(hi, Item("m")) is r_hi
    assert t.arrive(lo, Item("m")) is r_lo


def test_withdraw_posted_takes_exactly_that_receive() -> None:
    t: TagMatcher[Item, Item] = TagMatcher()
    a, b, c = Item("a"), Item("b"), Item("c")
    for r in (a, b, c):
        t.post(0, r)
    assert t.withdraw_posted(0, b) is True
    assert t.withdraw_posted(0, b) is False  # already gone
    assert t.withdraw_posted(0, Item("b")) is False  # equal but not the same object
    assert t.withdraw_posted(1, a) is False  # wrong tag
    assert t.posted_count() == 2
    assert t.arrive(0, Item("m")) is a
    assert t.arrive(0, Item("m")) is c


def test_withdraw_last_posted_leaves_tag_clean() -> None:
    t: TagMatcher[Item, Item] = TagMatcher()
    r = Item("r")
    t.post(0, r)
    assert t.withdraw_posted(0, r)
    msg = Item("m")
    assert t.arrive(0, msg) is None  # nobody is posted any more: the message waits
    assert t.has_unexpected(0)
    assert list(t.iter_posted()) == []


def test_withdraw_unexpected_takes_exactly_that_message() -> None:
    t: TagMatcher[Item, Item] = TagMatcher()
    a, b, c = Item("a"), Item("b"), Item("c")
    for msg in (a, b, c):
        t.arrive(5, msg)
    assert t.withdraw_unexpected(5, a) is True
    assert t.withdraw_unexpected(5, a) is False
    assert t.withdraw_unexpected(5, Item("b")) is False
    assert t.withdraw_unexpected(6, b) is False
    assert t.post(5, Item("r")) is b
    assert t.withdraw_unexpected(5, c) is True
    assert not t.has_unexpected(5)
    assert t.unexpected_count() == 0
    assert t.post(5, Item("r")) is None  # the withdrawn message is not handed out


def test_drain_returns_everything_and_empties() -> None:
    t: TagMatcher[Item, Item] = TagMatcher()
    posted = [Item("r0"), Item("r1"), Item("r2")]
    t.post(0, posted[0])
    t.post(0, posted[1])
    t.post(9, posted[2])
    msgs = [Item("m0"), Item("m1")]
    t.arrive(1, msgs[0])
    t.arrive(2, msgs[1])
    assert sorted(x.name for x in t.iter_posted()) == ["r0", "r1", "r2"]
    p, u = t.drain()
    assert {id(x) for x in p} == {id(x) for x in posted}
    assert {id(x) for x in u} == {id(x) for x in msgs}
    assert t.posted_count() == 0 and t.unexpected_count() == 0
    assert not t.has_unexpected(1) and not t.has_unexpected(2)
    assert t.drain() == ([], [])
    assert t.arrive(0, Item("m")) is None  # drained receives no longer match


# ------------------------------------------------------------------------- model check
actions = st.lists(st.tuples(st.sampled_from(["post", "arrive", "withdraw_posted", "withdraw_unexpected"]),
                             st.integers(0, 3), st.integers(0, 10)), max_size=80)


@settings(max_examples=300, deadline=None)
@given(actions)
def test_against_a_model(script: list[tuple[str, int, int]]) -> None:
    """Random interleavings agree with a trivial model: one FIFO per tag and side."""
    t: TagMatcher[Item, Item] = TagMatcher()
    posted: dict[int, list[Item]] = defaultdict(list)
    unexpected: dict[int, list[Item]] = defaultdict(list)
    for n, (action, tag, pick) in enumerate(script):
        if action == "post":
            r = Item(f"r{n}")
            got = t.post(tag, r)
            if unexpected[tag]:
                assert got is unexpected[tag].pop(0)
            else:
                assert got is None
                posted[tag].append(r)
        elif action == "arrive":
            msg = Item(f"m{n}")
            got = t.arrive(tag, msg)
            if posted[tag]:
                assert got is posted[tag].pop(0)
            else:
                assert got is None
                unexpected[tag].append(msg)
        else:
            queue = posted[tag] if action == "withdraw_posted" else unexpected[tag]
            withdraw = t.withdraw_posted if action == "withdraw_posted" else t.withdraw_unexpected
            if queue:
                victim = queue.pop(pick % len(queue))
                assert withdraw(tag, victim) is True
            assert withdraw(tag, Item("stranger")) is False
        # a tag never has both waiting receives and waiting messages
        assert not (posted[tag] and unexpected[tag])
        assert t.has_unexpected(tag) == bool(unexpected[tag])
        assert t.posted_count() == sum(map(len, posted.values()))
        assert t.unexpected_count() == sum(map(len, unexpected.values()))
