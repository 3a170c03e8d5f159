"""Wrong arguments raise like gloo does (same exception families, but at once), size mismatches fail
both sides, collectives point to per-device backend strings, and those strings work."""

from __future__ import annotations

import datetime
import time
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.distributed as dist
from test_torch_harness import Ctx, must, no_children_left, run_ranks
from torch._C._distributed_c10d import TCPStore

from aiomooncake.torch import BackendError, InvalidArgument


def _try(fn: Callable[[], Any]) -> dict[str, Any]:
    t0 = time.monotonic()
    try:
        fn()
    except Exception as e:
        return {"runtime": isinstance(e, RuntimeError), "value": isinstance(e, ValueError),
                "type": isinstance(e, TypeError), "index": isinstance(e, IndexError),
                "name": type(e).__name__, "secs": time.monotonic() - t0, "msg": str(e)[:200]}
    return {"name": "no error", "secs": time.monotonic() - t0}


def bad_arguments(ctx: Ctx) -> dict[str, Any]:
    out: dict[str, Any] = {}
    t = torch.arange(4, dtype=torch.float32)
    g = dist.group.WORLD
    # both ranks run every case, so gloo's slow bad-rank failure delays both alike
    me, peer = ctx.rank, 1 - ctx.rank
    out["bad_rank"] = _try(lambda: must(dist.isend(t, ctx.world)).wait())
    out["neg_tag"] = _try(lambda: dist.isend(t, peer, tag=-1))
    out["noncontig"] = _try(lambda: dist.isend(torch.zeros(4, 4).t(), peer, tag=3))
    out["noncontig_recv"] = _try(lambda: dist.irecv(torch.zeros(4, 4).t(), peer, tag=3))
    out["two_tensors"] = _try(lambda: must(g).send([t, t], peer, 0))
    if ctx.backend != "gloo":  # gloo raises NotImplementedError here, then crashes (double free)
        out["sparse"] = _try(lambda: dist.isend(torch.zeros(3, 3).to_sparse(), peer, tag=8))
    out["not_tensor"] = _try(lambda: dist.isend([t], peer))  # type: ignore[arg-type]
    out["p2pop_send"] = _try(lambda: dist.P2POp(dist.send, t, peer))
    out["p2pop_allreduce"] = _try(lambda: dist.P2POp(dist.all_reduce, t, peer))
    out["batch_not_ops"] = _try(lambda: dist.batch_isend_irecv([1]))  # type: ignore[list-item]
    out["batch_empty"] = _try(lambda: dist.batch_isend_irecv([]))
    out["send_self"] = _try(lambda: dist.send(t, me))
    # (gloo also fails recv from oneself, "pair is not connected"; here a send to oneself is a
    # valid isend, as with NCCL, so that recv would simply wait for it: see test_self_p2p)
    dist.barrier()
    # the group still works after all that
    if ctx.rank == 0:
        dist.send(t, 1, tag=1)
    else:
        b = torch.zeros(4)
        dist.recv(b, 0, tag=1)
        out["after"] = b.tolist()
    return out


# What gloo raises for each case of bad_arguments (the exception's name and its families among
# RuntimeError / ValueError / TypeError / IndexError), recorded from torch 2.13.0's gloo, three runs
# alike. The yardstick is pinned because gloo itself sometimes segfaults on these bad arguments
# (six crashed runs in a row once in CI, 2026-12-02); test_gloo_still_raises_as_recorded checks it
# against the live gloo whenever gloo survives.
GLOO_BAD_ARGUMENTS: dict[str, tuple[str, set[str]]] = {
    "bad_rank": ("DistStoreError", {"runtime"}),
    "neg_tag": ("RuntimeError", {"runtime"}),
    "noncontig": ("RuntimeError", {"runtime"}),
    "noncontig_recv": ("RuntimeError", {"runtime"}),
    "two_tensors": ("RuntimeError", {"runtime"}),
    "not_tensor": ("TypeError", {"type"}),
    "p2pop_send": ("ValueError", {"value"}),
    "p2pop_allreduce": ("ValueError", {"value"}),
    "batch_not_ops": ("ValueError", {"value"}),
    "batch_empty": ("IndexError", {"index"}),
    "send_self": ("ValueError", {"value"}),
}
FAMILIES = ("runtime", "value", "type", "index")


def test_bad_arguments_raise_like_gloo() -> None:
    ours = run_ranks(bad_arguments, 2, group_timeout=3.0).results
    assert ours[1]["after"] == [0.0, 1.0, 2.0, 3.0]
    assert set(GLOO_BAD_ARGUMENTS) <= set(ours[0]), sorted(ours[0])
    for case, (_, families) in GLOO_BAD_ARGUMENTS.items():
        mine = ours[0][case]
        assert mine["name"] != "no error", case
        for family in families:
            assert mine[family], (case, family, mine)
        assert mine["secs"] < 1.0, (case, mine)  # at once, never after a timeout
    assert ours[0]["sparse"]["runtime"] and ours[0]["sparse"]["secs"] < 1.0
    assert ours[0]["bad_rank"]["name"] == "InvalidArgument" and ours[0]["bad_rank"]["value"]
    assert ours[0]["neg_tag"]["msg"] == "Tag must be nonnegative"
    assert ours[0]["noncontig"]["msg"] == "input tensor has to be contiguous"
    assert no_children_left()


def test_gloo_still_raises_as_recorded() -> None:
    """The pinned yardstick is what this torch's gloo does (a crashed gloo run is retried once;
    if gloo crashes both times there is nothing to compare, and the test says so)."""
    for attempt in range(2):
        try:
            ref = run_ranks(bad_arguments, 2, backend="gloo", group_timeout=3.0, timeout=120).results
            break
        except pytest.fail.Exception:
            if attempt == 1:
                pytest.skip("gloo crashed on the bad arguments twice (a gloo bug): nothing to compare")
    assert ref[1]["after"] == [0.0, 1.0, 2.0, 3.0]
    live = {case: (r["name"], {f for f in FAMILIES if r.get(f)}) for case, r in ref[0].items()}
    assert live == GLOO_BAD_ARGUMENTS


def size_mismatch(ctx: Ctx) -> dict[Any, Any]:
    out: dict[Any, Any] = {}  # keyed by tag
    for n_send, n_recv, tag in ((8, 4, 1), (100_000, 50_000, 2)):  # eager and rendezvous sizes
        if ctx.rank == 0:
            w = dist.isend(torch.ones(n_send), 1, tag=tag)
            assert w is not None
        else:
            w = dist.irecv(torch.zeros(n_recv), 0, tag=tag)
            assert w is not None
        try:
            w.wait()
            out[tag] = "no error"
        except BackendError as e:
            out[tag] = ["differ in size" in str(e), w.is_success()]
    dist.barrier()
    return out


def test_size_mismatch_fails_both_sides() -> None:
    # (gloo aborts the receiving process on this; we raise on both sides and stay usable)
    res = run_ranks(size_mismatch, 2).results
    for rank in (0, 1):
        assert res[rank] == {1: [True, False], 2: [True, False]}, (rank, res[rank])


def collectives(ctx: Ctx) -> dict[str, Any]:
    out: dict[str, Any] = {}
    t = torch.full((3,), float(ctx.rank + 1))
    try:
        dist.all_reduce(t)
        out["all_reduce"] = t.tolist()
    except NotImplementedError as e:
        out["all_reduce"] = ["NotImplementedError", "cpu:gloo,cuda:aiomooncake" in str(e)]
    objs: list[Any] = [{"rank": ctx.rank}] if ctx.rank == 0 else [None]
    try:
        dist.broadcast_object_list(objs, src=0)
        out["broadcast_object"] = objs[0]
    except NotImplementedError:
        out["broadcast_object"] = "NotImplementedError"
    # P2P and barrier always run on aiomooncake
    peer = 1 - ctx.rank
    b = torch.zeros(3)
    for w in dist.batch_isend_irecv([dist.P2POp(dist.irecv, b, peer), dist.P2POp(dist.isend, t * 10, peer)]):
        w.wait()
    out["p2p"] = b.tolist()
    out["group"] = type(dist.group.WORLD).__name__
    out["backend"] = str(dist.get_backend())
    dist.barrier()
    return out


def test_collectives_explain_and_mixed_strings_work() -> None:
    alone = run_ranks(collectives, 2).results
    assert alone[0]["all_reduce"] == ["NotImplementedError", True]
    assert alone[0]["broadcast_object"] == "NotImplementedError"
    assert alone[0]["p2p"] == [20.0] * 3 and alone[1]["p2p"] == [10.0] * 3
    mixed = run_ranks(collectives, 2, backend="cpu:gloo,cuda:aiomooncake").results
    assert mixed[0]["all_reduce"] == [3.0] * 3 and mixed[1]["all_reduce"] == [3.0] * 3
    assert mixed[1]["broadcast_object"] == {"rank": 0}
    assert mixed[0]["p2p"] == [30.0] * 3 and mixed[1]["p2p"] == [30.0] * 3
    assert mixed[0]["group"] == "ProcessGroupAiomooncake"
    assert mixed[0]["backend"] == "cpu:gloo,cuda:aiomooncake"


def test_invalid_argument_is_both_families() -> None:
    e = InvalidArgument("x")
    assert isinstance(e, ValueError) and isinstance(e, RuntimeError) and isinstance(e, dist.DistError)


def self_p2p(ctx: Ctx) -> list[float]:
    b = torch.zeros(3)
    recv = dist.irecv(b, ctx.rank, tag=4)
    assert recv is not None
    must(dist.isend(torch.full((3,), float(ctx.rank + 7)), ctx.rank, tag=4)).wait()
    recv.wait()
    return b.tolist()


def test_self_p2p() -> None:
    # isend/irecv to oneself work (gloo fails them; NCCL allows them)
    assert run_ranks(self_p2p, 2).results == {0: [7.0] * 3, 1: [8.0] * 3}


def bad_op_mid_batch(ctx: Ctx) -> dict[str, Any]:
    """Rank 0's batch fails at its second op; its first op, queued without waking the loop (more
    ops were to follow), must still go out before rank 0 touches the group again."""
    store = TCPStore("127.0.0.1", ctx.port, is_master=False,
                          timeout=datetime.timedelta(seconds=30))
    out: dict[str, Any] = {}
    if ctx.rank == 0:
        good = torch.arange(6, dtype=torch.float32)
        bad = torch.zeros(4, 4).t()  # not contiguous: the backend refuses it
        out["batch"] = _try(lambda: dist.batch_isend_irecv(
            [dist.P2POp(dist.isend, good, 1, tag=5), dist.P2POp(dist.isend, bad, 1, tag=6)]))
        store.wait(["rank1-got-it"])  # nothing else of the group's until rank 1 has the tensor
    else:
        b = torch.zeros(6)
        try:
            # ours takes seconds as well as a timedelta
            must(dist.irecv(b, 0, tag=5)).wait(timeout=20)  # type: ignore[arg-type]
            out["got"] = b.tolist()
        finally:
            store.set("rank1-got-it", "1")
    dist.barrier()
    return out


def test_a_bad_op_mid_batch_does_not_strand_the_ops_before_it() -> None:
    res = run_ranks(bad_op_mid_batch, 2).results
    assert res[0]["batch"]["name"] == "InvalidArgument"
    assert res[1]["got"] == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
