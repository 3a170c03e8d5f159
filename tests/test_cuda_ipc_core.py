"""The CUDA IPC plane's pure parts, without a GPU: descriptor packing, the bounds every copy
must pass, and the path choice that puts the "cuda" link on it (tests/test_cuda.py runs the plane
itself on a GPU)."""

from __future__ import annotations

from typing import Any

import pytest

from aiomooncake.core.negotiation import link_for, plan_links, roles
from aiomooncake.errors import TransferFailed
from aiomooncake.planes.cuda_ipc import DESC_BYTES, SegmentDesc, pack_desc, translate, unpack_desc

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
    assert translate(pieces, DESC, local) == [(0xA000, local, 4096),
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
        translate([(0xA000, remote, n)], DESC, 0x1000_0000)


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
