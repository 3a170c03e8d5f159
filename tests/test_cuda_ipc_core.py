"""The CUDA IPC plane's pure parts, without a GPU: descriptor packing, the bounds every copy
must pass, and the path choice that puts the "cuda" link on it (tests/test_cuda.py runs the plane
itself on a GPU)."""

from __future__ import annotations

from typing import Any

import pytest

from aiomooncake.core.negotiation import link_for, plan_links, roles
from aiomooncake.errors import TransferFailed
from aiomooncake.planes.cuda_ipc import (
    DESC_BYTES,
    SegmentDesc,
    VmmDesc,
    pack_desc,
    ranges_of,
    translate,
    unpack_desc,
)

DESC = SegmentDesc(bytes(range(64)), 0x7F00_0000_0000, 20 << 20, 42)


def test_a_descriptor_round_trips() -> None:
    blob = pack_desc(DESC)
    assert len(blob) == DESC_BYTES and unpack_desc(blob) == DESC


@pytest.mark.parametrize("bad", [b"", b"x" * (DESC_BYTES - 1), b"x" * (DESC_BYTES + 1), None, 7,
                                 "a" * DESC_BYTES, pack_desc(SegmentDesc(DESC.handle, DESC.base, 0, 42))],
                         ids=["empty", "short", "long", "none", "int", "str", "zero-size"])
def test_malformed_descriptors_are_refused(bad: Any) -> None:
    with pytest.raises(TransferFailed):
        unpack_desc(bad)


def test_handles_have_64_bytes() -> None:
    with pytest.raises(ValueError):
        pack_desc(SegmentDesc(b"short", 0, 1, 0))


def test_copies_are_translated_into_the_local_mapping() -> None:
    local = 0x1000_0000
    pieces = [(0xA000, DESC.base, 4096), (0xB000, DESC.base + DESC.size - 8, 8)]
    assert translate(pieces, DESC, ranges_of(DESC, [local])) == [(0xA000, local, 4096),
                                                                 (0xB000, local + DESC.size - 8, 8)]


@pytest.mark.parametrize("remote,n", [
    (DESC.base - 1, 8),  # starts before the segment
    (DESC.base + DESC.size - 7, 8),  # ends one byte past it
    (DESC.base + DESC.size, 1),  # wholly after it
    (0, 16),  # somewhere else entirely
    (DESC.base, -1),  # a negative length
])
def test_a_copy_outside_the_announced_segment_is_refused(remote: int, n: int) -> None:
    with pytest.raises(TransferFailed, match="outside the remote segment"):
        translate([(0xA000, remote, n)], DESC, ranges_of(DESC, [0x1000_0000]))


MiB = 1 << 20
VMM = VmmDesc(0x7F00_0000_0000 + 3 * MiB, 50 * MiB,  # a tensor 3 MiB into the first of three chunks
              ((7, 0x7F00_0000_0000, 20 * MiB, 1), (8, 0x7F00_0000_0000 + 20 * MiB, 20 * MiB, 2),
               (9, 0x7F00_0000_0000 + 40 * MiB, 20 * MiB, 3)))


def test_a_virtual_memory_descriptor_round_trips() -> None:
    assert unpack_desc(pack_desc(VMM)) == VMM


@pytest.mark.parametrize("chunks", [
    ((7, 0x1000, 4096, 1), (8, 0x3000, 4096, 2)),  # a gap between chunks
    ((7, 0x1000, 4096, 1), (8, 0x1000, 4096, 2)),  # overlapping chunks
    ((7, 0x1000, 0, 1),),  # an empty chunk
    ((7, 0x2000, 4096, 1),),  # not covering the span's start
], ids=["gap", "overlap", "empty", "short"])
def test_virtual_memory_descriptors_must_cover_their_span(chunks: Any) -> None:
    with pytest.raises(TransferFailed):
        unpack_desc(pack_desc(VmmDesc(0x1000, 4096, chunks)))


def test_a_copy_across_chunks_is_split_where_the_mappings_are_not_contiguous() -> None:
    locals_ = [0xA0_0000_0000, 0xB0_0000_0000, 0xC0_0000_0000]  # each chunk mapped on its own here
    ranges = ranges_of(VMM, locals_)
    out = translate([(0x5000_0000, VMM.base, VMM.size)], VMM, ranges)
    assert out == [(0x5000_0000, locals_[0] + 3 * MiB, 17 * MiB),
                   (0x5000_0000 + 17 * MiB, locals_[1], 20 * MiB),
                   (0x5000_0000 + 37 * MiB, locals_[2], 13 * MiB)]
    assert sum(n for _, _, n in out) == VMM.size
    with pytest.raises(TransferFailed, match="outside"):
        translate([(0, VMM.base + VMM.size - 4, 8)], VMM, ranges)


def _info(caps: list[str], host: str = "h", transport: str = "auto",
          gpu: str | None = "GPU-0") -> dict[str, Any]:
    d: dict[str, Any] = {"caps": caps, "transport": transport, "host_id": host}
    if gpu is not None:
        d["gpu"] = gpu
    return d


IPC = ["cuda-ipc", "nvlink", "tcp"]


def test_same_host_cuda_peers_take_the_ipc_plane() -> None:
    assert plan_links(_info(IPC), _info(IPC)) == {"cpu": "tcp", "cuda": "cuda-ipc"}


def test_the_ipc_plane_needs_both_sides_and_one_host() -> None:
    assert plan_links(_info(IPC), _info(["nvlink", "tcp"]))["cuda"] == "nvlink"
    assert plan_links(_info(IPC, host="a"), _info(IPC, host="b"))["cuda"] == "tcp"


def test_a_forced_engine_transport_keeps_the_engine() -> None:
    assert plan_links(_info(IPC, transport="nvlink"), _info(IPC))["cuda"] == "nvlink"
    assert plan_links(_info(IPC, transport="tcp"), _info(IPC)) == {"cpu": "tcp", "cuda": "tcp"}


def test_forcing_cuda_ipc_where_impossible_fails() -> None:
    from aiomooncake.errors import HandshakeError

    with pytest.raises(HandshakeError, match="cuda-ipc"):
        plan_links(_info(IPC, transport="cuda-ipc"), _info(["nvlink", "tcp"]))
    assert plan_links(_info(IPC, transport="cuda-ipc"), _info(IPC))["cuda"] == "cuda-ipc"


def test_one_gpu_one_copier_different_gpus_the_receiver_pulls() -> None:
    plan = {"cpu": "shm", "cuda": "cuda-ipc"}
    a, b = {"cuda-ipc": "ipc:100", "shm": "pid:100"}, {"cuda-ipc": "ipc:200", "shm": "pid:200"}
    ra = roles(plan, _info(IPC), _info(IPC), a, b)
    rb = roles(plan, _info(IPC), _info(IPC), b, a)
    assert ra["cuda"] in ((True, False), (False, True)) and rb["cuda"] == tuple(not x for x in ra["cuda"])
    assert ra["cpu"] == rb["cpu"] == (True, True)
    other = _info(IPC, gpu="GPU-1")
    assert roles(plan, _info(IPC), other, a, b)["cuda"] == (True, True)
    assert roles(plan, _info(IPC), _info(IPC), a, b, one_copier=False)["cuda"] == (True, True)


def test_messages_take_the_cuda_link_only_between_cuda_tensors() -> None:
    links = {"cpu": 0, "cuda": 0}
    assert link_for("cuda", "cuda", links) == "cuda"
    assert link_for("cuda", "cpu", links) == "cpu" and link_for("cpu", "cuda", links) == "cpu"
