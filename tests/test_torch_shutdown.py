"""Clean shutdown: destroy_process_group() with operations pending fails them promptly and stops the
loop thread; a process that never calls it still exits promptly; the group can be re-created."""

from __future__ import annotations

import datetime
import threading
import time
from typing import Any

import torch
import torch.distributed as dist
from test_torch_harness import HOST, Ctx, no_children_left, run_ranks
from torch._C._distributed_c10d import TCPStore

from aiomooncake.torch import BackendError, LoopThread


def _loop_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name == "aiomooncake-loop"]


def destroy_with_pending(ctx: Ctx) -> dict[str, Any]:
    out: dict[str, Any] = {"threads_before": _loop_threads()}
    peer = 1 - ctx.rank
    works = {
        "recv": dist.irecv(torch.zeros(16), peer, tag=1),  # the peer never sends these
        "send": dist.isend(torch.zeros(1 << 20), peer, tag=2),  # ...nor receives this one
        "any": dist.irecv(torch.zeros(4), None, tag=3),
    }
    dist.barrier()  # both ranks have everything posted
    t0 = time.monotonic()
    dist.destroy_process_group()
    out["destroy_secs"] = time.monotonic() - t0
    for name, w in works.items():
        assert w is not None
        try:
            w.wait(datetime.timedelta(seconds=10))
            out[name] = "no error"
        except BackendError as e:
            out[name] = [type(e).__name__, ("shut down" in str(e)) or ("is gone" in str(e)), w.is_completed()]
    out["threads_after"] = _loop_threads()
    out["loop_instance"] = LoopThread.current() is not None

    # a new group (same store, same group name) works: the rendezvous keys of the old one are ignored
    store = TCPStore(HOST, ctx.port, ctx.world, is_master=False)
    dist.init_process_group("aiomooncake", store=store, rank=ctx.rank, world_size=ctx.world,
                            timeout=datetime.timedelta(seconds=30))
    b = torch.zeros(2)
    for w in dist.batch_isend_irecv([dist.P2POp(dist.isend, torch.full((2,), float(ctx.rank)), peer),
                                     dist.P2POp(dist.irecv, b, peer)]):
        w.wait()
    out["again"] = b.tolist()
    return out


def test_destroy_with_pending_ops() -> None:
    run = run_ranks(destroy_with_pending, 2)
    for rank, res in run.results.items():
        assert res["threads_before"] == ["aiomooncake-loop"]
        assert res["destroy_secs"] < 5.0, res
        for name in ("recv", "send", "any"):
            assert res[name] == ["BackendError", True, True], (rank, name, res[name])
        assert res["threads_after"] == [] and res["loop_instance"] is False
        assert res["again"] == [float(1 - rank)] * 2
    assert all(code == 0 for code in run.exitcodes.values()), run.exitcodes
    assert no_children_left()


def exit_without_destroy(ctx: Ctx) -> str:
    peer = 1 - ctx.rank
    dist.irecv(torch.zeros(16), peer, tag=1)  # pending forever
    dist.isend(torch.zeros(1 << 20), peer, tag=2)
    dist.barrier()
    return "returning"


def test_exit_without_destroy() -> None:
    # atexit shuts the group and the loop thread down: the processes end by themselves, code 0
    run = run_ranks(exit_without_destroy, 2, destroy=False, timeout=60)
    assert run.results == {0: "returning", 1: "returning"}
    assert all(code == 0 for code in run.exitcodes.values()), run.exitcodes
    assert run.seconds < 40
    assert no_children_left()


def test_loop_thread_takes_a_burst_whole_and_in_order() -> None:
    """Work submitted in a burst all runs, in submission order (it runs on the submitting thread,
    under the loop's lock)."""
    lt = LoopThread.acquire()
    try:
        seen: list[int] = []
        done = threading.Event()
        for i in range(40):
            lt.submit(seen.append, i)
            if i % 8 == 0:
                time.sleep(0.00002)  # a caller posting at its own pace
        lt.submit(done.set)
        assert done.wait(10)
        assert seen == list(range(40))
    finally:
        lt.release()
