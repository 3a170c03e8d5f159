"""The torch layer's event-loop engine (aiomooncake.torch.loop) in one process: the asyncio internals it
relies on, waits that drive the loop, waits from several threads, the background thread's progress,
deadlines, and a forked child."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Iterator

import pytest

from aiomooncake.torch.loop import LoopThread, LoopUnusable


def test_asyncio_still_has_what_the_engine_uses() -> None:
    """The engine turns asyncio's selector loop one iteration at a time (like nest_asyncio): if a
    Python release renames these, this fails instead of the torch backend breaking at run time."""
    loop = asyncio.SelectorEventLoop()
    try:
        assert callable(loop._run_once)  # type: ignore[attr-defined]
        assert callable(loop._write_to_self)  # type: ignore[attr-defined]
        assert hasattr(loop, "_ready") and hasattr(loop, "_scheduled")
        assert callable(asyncio._get_running_loop) and callable(asyncio._set_running_loop)
    finally:
        loop.close()


@pytest.fixture
def lt() -> Iterator[LoopThread]:
    inst = LoopThread.acquire()
    yield inst
    inst.release()


def test_run_and_wait_drive_the_loop(lt: LoopThread) -> None:
    async def answer() -> int:
        await asyncio.sleep(0.01)
        return 42

    assert lt.run(answer(), timeout=5) == 42
    # a wait that cannot finish gives up at its deadline, and the loop keeps working
    t0 = time.monotonic()
    assert lt.wait_for(lambda: False, time.monotonic() + 0.2) is False
    assert 0.15 < time.monotonic() - t0 < 2.0
    assert lt.run(answer(), timeout=5) == 42
    with pytest.raises(TimeoutError):
        lt.run(asyncio.sleep(10), timeout=0.1)


def test_waits_from_several_threads(lt: LoopThread) -> None:
    """Eight threads wait at once on timers that fire in reverse order: one drives the loop, the
    others sleep until theirs completes or the driver leaves; every wait returns on time."""
    n = 8
    done = [False] * n
    returned: dict[int, float] = {}
    t0 = time.monotonic()

    def arm() -> None:
        for i in range(n):
            lt.loop.call_later(0.05 * (n - i), done.__setitem__, i, True)

    lt.submit(arm)

    def waiter(i: int) -> None:
        assert lt.wait_for(lambda: done[i], time.monotonic() + 10)
        returned[i] = time.monotonic() - t0

    threads = [threading.Thread(target=waiter, args=(i,)) for i in range(n)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(15)
    assert sorted(returned) == list(range(n))
    for i, at in returned.items():
        assert 0.05 * (n - i) - 0.02 <= at < 0.05 * (n - i) + 1.0, (i, at)


def test_background_thread_progresses_without_waiters(lt: LoopThread) -> None:
    """Nobody waits: the background thread runs the loop (after stepping aside for a moment)."""
    fired = threading.Event()
    lt.submit(lambda: lt.loop.call_later(0.02, fired.set))
    assert fired.wait(5)

    async def tick() -> None:
        await asyncio.sleep(0.01)
        fired.clear()

    lt.submit(lambda: lt.loop.create_task(tick()))
    deadline = time.monotonic() + 5
    while fired.is_set() and time.monotonic() < deadline:
        time.sleep(0.005)
    assert not fired.is_set()


def test_wait_inside_the_loop_is_refused(lt: LoopThread) -> None:
    errors: list[BaseException] = []

    def inside() -> None:
        try:
            lt.wait_for(lambda: True)
        except RuntimeError as e:
            errors.append(e)

    lt.submit(lambda: lt.loop.call_soon(inside))
    assert lt.wait_for(lambda: bool(errors), time.monotonic() + 5)
    assert "inside the loop" in str(errors[0])


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_forked_child_gets_its_own_loop(lt: LoopThread) -> None:
    """A child forked while the parent's loop runs cannot use that loop (its threads are gone and
    its lock may be held forever): it raises at once, and the child gets a fresh one."""
    lt.run(asyncio.sleep(0))
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through its exit code
        code = 1
        try:
            try:
                lt.submit(lambda: None)
            except LoopUnusable:
                fresh = LoopThread.acquire()
                assert fresh is not lt
                assert fresh.run(asyncio.sleep(0, "ok"), timeout=5) == "ok"
                fresh.release()
                code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert lt.run(asyncio.sleep(0, "parent"), timeout=5) == "parent"
