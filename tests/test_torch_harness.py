"""Multi-process harness for the torch integration tests (and tests of the harness itself).

:func:`run_ranks` starts ``world`` spawned OS processes, each joining one process group (through a
TCPStore the test process serves, ``tcp://``, or torchrun-style ``env://``), runs a scenario function
in every rank and returns the ranks' return values. Scenarios are module-level functions (spawn
imports them by name) taking a :class:`Ctx`. Every run has a deadline: ranks still alive after it
are killed, and every child dies with the test process (``PR_SET_PDEATHSIG``), so no test leaves
processes behind.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import logging
import multiprocessing
import os
import queue
import signal
import socket
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pytest
import torch

CTX = multiprocessing.get_context("spawn")
HOST = "127.0.0.1"


@dataclass
class Ctx:
    rank: int
    world: int
    backend: str
    args: tuple[Any, ...] = ()
    port: int = 0  # the TCPStore's (init "store") or the tcp:// / env:// master port
    _q: Any = field(default=None, repr=False)

    def report(self, key: str, value: Any) -> None:
        """Send a partial result now (survives a later crash of this rank)."""
        self._q.put((self.rank, "report", (key, value)))

    def crash(self) -> None:
        """Die like a killed process: no atexit, no destroy_process_group, sockets closed by the kernel."""
        self._q.close()
        self._q.join_thread()
        os.kill(os.getpid(), signal.SIGKILL)


T = TypeVar("T")


def must(x: T | None) -> T:
    """``x``, which torch types as optional (a Work, a group) but must be there here."""
    assert x is not None
    return x


def _die_with_parent() -> None:
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _child(rank: int, world: int, backend: str, init: str, port: int, scenario: Callable[[Ctx], Any],
           args: tuple[Any, ...], group_timeout: float, q: Any, destroy: bool) -> None:
    _die_with_parent()
    logging.basicConfig(level=logging.WARNING)
    import torch.distributed as dist
    from torch._C._distributed_c10d import TCPStore

    import aiomooncake.torch  # noqa: F401  (registers the backend)

    ctx = Ctx(rank, world, backend, args, port, q)
    try:
        timeout = datetime.timedelta(seconds=group_timeout)
        if init == "store":
            store = TCPStore(HOST, port, world, is_master=False, timeout=timeout)
            dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)
        elif init == "tcp":
            dist.init_process_group(backend, init_method=f"tcp://{HOST}:{port}", rank=rank,
                                    world_size=world, timeout=timeout)
        elif init == "env":
            os.environ.update(MASTER_ADDR=HOST, MASTER_PORT=str(port), RANK=str(rank),
                              WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
            dist.init_process_group(backend, timeout=timeout)
        result = scenario(ctx)
        q.put((rank, "ok", result))
    except BaseException:
        q.put((rank, "error", traceback.format_exc()))
    finally:
        if destroy and dist.is_initialized():
            with contextlib.suppress(Exception):
                dist.destroy_process_group()
    q.close()
    q.join_thread()


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


@dataclass
class Run:
    results: dict[int, Any]
    reports: dict[int, dict[str, Any]]
    exitcodes: dict[int, int | None]
    seconds: float


def run_ranks(scenario: Callable[[Ctx], Any], world: int = 2, *, backend: str = "aiomooncake",
              init: str = "store", args: tuple[Any, ...] = (), timeout: float = 90.0,
              group_timeout: float = 30.0, may_die: frozenset[int] = frozenset(),
              destroy: bool = True) -> Run:
    """Run ``scenario`` on ``world`` ranks; return their results, or fail the test with every rank's
    traceback. Ranks in ``may_die`` may end without a result (crash scenarios)."""
    store = None
    if init == "store":
        from torch._C._distributed_c10d import TCPStore
        store = TCPStore(HOST, 0, world, is_master=True, wait_for_workers=False,
                              timeout=datetime.timedelta(seconds=group_timeout))
        port = int(store.port)
    else:
        port = free_port()
    q = CTX.Queue()
    procs = [CTX.Process(target=_child, args=(r, world, backend, init, port, scenario, args, group_timeout,
                                               q, destroy), name=f"rank{r}", daemon=True)
             for r in range(world)]
    t0 = time.monotonic()
    deadline = t0 + timeout
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    errors: dict[int, str] = {}
    reports: dict[int, dict[str, Any]] = {r: {} for r in range(world)}
    try:
        while len(results) + len(errors) < world:
            alive = [r for r, p in enumerate(procs) if p.is_alive()]
            missing = [r for r in range(world) if r not in results and r not in errors]
            if not any(r in alive for r in missing):
                # The missing ranks are dead; give the queue a moment to deliver what they sent.
                with contextlib.suppress(queue.Empty):
                    while True:
                        _take(q.get(timeout=0.5), results, errors, reports)
                break
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                _take(q.get(timeout=min(left, 0.5)), results, errors, reports)
            except queue.Empty:
                continue
        # Ranks that delivered a result should exit on their own (destroy, atexit); hung ones are killed.
        grace = time.monotonic() + 20.0
        for r, p in enumerate(procs):
            if r in results or r in errors:
                p.join(max(0.1, min(grace, deadline + 10.0) - time.monotonic()))
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(10)
        q.close()
        del store
    exitcodes = {r: p.exitcode for r, p in enumerate(procs)}
    elapsed = time.monotonic() - t0
    problems = [f"rank {r}:\n{tb}" for r, tb in sorted(errors.items())]
    for r in range(world):
        if r not in results and r not in errors and r not in may_die:
            problems.append(f"rank {r}: no result (exit code {exitcodes[r]}, "
                            f"{'timed out' if elapsed >= timeout else 'died'})")
    if problems:
        pytest.fail(f"{scenario.__name__} on {world} ranks ({backend}) failed after {elapsed:.1f} s:\n"
                    + "\n".join(problems), pytrace=False)
    return Run(results, reports, exitcodes, elapsed)


def _take(item: tuple[int, str, Any], results: dict[int, Any], errors: dict[int, str],
          reports: dict[int, dict[str, Any]]) -> None:
    rank, kind, value = item
    if kind == "ok":
        results[rank] = value
    elif kind == "error":
        errors[rank] = value
    else:
        key, v = value
        reports[rank][key] = v


def no_children_left() -> bool:
    return not CTX.active_children() and not multiprocessing.active_children()


# ------------------------------------------------------------------------- harness self-tests
def _hang(ctx: Ctx) -> None:
    if ctx.rank == 1:
        time.sleep(3600)


def _value(ctx: Ctx) -> int:
    return ctx.rank * 10 + int(torch.ones(1).item())


def test_harness_returns_results() -> None:
    run = run_ranks(_value, 2, backend="gloo")
    assert run.results == {0: 1, 1: 11}
    assert no_children_left()


def test_harness_kills_hung_ranks() -> None:
    t0 = time.monotonic()
    with pytest.raises(pytest.fail.Exception, match="rank 1: no result"):
        run_ranks(_hang, 2, backend="gloo", timeout=10)
    assert time.monotonic() - t0 < 35
    assert no_children_left()
