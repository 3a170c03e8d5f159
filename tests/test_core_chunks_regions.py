"""Chunk plans, the write bounds check, and the cache of registered memory regions."""

from __future__ import annotations

import random

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from aiomooncake.core.chunks import Chunk, check_write, plan_chunks, plan_copies
from aiomooncake.core.regions import Region, RegionCache
from aiomooncake.errors import MessageMismatch

KiB, MiB = 1024, 1024 * 1024
PAGE = 4096


# =============================================================================== plan_chunks
def assert_exact_cover(chunks: list[Chunk], nbytes: int) -> None:
    pos = 0
    for c in chunks:
        assert c.offset == pos, chunks
        assert c.length > 0, chunks
        pos += c.length
    assert pos == nbytes


def test_zero_bytes_is_no_chunks() -> None:
    assert plan_chunks(0, MiB) == []
    assert plan_chunks(0, 1, min_chunks=8) == []


@pytest.mark.parametrize(("nbytes", "chunk_bytes", "min_chunks"), [(-1, MiB, 1), (10, 0, 1), (10, -1, 1),
                                                                   (10, MiB, 0), (10, MiB, -2)])
def test_bad_arguments(nbytes: int, chunk_bytes: int, min_chunks: int) -> None:
    with pytest.raises(ValueError):
        plan_chunks(nbytes, chunk_bytes, min_chunks)


def test_small_message_is_one_chunk() -> None:
    assert plan_chunks(1, 16 * MiB) == [Chunk(0, 1)]
    assert plan_chunks(16 * MiB, 16 * MiB) == [Chunk(0, 16 * MiB)]


def test_large_message_uses_full_chunks() -> None:
    chunks = plan_chunks(3 * 16 * MiB + 5, 16 * MiB)
    assert chunks == [Chunk(0, 16 * MiB), Chunk(16 * MiB, 16 * MiB), Chunk(32 * MiB, 16 * MiB),
                      Chunk(48 * MiB, 5)]


def test_tiny_chunk_size_cannot_be_aligned() -> None:
    assert plan_chunks(10, 4) == [Chunk(0, 4), Chunk(4, 4), Chunk(8, 2)]


def test_min_chunks_splits_a_message_that_fits_one_chunk() -> None:
    chunks = plan_chunks(64 * MiB, 256 * MiB, min_chunks=4)
    assert chunks == [Chunk(i * 16 * MiB, 16 * MiB) for i in range(4)]


def test_min_chunks_does_not_split_below_a_page() -> None:
    assert plan_chunks(PAGE, MiB, min_chunks=8) == [Chunk(0, PAGE)]
    assert [c.length for c in plan_chunks(3 * PAGE, MiB, min_chunks=8)] == [PAGE] * 3


def test_chunk_bytes_is_a_hard_limit_even_when_not_page_aligned() -> None:
    """Options.chunk_bytes promises chunks of *at most* chunk_bytes; rounding up to 4 KiB must
    not break that."""
    chunks = plan_chunks(100_000, 5000)
    assert max(c.length for c in chunks) <= 5000
    assert_exact_cover(chunks, 100_000)
    assert all(c.offset % PAGE == 0 for c in chunks)


def test_min_chunks_is_honoured_when_the_message_has_enough_pages() -> None:
    chunks = plan_chunks(8 * PAGE + 1, MiB, min_chunks=8)
    assert len(chunks) >= 8
    assert_exact_cover(chunks, 8 * PAGE + 1)
    chunks = plan_chunks(100_000, MiB, min_chunks=8)
    assert len(chunks) >= 8


@st.composite
def plans(draw: st.DrawFn, max_chunks: int = 10_000) -> tuple[int, int, int]:
    """(nbytes, chunk_bytes, min_chunks) with plans small enough to materialize."""
    chunk_bytes = draw(st.one_of(st.integers(1, 64 * KiB), st.integers(1, 2**31),
                                 st.sampled_from([PAGE, PAGE + 1, MiB, 16 * MiB])))
    min_chunks = draw(st.integers(1, 64))
    limit = min(2**40, max_chunks * chunk_bytes)
    nbytes = draw(st.one_of(st.integers(0, min(limit, 300 * KiB)), st.integers(0, limit)))
    return nbytes, chunk_bytes, min_chunks


@settings(max_examples=1000, deadline=None)
@given(plans())
def test_plan_invariants(plan: tuple[int, int, int]) -> None:
    nbytes, chunk_bytes, min_chunks = plan
    chunks = plan_chunks(nbytes, chunk_bytes, min_chunks)
    # every byte exactly once, in order, no empty chunk
    assert_exact_cover(chunks, nbytes)
    # never above the configured chunk size
    assert all(c.length <= chunk_bytes for c in chunks)
    # 4 KiB aligned whenever the chunk size allows it
    if chunk_bytes >= PAGE:
        assert all(c.offset % PAGE == 0 for c in chunks)
    # at least min_chunks pieces once every piece can be a page or more
    if nbytes >= min_chunks * PAGE:
        assert len(chunks) >= min_chunks
    # no needless splitting of a message that fits one chunk
    if min_chunks == 1 and nbytes <= chunk_bytes:
        assert len(chunks) == min(1, nbytes)
    # all chunks but the last have the same size (one size, a tail)
    assert len({c.length for c in chunks[:-1]}) <= 1
    # never absurdly many: at most about twice what min_chunks or chunk_bytes require
    if chunks:
        need = max(min_chunks, -(-nbytes // chunk_bytes))
        assert len(chunks) <= max(2 * need + 1, -(-nbytes // PAGE) if chunk_bytes >= PAGE else need)


@settings(max_examples=300, deadline=None)
@given(plans(max_chunks=2000), st.integers(0, 2**48))
def test_planned_chunks_pass_the_bounds_check(plan: tuple[int, int, int], addr: int) -> None:
    nbytes, chunk_bytes, min_chunks = plan
    assume(nbytes > 0)
    chunks = plan_chunks(nbytes, chunk_bytes, min_chunks)
    assert [check_write(addr, nbytes, c) for c in chunks] == [addr + c.offset for c in chunks]
    with pytest.raises(MessageMismatch):
        check_write(addr, nbytes - 1, chunks[-1])


# =============================================================================== check_write
def test_check_write_inside() -> None:
    assert check_write(0x1000, 100, Chunk(0, 100)) == 0x1000
    assert check_write(0x1000, 100, Chunk(40, 60)) == 0x1000 + 40
    assert check_write(0x1000, 100, Chunk(100, 0)) == 0x1000 + 100  # empty write at the very end
    assert check_write(0x1000, 0, Chunk(0, 0)) == 0x1000


@pytest.mark.parametrize("chunk", [Chunk(0, 101), Chunk(1, 100), Chunk(100, 1), Chunk(2**64, 1),
                                   Chunk(-1, 1), Chunk(-100, 100), Chunk(0, -1), Chunk(101, 0)], ids=repr)
def test_check_write_refuses_outside(chunk: Chunk) -> None:
    with pytest.raises(MessageMismatch, match="refusing"):
        check_write(0x1000, 100, chunk)


def test_check_write_refuses_any_write_into_nothing() -> None:
    with pytest.raises(MessageMismatch):
        check_write(0x1000, 0, Chunk(0, 1))


def test_check_write_message_names_the_sizes() -> None:
    with pytest.raises(MessageMismatch) as e:
        check_write(0, 1000, Chunk(900, 200))
    assert "200 B" in str(e.value) and "offset 900" in str(e.value) and "1000 B" in str(e.value)


# =============================================================================== regions
def region(base: int, size: int, ident: object = None, alive: bool = True) -> Region:
    return Region(base, size, ident if ident is not None else ("id", base, size), lambda: alive)


def test_region_geometry() -> None:
    r = region(100, 50)
    assert r.end == 150
    assert r.covers(100, 50) and r.covers(120, 10) and r.covers(149, 1)
    assert not r.covers(99, 2) and not r.covers(140, 11)
    assert r.pinned == 0 and r.inflight == 0


def test_find_needs_base_size_ident_and_life() -> None:
    cache = RegionCache()
    r = region(0x1000, 0x1000, ident="buf-1")
    cache.add(r)
    assert cache.find(0x1000, 0x1000, "buf-1") is r
    assert cache.find(0x1000, 0x2000, "buf-1") is None  # other size: a different allocation
    assert cache.find(0x1000, 0x1000, "buf-2") is None  # same range, other allocation (reuse)
    assert cache.find(0x1800, 0x800, "buf-1") is None  # only exact bases
    assert cache.find(0x3000, 0x1000, "buf-1") is None


def test_find_ignores_dead_allocations() -> None:
    cache = RegionCache()
    state = {"alive": True}
    r = Region(0x1000, 0x100, "x", lambda: state["alive"])
    cache.add(r)
    assert cache.find(0x1000, 0x100, "x") is r
    state["alive"] = False
    assert cache.find(0x1000, 0x100, "x") is None
    assert cache.overlapping(0x1000, 0x100) == [r]  # still cached: it must be evicted before reuse


def test_overlapping_edges() -> None:
    cache = RegionCache()
    a, b, c = region(100, 100), region(200, 50), region(400, 100)
    for r in (c, a, b):
        cache.add(r)
    assert cache.overlapping(0, 100) == []  # ends where a begins
    assert cache.overlapping(0, 101) == [a]
    assert cache.overlapping(250, 150) == []  # the gap between b and c exactly
    assert cache.overlapping(249, 152) == [b, c]
    assert cache.overlapping(150, 0) == [a]  # an empty query is a point
    assert cache.overlapping(200, 0) == [b]
    assert cache.overlapping(0, 1000) == [a, b, c]  # sorted by address
    assert cache.overlapping(120, 10) == [a]  # inside
    assert cache.overlapping(500, 10) == []
    assert cache.overlapping(499, 1) == [c]


def test_add_refuses_overlaps_and_keeps_the_cache_intact() -> None:
    cache = RegionCache()
    a = region(100, 100)
    cache.add(a)
    for bad in (region(100, 100, "other"), region(50, 51), region(199, 10), region(120, 10), region(0, 1000)):
        with pytest.raises(ValueError, match="overlap"):
            cache.add(bad)
    assert len(cache) == 1 and list(cache) == [a]
    cache.add(b := region(200, 10))  # adjacent is fine
    cache.add(z := region(90, 10))
    assert list(cache.overlapping(0, 1000)) == [z, a, b]


def test_remove() -> None:
    cache = RegionCache()
    a, b = region(100, 100), region(300, 100)
    cache.add(a)
    cache.add(b)
    cache.remove(region(100, 100))  # an equal-looking region that is not the cached one
    assert len(cache) == 2
    cache.remove(a)
    assert len(cache) == 1 and cache.find(100, 100, ("id", 100, 100)) is None
    cache.remove(a)  # twice: no error
    assert cache.overlapping(0, 1000) == [b]
    a2 = region(50, 200, "new")  # the freed range can be reused
    cache.add(a2)
    assert cache.overlapping(0, 1000) == [a2, b]


def test_iteration_is_a_snapshot() -> None:
    """Engine.trim removes regions while iterating over the cache."""
    cache = RegionCache()
    regions = [region(i * 100, 50) for i in range(5)]
    for r in regions:
        cache.add(r)
    for r in cache:
        cache.remove(r)
    assert len(cache) == 0 and cache.overlapping(0, 10_000) == []


def test_zero_size_region_still_blocks_its_address() -> None:
    """A zero-byte region (an empty tensor's storage) must not let a second region take its base:
    two regions at one base would corrupt the sorted index."""
    cache = RegionCache()
    empty = region(0x1000, 0, "empty")
    cache.add(empty)
    assert cache.overlapping(0x1000, 16) == [empty]
    with pytest.raises(ValueError):
        cache.add(region(0x1000, 16, "other"))
    cache.remove(empty)
    cache.add(r := region(0x1000, 16, "other"))
    assert cache.overlapping(0, 0x2000) == [r]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 2000), st.integers(1, 100)), max_size=40),
       st.lists(st.tuples(st.integers(0, 2200), st.integers(0, 300)), max_size=20),
       st.randoms(use_true_random=False))
def test_overlapping_against_brute_force(adds: list[tuple[int, int]], queries: list[tuple[int, int]],
                                         rnd: random.Random) -> None:
    cache = RegionCache()
    kept: list[Region] = []
    for base, size in adds:
        r = region(base, size)
        clash = any(base < k.end and k.base < base + size for k in kept)
        if clash:
            with pytest.raises(ValueError):
                cache.add(r)
        else:
            cache.add(r)
            kept.append(r)
        if kept and rnd.random() < 0.2:
            victim = kept.pop(rnd.randrange(len(kept)))
            cache.remove(victim)
    assert len(cache) == len(kept)
    assert {id(r) for r in cache} == {id(r) for r in kept}
    for base, size in queries:
        end = base + max(size, 1)
        want = sorted((k for k in kept if base < k.end and k.base < end), key=lambda k: k.base)
        assert cache.overlapping(base, size) == want
    for k in kept:
        assert cache.find(k.base, k.size, k.ident) is k


# =============================================================================== plan_copies
def test_plan_copies_of_one_piece_checks_the_announced_capacity() -> None:
    assert plan_copies(0x10, 0x2000, 100, 1 << 20, 100) == [(0x10, 0x2000, 100)]
    assert plan_copies(0x10, 0x2000, 100, 1 << 20) == [(0x10, 0x2000, 100)]  # a pull: nothing to check
    assert plan_copies(0x10, 0x2000, 0, 1 << 20, 0) == []
    with pytest.raises(MessageMismatch, match="holds only 99 B"):
        plan_copies(0x10, 0x2000, 100, 1 << 20, 99)


def test_plan_copies_in_chunks_cover_the_message_and_stay_inside_the_destination() -> None:
    n, chunk = 10 * 4096 + 7, 4 * 4096
    pieces = plan_copies(0x1000, 0x8000, n, chunk, n)
    assert sum(k for _, _, k in pieces) == n and all(k <= chunk for _, _, k in pieces)
    assert all(remote - 0x8000 == local - 0x1000 for local, remote, _ in pieces)
    with pytest.raises(MessageMismatch):
        plan_copies(0x1000, 0x8000, n, chunk, n - 1)
