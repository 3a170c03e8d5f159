"""The descriptor broker behind CUDA virtual-memory sharing (expandable segments), without a GPU:
it hands over (SCM_RIGHTS) only descriptors it exported, only to a caller with its key."""

from __future__ import annotations

import multiprocessing as mp
import os
from collections.abc import Iterator
from typing import Any

import pytest

from aiomooncake.errors import TransferFailed
from aiomooncake.planes import cuda_vmm


@pytest.fixture
def broker() -> Iterator[tuple[cuda_vmm.Broker, int, int]]:
    exports = cuda_vmm.Exports()
    r, w = os.pipe()
    exports.granted.add(w)  # what exporting a chunk does with its descriptor
    b = cuda_vmm.Broker(exports)
    yield b, r, w
    os.close(r)
    os.close(w)


def _fetch_in_child(name: str, key: bytes, fds: list[int], q: Any) -> None:
    try:
        got = cuda_vmm.fetch(name, key, fds)
        os.write(got[0], b"hello from the child")
        q.put("ok")
    except TransferFailed as e:
        q.put(f"refused: {e}")


def test_a_granted_descriptor_reaches_another_process(broker: tuple[cuda_vmm.Broker, int, int]) -> None:
    b, r, w = broker
    info = b.info()
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_fetch_in_child, args=(info["name"], info["key"], [w], q))
    p.start()
    assert q.get(timeout=30) == "ok"
    p.join(30)
    assert os.read(r, 100) == b"hello from the child"  # it wrote through the descriptor it got
    assert b.served == 1


def test_a_wrong_key_or_an_unexported_descriptor_is_refused(broker: tuple[cuda_vmm.Broker, int, int]) -> None:
    b, r, w = broker
    info = b.info()
    with pytest.raises(TransferFailed, match="refused"):
        cuda_vmm.fetch(info["name"], bytes(16), [w])
    with pytest.raises(TransferFailed, match="refused"):
        cuda_vmm.fetch(info["name"], info["key"], [r])  # never exported
    assert b.served == 0


def test_a_missing_broker_is_a_transfer_failure() -> None:
    with pytest.raises(TransferFailed, match="network namespace"):
        cuda_vmm.fetch("aiomooncake-ipc-no-such-broker", bytes(16), [3], timeout=1.0)
