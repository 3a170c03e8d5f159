"""The backend's threading model across processes: a burst of 512 operations completing in order,
driven by the waiting thread and by the background thread alone; waits from several threads at
once; completion callbacks that themselves wait; progress while the caller computes; a forked
child; and torch's ``batch_isend_irecv`` still having the shape the batch detection reads."""

from __future__ import annotations

import datetime
import inspect
import os
import threading
import time
from typing import Any

import torch
import torch.distributed as dist
from test_torch_harness import Ctx, must, no_children_left, run_ranks

BURST = 512


def _burst(ctx: Ctx, path: str) -> dict[str, Any]:
    """256 sends and 256 receives each way on one tag, sizes eager and rendezvous mixed, in one
    ``batch_isend_irecv``. Completion order is recorded by get_future callbacks (one callback thread,
    FIFO); ``path`` says who moves it: "waiter" waits on each op in order, "background" never waits
    (it polls is_completed() on the last one, sleeping in between: the background thread runs the
    loop), "threads" waits from four threads at once."""
    peer = 1 - ctx.rank
    half = BURST // 2
    sizes = [(i * 37) % 5 * 9000 + 1 for i in range(half)]  # 1 B to 36 KB
    outs = [torch.full((n,), float(ctx.rank * 1000 + i), dtype=torch.float32) for i, n in enumerate(sizes)]
    ins = [torch.zeros(n, dtype=torch.float32) for n in sizes]
    ops = [dist.P2POp(dist.isend, t, peer, tag=3) for t in outs]
    ops += [dist.P2POp(dist.irecv, t, peer, tag=3) for t in ins]
    order: list[int] = []
    t0 = time.monotonic()
    works = dist.batch_isend_irecv(ops)
    for i, w in enumerate(works):
        w.get_future().then(lambda _f, i=i: order.append(i))  # type: ignore[misc]
    if path == "waiter":
        for w in works:
            w.wait()
    elif path == "background":
        while not works[-1].is_completed():
            time.sleep(0.002)
        while not all(w.is_completed() for w in works):
            time.sleep(0.002)
    else:
        def wait_some(k: int) -> None:
            for w in works[k::4]:
                w.wait()
        threads = [threading.Thread(target=wait_some, args=(k,)) for k in range(4)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(60)
    seconds = time.monotonic() - t0
    end = time.monotonic() + 10
    while len(order) < BURST and time.monotonic() < end:
        time.sleep(0.01)
    recv_order = [i - half for i in order if i >= half]
    send_order = [i for i in order if i < half]
    dist.barrier()
    return {"data": all(t[0].item() == (1 - ctx.rank) * 1000 + i and t[-1].item() == t[0].item()
                        for i, t in enumerate(ins)),
            "callbacks": len(order), "recv_order": recv_order == sorted(recv_order),
            "send_order": send_order == sorted(send_order), "seconds": seconds,
            "completed": all(w.is_completed() for w in works)}


def burst(ctx: Ctx) -> dict[str, Any]:
    return {path: _burst(ctx, path) for path in ("waiter", "background", "threads")}


def test_burst_of_512_completes_in_order_on_every_path() -> None:
    res = run_ranks(burst, 2, timeout=150).results
    for rank in (0, 1):
        for path, r in res[rank].items():
            assert r["data"] and r["completed"], (rank, path, r)
            assert r["callbacks"] == BURST, (rank, path, r)
            # one peer, one tag: receives complete in posting order; sends too
            assert r["recv_order"] and r["send_order"], (rank, path, r)
            assert r["seconds"] < 30, (rank, path, r)
    assert no_children_left()


def callbacks_that_wait(ctx: Ctx) -> dict[str, Any]:
    """A get_future callback waits for another operation (and posts one): it runs on the callback
    thread, never on a thread running the loop, so it does not stall the loop that completes it."""
    peer = 1 - ctx.rank
    first, second, third = torch.zeros(4), torch.zeros(4), torch.zeros(4)
    if ctx.rank == 0:
        w1 = must(dist.irecv(first, peer, tag=1))
        w2 = must(dist.irecv(second, peer, tag=2))
        seen: list[Any] = []

        def then(_: Any) -> str:
            w2.wait()  # waits inside a callback
            seen.append((second[0].item(), threading.current_thread().name))
            must(dist.isend(torch.full((4,), 9.0), peer, tag=3)).wait()  # and posts from there
            return "waited"

        chained = w1.get_future().then(then)
        dist.send(torch.ones(1), peer, tag=0)  # rank 1 may send now
        result = chained.wait()
        return {"result": result, "seen": seen, "first": first[0].item()}
    dist.recv(torch.zeros(1), peer, tag=0)
    dist.send(torch.full((4,), 1.0), peer, tag=1)
    time.sleep(0.2)  # the callback is waiting for tag 2 meanwhile
    dist.send(torch.full((4,), 2.0), peer, tag=2)
    dist.recv(third, peer, tag=3)
    return {"third": third[0].item()}


def test_callbacks_that_wait() -> None:
    res = run_ranks(callbacks_that_wait, 2).results
    assert res[0]["result"] == "waited" and res[0]["first"] == 1.0
    assert res[0]["seen"] == [(2.0, "aiomooncake-callbacks_0")]
    assert res[1]["third"] == 9.0


def waits_from_threads(ctx: Ctx) -> dict[str, Any]:
    """Eight threads wait at once: on their own receives, on one shared receive, and with a
    timeout that expires; messages arrive in the reverse order of the waits."""
    peer = 1 - ctx.rank
    n = 8
    if ctx.rank == 1:
        dist.recv(torch.zeros(1), peer, tag=99)
        for i in reversed(range(n)):
            dist.send(torch.full((3,), float(i)), peer, tag=i)
            time.sleep(0.01)
        dist.send(torch.full((3,), 100.0), peer, tag=50)
        return {}
    bufs = [torch.zeros(3) for _ in range(n)]
    works = [must(dist.irecv(b, peer, tag=i)) for i, b in enumerate(bufs)]
    shared = must(dist.irecv(torch.zeros(3), peer, tag=50))
    errors: list[str] = []
    got: dict[int, float] = {}

    def waiter(i: int) -> None:
        try:
            works[i].wait()
            shared.wait()
            got[i] = bufs[i][0].item()
        except Exception as e:
            errors.append(repr(e))

    late = must(dist.irecv(torch.zeros(1), peer, tag=77))  # never sent
    timed_out: list[bool] = []

    def gives_up() -> None:
        try:
            late.wait(datetime.timedelta(seconds=0.3))
        except RuntimeError:
            timed_out.append(True)

    threads = [threading.Thread(target=waiter, args=(i,)) for i in range(n)]
    threads.append(threading.Thread(target=gives_up))
    for th in threads:
        th.start()
    dist.send(torch.ones(1), peer, tag=99)
    for th in threads:
        th.join(30)
    return {"got": got, "errors": errors, "timed_out": timed_out, "alive": [th.is_alive() for th in threads]}


def test_waits_from_several_threads() -> None:
    res = run_ranks(waits_from_threads, 2).results[0]
    assert res["errors"] == [] and not any(res["alive"])
    assert res["got"] == {i: float(i) for i in range(8)}
    assert res["timed_out"] == [True]


def progress_while_computing(ctx: Ctx) -> dict[str, Any]:
    """Rank 1 posts a receive and computes for a while without waiting; rank 0's send (which
    completes only once the bytes are in rank 1's tensor) must complete meanwhile: rank 1's
    background thread moves it. Then the roles swap, for the sender's side."""
    peer = 1 - ctx.rank
    big = 4 << 20
    out: dict[str, Any] = {}
    for receiver in (1, 0):
        buf = torch.zeros(big, dtype=torch.uint8)
        dist.barrier()
        if ctx.rank == receiver:
            w = must(dist.irecv(buf, peer, tag=5))
            t0 = time.monotonic()
            busy_until = t0 + 1.5
            x = torch.ones(256, 256)
            while time.monotonic() < busy_until:  # compute, holding the GIL most of the time
                x = (x @ x).clamp_(max=1.0)
            out[f"recv_done_while_computing_{receiver}"] = w.is_completed()
            w.wait()
            out[f"bytes_{receiver}"] = int(buf.sum().item())
        else:
            t0 = time.monotonic()
            dist.send(torch.ones(big, dtype=torch.uint8), peer, tag=5)
            out[f"send_seconds_{receiver}"] = time.monotonic() - t0
        dist.barrier()
    return out


def test_transfers_progress_while_the_caller_computes() -> None:
    res = run_ranks(progress_while_computing, 2).results
    for receiver in (1, 0):
        sender = 1 - receiver
        assert res[receiver][f"recv_done_while_computing_{receiver}"] is True
        assert res[receiver][f"bytes_{receiver}"] == 4 << 20
        assert res[sender][f"send_seconds_{receiver}"] < 1.2, res


def forked_child(ctx: Ctx) -> dict[str, Any]:
    """A child forked from a rank cannot use the parent's group (it raises at once instead of
    hanging) and can make its own event loop; the parent's group keeps working."""
    import asyncio

    from aiomooncake.torch import BackendError, LoopThread

    peer = 1 - ctx.rank
    dist.send(torch.ones(1), peer) if ctx.rank == 0 else dist.recv(torch.zeros(1), peer)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - reports through the pipe
        msg = "?"
        try:
            try:
                dist.isend(torch.ones(1), peer, tag=8)
                msg = "no error"
            except BackendError as e:
                msg = "BackendError" if "fork" in str(e) else f"other: {e}"
            lt = LoopThread.acquire()
            msg += "," + str(lt.run(asyncio.sleep(0, "ran"), timeout=5))
            lt.release()
        except BaseException as e:
            msg = f"failed: {e!r}"
        os.write(w, msg.encode())
        os._exit(0)
    os.close(w)
    _, status = os.waitpid(pid, 0)
    said = os.read(r, 1000).decode()
    os.close(r)
    b = torch.zeros(2)
    dist.batch_isend_irecv([dist.P2POp(dist.isend, torch.full((2,), float(ctx.rank)), peer),
                            dist.P2POp(dist.irecv, b, peer)])[1].wait()
    dist.barrier()
    return {"child": said, "exit": os.waitstatus_to_exitcode(status), "after": b.tolist()}


def test_forked_child() -> None:
    res = run_ranks(forked_child, 2).results
    for rank in (0, 1):
        assert res[rank]["child"] == "BackendError,ran", res[rank]
        assert res[rank]["exit"] == 0
        assert res[rank]["after"] == [float(1 - rank)] * 2


# ------------------------------------------------------------------ batch detection (issue 14)
def test_batch_isend_irecv_has_the_shape_the_backend_reads() -> None:
    """The backend learns where a batch ends from ``batch_isend_irecv``'s frame: its ``p2p_op_list``
    and the ``reqs`` it has collected so far, on the path torch takes for a Python group (which it
    never coalesces). If a torch release renames them or changes that path, this fails."""
    from aiomooncake.torch.backend import _BATCH_CODE

    fn = inspect.unwrap(dist.batch_isend_irecv)
    assert _BATCH_CODE is fn.__code__
    names = set(fn.__code__.co_varnames)
    assert {"p2p_op_list", "reqs"} <= names, names
    src = inspect.getsource(fn)
    assert "type(group) is ProcessGroup" in src  # a subclass (ours) takes the per-op path
    assert "reqs.append(work)" in src and "p2p_op.op(" in src


def batch_positions(ctx: Ctx) -> dict[str, Any]:
    from aiomooncake.torch import backend

    seen: list[int] = []
    real = backend._batch_ops_left

    def spy() -> int:
        n = real()
        seen.append(n)
        return n

    backend._batch_ops_left = spy
    try:
        peer = 1 - ctx.rank
        outs = [torch.full((3,), float(i)) for i in range(5)]
        ins = [torch.zeros(3) for _ in range(5)]
        ops = [dist.P2POp(dist.isend, t, peer, tag=i) for i, t in enumerate(outs)]
        ops += [dist.P2POp(dist.irecv, t, peer, tag=i) for i, t in enumerate(ins)]
        for w in dist.batch_isend_irecv(ops):
            w.wait()
        in_batch = list(seen)
        seen.clear()
        lone = [must(dist.irecv(torch.zeros(1), peer, tag=20)), must(dist.isend(torch.ones(1), peer, tag=20))]
        for w in lone:
            w.wait()
        return {"batch": in_batch, "lone": list(seen), "got": [t[0].item() for t in ins]}
    finally:
        backend._batch_ops_left = real


def test_batch_detection_reads_the_ops_left() -> None:
    res = run_ranks(batch_positions, 2).results
    for rank in (0, 1):
        assert res[rank]["batch"] == list(range(9, -1, -1))
        assert res[rank]["lone"] == [-1, -1]
        assert res[rank]["got"] == [float(i) for i in range(5)]
