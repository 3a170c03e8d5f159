"""The Work API of the "aiomooncake" backend: completion state, futures and their callbacks,
wait(timeout), the group timeout, and errors after a peer dies."""

from __future__ import annotations

import contextlib
import datetime
import threading
import time
from typing import Any

import torch
import torch.distributed as dist
from test_torch_harness import Ctx, no_children_left, run_ranks

from aiomooncake.torch import BackendError, OpTimeout, Work


def _until(pred: Any, timeout: float = 10.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.01)
    return bool(pred())


def work_api(ctx: Ctx) -> dict[str, Any]:
    r = ctx.rank
    out: dict[str, Any] = {}
    go = torch.zeros(1)
    if r == 0:
        buf = torch.zeros(50_000)
        w = dist.irecv(buf, 1, tag=1)
        assert w is not None
        out["type"] = [type(w).__name__, isinstance(w, dist.Work), isinstance(w, Work)]
        out["pending"] = [w.is_completed(), w.is_success(), w.exception()]
        fut = w.get_future()
        fired: list[Any] = []
        def on_done(f: Any) -> str:
            fired.append((f.value()[0].sum().item(), threading.current_thread().name))
            return "chained"

        chained = fut.then(on_done)
        dist.send(go, 1, tag=2)  # now rank 1 sends
        assert w.wait() is True
        out["done"] = [w.is_completed(), w.is_success(), w.exception(), w.source_rank()]
        out["future_value"] = fut.wait()[0] is buf
        out["chained"] = chained.wait()
        out["callback"] = _until(lambda: bool(fired)) and fired[0]
        out["result_is_buf"] = w.result()[0] is buf
        out["sum"] = buf.sum().item()

        # wait(timeout) gives up without cancelling the operation
        late = torch.zeros(10)
        w2 = dist.irecv(late, 1, tag=3)
        assert w2 is not None
        t0 = time.monotonic()
        try:
            w2.wait(datetime.timedelta(seconds=0.3))
            out["wait_timeout"] = "no error"
        except OpTimeout as e:
            out["wait_timeout"] = [isinstance(e, RuntimeError), round(time.monotonic() - t0, 1) < 2.0]
        dist.send(go, 1, tag=4)
        w2.wait()
        out["late"] = late.tolist()
    else:
        dist.recv(go, 0, tag=2)
        src = torch.full((50_000,), 2.0)
        w = dist.isend(src, 0, tag=1)
        assert w is not None
        f = w.get_future()
        w.wait()
        out["send_future"] = f.wait()[0] is src
        try:
            w.source_rank()
            out["send_source_rank"] = "no error"
        except RuntimeError:
            out["send_source_rank"] = "RuntimeError"
        dist.recv(go, 0, tag=4)
        dist.send(torch.arange(10, dtype=torch.float32), 0, tag=3)
    dist.barrier()
    return out


def test_work_api() -> None:
    res = run_ranks(work_api, 2).results
    a, b = res[0], res[1]
    assert a["type"] == ["Work", True, True]
    assert a["pending"] == [False, True, None]
    assert a["done"] == [True, True, None, 1]
    assert a["future_value"] is True and a["chained"] == "chained"
    assert a["callback"] == (100_000.0, "aiomooncake-callbacks_0")
    assert a["result_is_buf"] is True and a["sum"] == 100_000.0
    assert a["wait_timeout"] == [True, True]
    assert a["late"] == list(map(float, range(10)))
    assert b["send_future"] is True and b["send_source_rank"] == "RuntimeError"


def group_timeout(ctx: Ctx) -> dict[str, Any]:
    out: dict[str, Any] = {}
    # a second group with a long timeout carries the "go" message (a subgroup of our backend)
    slow = dist.new_group([0, 1], timeout=datetime.timedelta(seconds=60))
    assert slow is not None
    out["subgroup"] = type(slow).__name__
    if ctx.rank == 0:
        t0 = time.monotonic()
        w = dist.irecv(torch.zeros(4), 1, tag=7)
        assert w is not None
        try:
            w.wait()
            out["recv"] = "no error"
        except OpTimeout as e:
            out["recv"] = [round(time.monotonic() - t0), "timeout of 2 s" in str(e), w.is_completed(),
                           w.is_success(), w.exception() is not None]
        t0 = time.monotonic()
        try:
            dist.recv(torch.zeros(4), None, tag=8)
            out["any"] = "no error"
        except RuntimeError as e:
            out["any"] = [type(e).__name__, round(time.monotonic() - t0)]
        # the group still works, and the cancelled recv took no message
        dist.send(torch.zeros(1), 1, tag=9, group=slow)
        b = torch.zeros(4)
        dist.recv(b, 1, tag=7)
        out["after"] = b.tolist()
    else:
        dist.recv(torch.zeros(1), 0, tag=9, group=slow)  # rank 0 is busy timing out for ~4 s
        dist.send(torch.ones(4), 0, tag=7)
    return out


def _core_withdraws_cancelled_recvs() -> bool:
    """Whether aiomooncake's core withdraws a cancelled, still unmatched recv (so the next message
    with its tag goes to the next recv). A timed-out torch recv relies on it."""
    import asyncio

    import aiomooncake

    async def probe() -> bool:
        lst = await aiomooncake.listen("127.0.0.1", 0)
        dialing = asyncio.ensure_future(aiomooncake.connect("127.0.0.1", lst.port))
        server = await lst.accept()
        client = await dialing
        try:
            first = asyncio.ensure_future(server.recv(torch.zeros(1), tag=1))
            await asyncio.sleep(0.05)
            first.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await first
            second = torch.zeros(1)
            await asyncio.wait_for(asyncio.gather(client.send(torch.ones(1), tag=1),
                                                  server.recv(second, tag=1)), 5)
            return bool(second.item() == 1.0)
        except asyncio.TimeoutError:
            return False
        finally:
            await client.close()
            await server.close()
            await lst.close()

    return aiomooncake.run(probe())


def test_group_timeout_bounds_every_op() -> None:
    # a cancelled recv must be withdrawn (it once stayed posted and swallowed the next message)
    assert _core_withdraws_cancelled_recvs()
    res = run_ranks(group_timeout, 2, group_timeout=2.0).results[0]
    seconds, says_timeout, completed, success, has_exc = res["recv"]
    assert 2 <= seconds <= 4 and says_timeout and completed and not success and has_exc
    assert res["any"][0] == "OpTimeout" and 2 <= res["any"][1] <= 4
    assert res["after"] == [1.0] * 4
    assert res["subgroup"] == "ProcessGroupAiomooncake"


def peer_dies(ctx: Ctx) -> dict[str, Any]:
    out: dict[str, Any] = {}
    r = ctx.rank
    if r == 2:
        dist.send(torch.zeros(1), 0, tag=1)  # connected and alive...
        ctx.crash()  # ...then killed
    if r == 0:
        wr = dist.irecv(torch.zeros(8), 2, tag=2)
        assert wr is not None
        ws = dist.isend(torch.zeros(1 << 20), 2, tag=3)
        assert ws is not None
        dist.recv(torch.zeros(1), 2, tag=1)
        t0 = time.monotonic()
        for name, w in (("recv", wr), ("send", ws)):
            try:
                w.wait()
                out[name] = "no error"
            except BackendError as e:
                out[name] = ["rank 2 is gone" in str(e), w.is_completed(), w.is_success(),
                             w.exception() is not None]
        out["seconds"] = time.monotonic() - t0
        # the survivors keep working
        b = torch.zeros(3)
        dist.recv(b, 1, tag=4)
        out["survivors"] = b.tolist()
    elif r == 1:
        dist.send(torch.full((3,), 5.0), 0, tag=4)
    return out


def test_exception_after_peer_dies() -> None:
    run = run_ranks(peer_dies, 3, may_die=frozenset({2}), group_timeout=60.0)
    res = run.results[0]
    assert res["recv"] == [True, True, False, True]
    assert res["send"] == [True, True, False, True]
    assert res["seconds"] < 10
    assert res["survivors"] == [5.0, 5.0, 5.0]
    assert 2 not in run.results
    assert no_children_left()
