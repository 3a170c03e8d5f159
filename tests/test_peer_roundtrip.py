"""Roundtrips through a peer in another process over the real Transfer Engine (loopback TCP).

Every test sends tensors to the remote, which receives them (``recv_tensor`` or ``recv``) and
sends them back or checks them against the same deterministic pattern; bytes are compared bit-exactly.
Which path a message took is checked with the engine's write counter: an eager message (<= the
eager threshold, 64 KiB) costs no engine write, a rendezvous one at least one.
"""

from __future__ import annotations

import pytest
import torch
from harness import (
    ALL_DTYPES,
    EAGER_THRESHOLD,
    GiB,
    KiB,
    MiB,
    Remote,
    as_bytes,
    do,
    dtype_name,
    element_size,
    filled,
    make_tensor,
    same_bytes,
    spec,
    u8,
    untouched,
    writes_submitted,
)

SIZES = [0, 1, 3, 4097, 12345, EAGER_THRESHOLD - 1, EAGER_THRESHOLD, EAGER_THRESHOLD + 1, 1 * MiB + 7,
         1 * MiB, 64 * MiB]


def took_expected_path(nbytes: int, writes: int) -> bool:
    """Eager (<= threshold) messages cost no engine write; rendezvous ones at least one (the chunk
    size is the core's choice per transport)."""
    return writes == 0 if nbytes <= EAGER_THRESHOLD else writes >= 1


async def echo_roundtrip(remote: Remote, src: torch.Tensor, timeout: float = 60.0,
                         options: dict[str, object] | None = None) -> torch.Tensor:
    """Send ``src``, let the remote ``recv_tensor`` it and send it back into a sentinel buffer
    (allocated up front: filling a huge one must not stall the event loop while connected)."""
    back = filled(src.shape, src.dtype)
    async with remote.scenario("echo", options=options) as sc:
        w0 = writes_submitted()
        await sc.peer.send(src)
        sent_writes = writes_submitted() - w0
        got = await sc.peer.recv(back)
        assert got is back
        (info,) = await sc.result(timeout)
    nbytes = src.numel() * src.element_size()
    assert took_expected_path(nbytes, sent_writes), f"our send of {nbytes} B took {sent_writes} writes"
    assert took_expected_path(nbytes, info["writes"]), f"the remote's send took {info['writes']} writes"
    assert info["dtype"] == dtype_name(src.dtype)
    assert tuple(info["shape"]) == tuple(src.shape)
    assert info["contiguous"] and info["device"] == "cpu"
    return back


@pytest.mark.parametrize("nbytes", SIZES)
async def test_roundtrip_sizes(remote: Remote, nbytes: int) -> None:
    src = make_tensor(u8(nbytes, seed=nbytes))
    back = await echo_roundtrip(remote, src)
    assert same_bytes(back, src)


@pytest.mark.slow
async def test_roundtrip_1gib(remote: Remote) -> None:
    """1 GiB out and back (64 chunks per direction, 4 in flight)."""
    src = make_tensor(u8(1 * GiB, seed=11))
    # A roomy heartbeat: allocating and page-faulting 1 GiB on a loaded 2-core machine can keep
    # either process from answering pings for longer than the default 2 s.
    back = await echo_roundtrip(remote, src, timeout=300,
                                options={"heartbeat_interval": 1.0, "heartbeat_timeout": 15.0})
    assert same_bytes(back, src)
    del back, src


def _dtype_id(dt: torch.dtype) -> str:
    return dtype_name(dt)


@pytest.mark.parametrize("path", ["eager", "rendezvous"])
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=_dtype_id)
async def test_roundtrip_every_dtype(remote: Remote, dtype: torch.dtype, path: str) -> None:
    """Every dtype torch has (quantized ones excepted, see harness.SKIPPED_DTYPES), in a 3-D shape,
    on both paths: the remote recv_tensor()s it (so it must rebuild the dtype from its name) and
    sends it back; our recv() fills a preallocated tensor. Random bytes include NaN payloads,
    signalling NaNs, -0.0 and subnormals, which must survive bit-exactly."""
    es = element_size(dtype)
    shape = (2, 3, 5) if path == "eager" else (4, 130, -(-EAGER_THRESHOLD // (4 * 130 * es)) + 1)
    src = make_tensor(spec(dtype, shape, seed=hash(dtype_name(dtype)) % 1000))
    assert (src.numel() * es > EAGER_THRESHOLD) == (path == "rendezvous")
    back = await echo_roundtrip(remote, src)
    assert same_bytes(back, src)


@pytest.mark.parametrize("shape", [(), (1,), (0,), (0, 7), (3, 0, 2), (1, 1, 1, 1)], ids=str)
async def test_roundtrip_degenerate_shapes(remote: Remote, shape: tuple[int, ...]) -> None:
    """0-d scalars and empty tensors keep their exact shape."""
    src = make_tensor(spec(torch.float64, shape, seed=5))
    back = await echo_roundtrip(remote, src)
    assert same_bytes(back, src)


@pytest.mark.parametrize("path", ["eager", "rendezvous"])
async def test_recv_tensor(remote: Remote, path: str) -> None:
    """recv_tensor() allocates a CPU tensor of the sender's dtype and shape, each message its own."""
    n = 16 if path == "eager" else 40_000
    specs = [spec(torch.float32, (n, 2), seed=1), spec(torch.int16, (3, n), seed=2),
             spec(torch.complex64, (n,), seed=3), spec(torch.bool, (n, 1, 9), seed=4)]
    steps = [do.send(7, sp) for sp in specs]
    async with remote.scenario(steps=steps) as sc:
        got = [await sc.peer.recv_tensor(7), await sc.peer.recv_tensor(7, device="cpu"),
               await sc.peer.recv_tensor(7, device=torch.device("cpu")), await sc.peer.recv_tensor(tag=7)]
        sent = await sc.result()
    assert all(o["ok"] for o in sent)
    for t, sp in zip(got, specs, strict=True):
        assert t.device.type == "cpu" and t.is_contiguous()
        assert same_bytes(t, make_tensor(sp))
    ptrs = {t.untyped_storage().data_ptr() for t in got}
    assert len(ptrs) == len(got), "recv_tensor() results share memory"


@pytest.mark.parametrize("path", ["eager", "rendezvous"])
async def test_noncontiguous_source_is_sent_as_contiguous(remote: Remote, path: str) -> None:
    """Documented: a non-contiguous tensor is sent as its contiguous copy (same shape, logical
    element order). The source itself is not modified."""
    cols = 8 if path == "eager" else 20_000
    base = make_tensor(spec(torch.float32, (cols, 6), seed=9))
    src = base.t()[::2]  # shape (3, cols), strides (2, 6): non-contiguous
    assert not src.is_contiguous()
    before = as_bytes(base).clone()
    back = await echo_roundtrip(remote, src)
    assert tuple(back.shape) == tuple(src.shape)
    assert same_bytes(back, src.contiguous())
    assert torch.equal(as_bytes(base), before)


@pytest.mark.parametrize("path", ["eager", "rendezvous"])
async def test_expanded_source_is_sent_materialized(remote: Remote, path: str) -> None:
    """A stride-0 (expanded) tensor is sent as its contiguous copy: every element materialized."""
    n = 10 if path == "eager" else 40_000
    row = make_tensor(spec(torch.float32, (1, 7), seed=17))
    src = row.expand(n, 7)
    assert src.stride() == (0, 1)
    back = await echo_roundtrip(remote, src)
    assert same_bytes(back, src.contiguous())


@pytest.mark.parametrize("path", ["eager", "rendezvous"])
async def test_noncontiguous_destination(remote: Remote, path: str) -> None:
    """Documented: recv into a non-contiguous tensor fills it (through a contiguous temporary) in
    logical element order, returns that same tensor, and leaves the memory between its elements alone."""
    rows = 4 if path == "eager" else 3000
    sp = spec(torch.int32, (rows, 8), seed=13)
    assert (rows * 8 * 4 > EAGER_THRESHOLD) == (path == "rendezvous")
    async with remote.scenario(steps=[do.send(3, sp)]) as sc:
        big = filled((rows, 16), torch.int32)
        dest = big[:, ::2]
        assert not dest.is_contiguous()
        got = await sc.peer.recv(dest, 3)
        (sent,) = await sc.result()
    assert sent["ok"]
    assert got is dest
    assert same_bytes(dest.contiguous(), make_tensor(sp))
    assert untouched(big[:, 1::2]), "bytes between the destination's elements were overwritten"


async def test_same_numel_other_shape(remote: Remote) -> None:
    """Only dtype and element count must agree: a (4, 6) message fills a (2, 12) or (24,) tensor in
    element order."""
    sp = spec(torch.float16, (4, 6), seed=21)
    async with remote.scenario(steps=[do.send(0, sp), do.send(0, sp)]) as sc:
        a = await sc.peer.recv(filled((2, 12), torch.float16))
        b = await sc.peer.recv(filled((24,), torch.float16))
        sent = await sc.result()
    assert all(o["ok"] for o in sent)
    want = as_bytes(make_tensor(sp))
    assert torch.equal(as_bytes(a), want) and torch.equal(as_bytes(b), want)
    assert a.shape == (2, 12) and b.shape == (24,)


@pytest.mark.parametrize("nbytes", [100, 1 * MiB])
async def test_remote_checks_what_we_send(remote: Remote, nbytes: int) -> None:
    """One direction only: the remote recv()s into a preallocated tensor and compares it with the
    pattern itself (so a symmetric corruption on the way out and back cannot cancel out)."""
    sp = spec(torch.uint8, (nbytes,), seed=77)
    async with remote.scenario(steps=[do.recv(1, sp), do.recv(2, sp)]) as sc:
        await sc.peer.send(make_tensor(sp), 1)
        await sc.peer.send(make_tensor(sp), 2)
        results = await sc.result()
    assert [r["ok"] for r in results] == [True, True]
    assert [r["match"] for r in results] == [True, True]


async def test_many_sizes_one_connection(remote: Remote) -> None:
    """Alternating eager and rendezvous messages on one connection stay in order and intact."""
    sizes = [1, 70 * KiB, 5, 2 * MiB, 0, EAGER_THRESHOLD + 1, EAGER_THRESHOLD]
    async with remote.scenario("echo", count=len(sizes)) as sc:
        for i, n in enumerate(sizes):
            src = make_tensor(u8(n, seed=100 + i))
            await sc.peer.send(src)
            back = await sc.peer.recv_tensor()
            assert same_bytes(back, src), f"message {i} ({n} B) came back different"
        infos = await sc.result()
    assert [i["shape"][0] for i in infos] == sizes
