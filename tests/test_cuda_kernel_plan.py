"""The copy kernel's launch plan (pure: no GPU needed)."""

from __future__ import annotations

import pytest

from aiomooncake.planes.cuda_kernel import CHUNK, GROUP, _Params, chunk_starts, groups


def test_chunk_starts_cover_every_byte_once() -> None:
    sizes = [1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK, 7]
    starts = chunk_starts(sizes)
    assert starts == [0, 1, 2, 3, 5, 8, 9]
    for i, n in enumerate(sizes):  # the last chunk of a copy holds its remainder, never nothing
        chunks = starts[i + 1] - starts[i]
        assert (chunks - 1) * CHUNK < n <= chunks * CHUNK


def test_chunk_starts_of_a_small_chunk() -> None:
    assert chunk_starts([10, 11, 1], chunk=5) == [0, 2, 5, 6]


@pytest.mark.parametrize("n", [0, 1, GROUP - 1, GROUP, GROUP + 1, 5 * GROUP + 3])
def test_groups_split_every_copy_into_one_launch(n: int) -> None:
    gs = groups(n)
    assert all(0 < end - first <= GROUP for first, end in gs)
    assert [i for first, end in gs for i in range(first, end)] == list(range(n))


def test_the_launch_argument_fits_the_kernel_parameter_limit() -> None:
    import ctypes

    assert ctypes.sizeof(_Params) <= 4096  # what every architecture accepts without CUDA 12.1's 32 KiB
