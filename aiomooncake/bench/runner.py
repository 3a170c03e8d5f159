"""Process launching: two processes per implementation (one for ``copy``), spawned fresh, reporting
through a queue; or, under torchrun, the two torchrun ranks running every implementation in turn.

The launcher survives its children: a child that crashes (a signal, an exception) or hangs past
``--timeout`` seconds on one point is killed with its partner, that point is reported as failed with
the reason, and a fresh pair measures the implementation's remaining points. A failure before the
first point (start-up, e.g. a backend that cannot initialize) fails all of them at once.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import os
import queue
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from datetime import timedelta
from typing import Any, Protocol

from .common import BenchConfig, Message, Point, RankContext, describe_exit
from .impls import load

log = logging.getLogger(__name__)

STARTUP_S = 90.0  # spawning, importing torch and initializing a backend, on a loaded 2-core box
GRACE_S = 2.0  # after a failure, how long to wait for the partner's own report

Plan = Sequence[tuple[str, list[Point]]]


class Events(Protocol):
    def begin(self, impl: str, p: Point) -> None: ...

    def record(self, impl: str, p: Point, rec: dict[str, Any]) -> None: ...

    def failed(self, impl: str, p: Point, reason: str) -> None: ...


def under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or ("RANK" in os.environ and "WORLD_SIZE" in os.environ
                                                    and "MASTER_ADDR" in os.environ)


@contextlib.contextmanager
def _environ(extra: dict[str, str]) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in extra}
    os.environ.update(extra)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _setup_logging(cfg: BenchConfig, tag: str) -> None:
    logging.basicConfig(level=logging.INFO if cfg.verbose else logging.WARNING,
                        format=f"[{tag}] %(levelname)s %(name)s: %(message)s", force=True)


# ================================================================= launcher mode
def launch(plan: Plan, cfg: BenchConfig, events: Events, log_dir: str | None = None) -> str | None:
    """Measure every (implementation, points) of ``plan`` in child processes.

    Unless ``cfg.verbose``, the children's output (the engine's native logging included) goes to
    files in ``log_dir`` (a new temporary directory by default); returns that directory if a point
    failed (the reasons name the files), else removes it and returns None."""
    from torch._C._distributed_c10d import TCPStore

    store = TCPStore(cfg.host, 0, None, True, timeout=timedelta(seconds=cfg.timeout),
                     wait_for_workers=False)
    logs = None if cfg.verbose else (log_dir or tempfile.mkdtemp(prefix="aiomooncake-bench-"))
    if logs is not None:
        os.makedirs(logs, exist_ok=True)
    failed = False
    for name, points in plan:
        if points:
            failed = _run_impl(name, points, cfg, store.port, events, logs) or failed
    if logs is not None and not failed and log_dir is None:
        shutil.rmtree(logs, ignore_errors=True)
        return None
    return logs


def _child(name: str, rank: int, world: int, port: int, prefix: str, cfg: BenchConfig,
           points: list[Point], q: Any, log_path: str | None) -> None:
    if log_path is not None:
        fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
    _setup_logging(cfg, f"{name} rank {rank}")
    ctx: RankContext | None = None
    code = 0
    try:
        from torch._C._distributed_c10d import PrefixStore, TCPStore

        store = TCPStore(cfg.host, port, None, False, timeout=timedelta(seconds=cfg.timeout))
        if cfg.netns:
            _enter_host(cfg, rank)  # after connecting to the launcher's store, which stays reachable
        ctx = RankContext(name, rank, world, cfg, points, PrefixStore(prefix, store), q.put)
        load(name).run(ctx)
        q.put(("done", rank))
    except BaseException as e:
        log.debug("%s rank %d failed", name, rank, exc_info=True)
        q.put(("error", rank, ctx.current if ctx else None, f"{type(e).__name__}: {e}"))
        code = 1
    q.close()
    q.join_thread()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # skip interpreter teardown: engine threads and process groups can hang it


def _enter_host(cfg: BenchConfig, rank: int) -> None:
    """``--netns``: move this rank into its own network namespace, as if on a host of its own.
    Sockets made before (the store's, the result queue's pipe) stay where they were. Every
    implementation is pointed at this namespace's address and interface, and aiomooncake's CPU
    tensors at the Transfer Engine: both ranks still share one PID namespace, where the same-host
    copy (process_vm_readv) would work, and two hosts could not use it."""
    from .netns import IFNAME, enter

    os.environ.update(AIOMOONCAKE_HOST=cfg.addrs[rank], GLOO_SOCKET_IFNAME=IFNAME,
                      AIOMOONCAKE_HOST_TRANSPORT="te")
    enter(cfg.netns[rank])


def _run_impl(name: str, points: list[Point], cfg: BenchConfig, port: int, events: Events,
              logs: str | None) -> bool:
    """Measure ``points`` of one implementation; True if any failed."""
    impl = load(name)
    spawn = mp.get_context("spawn")
    env = dict(impl.child_env(cfg.device))
    if not cfg.verbose and "MC_LOG_LEVEL" not in os.environ:
        env["MC_LOG_LEVEL"] = "ERROR"  # the Transfer Engine's INFO/WARNING chatter (glog ignores GLOG_*)
    if cfg.host.startswith("127.") and "GLOO_SOCKET_IFNAME" not in os.environ:
        env["GLOO_SOCKET_IFNAME"] = "lo"
    remaining = list(points)
    attempt = 0
    while remaining:
        attempt += 1
        q = spawn.Queue()
        paths = [os.path.join(logs, f"{name}-{attempt}-rank{r}.log") if logs else None
                 for r in range(impl.WORLD)]
        with _environ(env):
            procs = [spawn.Process(target=_child, name=f"bench-{name}-{r}", daemon=True,
                                   args=(name, r, impl.WORLD, port, f"{name}/{attempt}", cfg, remaining, q,
                                         paths[r]))
                     for r in range(impl.WORLD)]
            for pr in procs:
                pr.start()
        progressed, current, reason = _supervise(name, procs, q, remaining, cfg, events)
        for pr in procs:
            if pr.is_alive():
                pr.kill()
        for pr in procs:
            pr.join(5)
        q.close()
        q.cancel_join_thread()
        if reason is None:
            if not remaining:
                return False
            reason = "not measured (the processes ended early)"  # never loop forever
            current, progressed = None, False
        if logs:
            reason += f" (logs: {', '.join(p for p in paths if p)})"
        if current is None and not progressed:  # start-up failure: it would fail again
            for p in remaining:
                events.failed(name, p, reason)
            return True
        failed = current if current is not None and current in remaining else remaining[0]
        remaining.remove(failed)
        events.failed(name, failed, reason)
        if remaining:
            log.info("%s: restarting for the %d remaining points", name, len(remaining))
    return True


def _supervise(name: str, procs: list[Any], q: Any, remaining: list[Point], cfg: BenchConfig,
               events: Events) -> tuple[bool, Point | None, str | None]:
    """Follow one pair until it finishes or fails; returns (any point done, the point running at
    the failure, the failure's reason or None)."""
    by_idx = {p.idx: p for p in remaining}
    current: Point | None = None
    progressed = False
    done: set[int] = set()
    errors: list[str] = []
    deadline = time.monotonic() + cfg.timeout + STARTUP_S
    failing_since: float | None = None

    def handle(msg: Message) -> None:
        nonlocal current, progressed, deadline
        kind = msg[0]
        if kind == "begin":
            current = by_idx[msg[1]]
            events.begin(name, current)
            deadline = time.monotonic() + cfg.timeout
        elif kind == "record":
            p = by_idx[msg[1]]
            if p in remaining:
                remaining.remove(p)
                events.record(name, p, msg[2])
            progressed = True
            current = None
            deadline = time.monotonic() + cfg.timeout
        elif kind == "error":
            if msg[2] is not None and msg[2] in by_idx and by_idx[msg[2]] in remaining:
                current = by_idx[msg[2]]
            errors.append(f"rank {msg[1]}: {msg[3]}")
        elif kind == "done":
            done.add(msg[1])

    while True:
        try:
            handle(q.get(timeout=0.1))
            while True:
                handle(q.get_nowait())
        except queue.Empty:
            pass
        except (EOFError, OSError, ValueError) as e:  # a child died mid-message
            errors.append(f"lost the result queue ({type(e).__name__})")
        if len(done) == len(procs) and not errors:
            return progressed, current, None
        now = time.monotonic()
        crashed = [f"rank {r} {describe_exit(pr.exitcode)}" for r, pr in enumerate(procs)
                   if pr.exitcode is not None and pr.exitcode != 0]
        if errors or crashed:
            # give the partner a moment to report too, then explain with everything known
            if failing_since is None:
                failing_since = now
            if now - failing_since < GRACE_S and not all(pr.exitcode is not None for pr in procs):
                continue
            signals = [c for c in crashed if "crashed" in c or "signal" in c]
            alive = [f"rank {r} was still running (hung?) and was killed" for r, pr in enumerate(procs)
                     if pr.exitcode is None]
            rest = [c for c in crashed if c not in signals]
            return progressed, current, "; ".join(signals + errors + rest + alive)
        if all(pr.exitcode == 0 for pr in procs):
            return progressed, current, "the processes exited without reporting every point"
        if now > deadline:
            what = f"{current.mode} {current.size}" if current else "start-up"
            return progressed, current, f"timed out after {cfg.timeout:g} s ({what}); killed"


# ================================================================= torchrun mode
class _NullEvents:
    def begin(self, impl: str, p: Point) -> None:
        pass

    def record(self, impl: str, p: Point, rec: dict[str, Any]) -> None:
        pass

    def failed(self, impl: str, p: Point, reason: str) -> None:
        log.warning("%s %s %s failed: %s", impl, p.mode, p.size, reason)


def torchrun_rank() -> int:
    return int(os.environ.get("RANK", "0"))


def run_torchrun(plan: Plan, cfg: BenchConfig, events: Events) -> None:
    """Each of the two torchrun ranks runs every implementation in turn, in-process (no crash
    isolation: a hang ends in the implementation's own timeouts). Only rank 0's ``events`` matter."""
    from torch._C._distributed_c10d import PrefixStore, TCPStore

    rank, world = torchrun_rank(), int(os.environ["WORLD_SIZE"])
    if world != 2:
        raise SystemExit(f"the benchmark needs exactly 2 ranks (torchrun --nproc-per-node 2), got {world}")
    _setup_logging(cfg, f"rank {rank}")
    if not cfg.verbose:
        os.environ.setdefault("MC_LOG_LEVEL", "ERROR")
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    base = TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                    rank == 0 and not agent, timeout=timedelta(seconds=cfg.timeout + STARTUP_S))
    run_id = os.environ.get("TORCHELASTIC_RUN_ID", "bench")
    sink_events: Events = events if rank == 0 else _NullEvents()
    for name, points in plan:
        if not points:
            continue
        impl = load(name)
        store = PrefixStore(f"aiomooncake-bench/{run_id}/{name}", base)

        finished: set[int] = set()

        def sink(msg: Message, name: str = name, points: list[Point] = points,
                 finished: set[int] = finished) -> None:
            by_idx = {p.idx: p for p in points}
            if msg[0] == "begin":
                sink_events.begin(name, by_idx[msg[1]])
            elif msg[0] == "record":
                finished.add(msg[1])
                sink_events.record(name, by_idx[msg[1]], msg[2])

        ctx = RankContext(name, rank, impl.WORLD if rank < impl.WORLD else world, cfg, points, store, sink)
        if rank < impl.WORLD:
            os.environ.update(impl.child_env(cfg.device))
            try:
                impl.run(ctx)
            except Exception as e:
                log.debug("%s failed", name, exc_info=True)
                for p in points:
                    if p.idx in finished:
                        continue
                    if p.idx == ctx.current:
                        sink_events.failed(name, p, f"rank {rank}: {type(e).__name__}: {e}")
                        continue
                    sink_events.failed(name, p, f"not measured: rank {rank} failed before it "
                                                f"({type(e).__name__})")
        end = RankContext(name, rank, world, cfg, [], store, sink)
        end.barrier("impl-end")
