"""Multi-process test harness: the other peer runs in a separate OS process and follows a script.

The test process is one peer. A :class:`Remote` is a ``multiprocessing`` *spawn* child running a
small command loop on uvloop; for every scenario it listens on a fresh port and accepts exactly one
connection from the test::

    test process                                     remote process
      ("run", sid, name, kwargs, options) --pipe-->    listen("127.0.0.1", 0, **options)
                                          <--pipe--    ("port", sid, port)
      connect(port, **options) ======= TCP + TE ====>  accept()
                                                       SCENARIOS[name](peer, ctl, **kwargs)
      Scenario.tell(kind)                 --pipe-->    ctl.wait(kind)
      Scenario.event(kind)                <--pipe--    ctl.emit(kind, payload)
      Scenario.result()                   <--pipe--    ("result" | "error", sid, ...)

Scenario functions live in this module so that the spawned interpreter can import them. Tensors
never cross the pipe: both sides rebuild them bit-exactly from a :func:`spec` (dtype, shape, seed)
with :func:`make_tensor`. Waiting on the pipe goes through the event loop's ``add_reader`` (no
polling loops); every wait has a deadline. A remote that died, hung or misbehaved is marked
unhealthy and the fixtures replace it; remotes die with the test process (``PR_SET_PDEATHSIG``) and
are killed in fixture teardown.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import multiprocessing
import os
import signal
import sys
import time
import traceback
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import torch

import aiomooncake
from aiomooncake import planes
from aiomooncake.planes.te import TePlane

CTX = multiprocessing.get_context("spawn")
HOST = "127.0.0.1"
STARTUP_TIMEOUT = 90.0  # importing torch on a loaded 2-core machine can be slow
DEFAULT_TIMEOUT = 30.0
CLOSE_GRACE = 15.0
SENTINEL = 0xA5
KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
EAGER_THRESHOLD = aiomooncake.Options().eager_threshold
# These tests are about the Transfer Engine: CPU tensors between same-host peers would otherwise take
# the shared-memory path (aiomooncake.planes.shm, tested in tests/test_shm.py). Both sides get this unless a
# test overrides it, and every connection is checked to really use the engine over TCP.
TE_OPTIONS: dict[str, Any] = {"host_transport": "te"}


# =================================================================== dtypes and tensor data
def _dtype_table() -> tuple[list[torch.dtype], dict[str, str]]:
    """Every ``torch.dtype`` torch exposes as a ``torch.<name>`` attribute (aliases folded), split
    into the ones a byte-level transfer test can use and the skipped ones, with the reason."""
    found: dict[torch.dtype, str] = {}
    for name in sorted(dir(torch)):
        value = getattr(torch, name, None)
        if isinstance(value, torch.dtype):
            found.setdefault(value, name)
    usable: list[torch.dtype] = []
    skipped: dict[str, str] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "ComplexHalf support is experimental", quantized deprecation
        for dt in sorted(found, key=str):
            name = dtype_name(dt)
            try:
                t = torch.empty(4, dtype=dt)
                t.view(torch.uint8)
            except Exception as e:
                skipped[name] = f"torch.empty / a uint8 view fails: {type(e).__name__}: {e}"
                continue
            if t.is_quantized:
                # torch.empty builds an affine-quantized tensor: its meaning lives in a quantizer
                # (scale, zero point) that no raw-bytes transfer carries, clone()/contiguous() hit an
                # internal assert, and quint4x2/quint2x4 pack 2-4 elements per byte while
                # element_size() says 1, so numel * element_size overstates the storage.
                skipped[name] = "quantized dtype: needs quantizer state; not a plain byte tensor"
                continue
            usable.append(dt)
    return usable, skipped


def dtype_name(dt: torch.dtype) -> str:
    return str(dt).removeprefix("torch.")


ALL_DTYPES, SKIPPED_DTYPES = _dtype_table()


def element_size(dt: torch.dtype) -> int:
    return torch.empty((), dtype=dt).element_size()


def spec(dtype: torch.dtype | str, shape: tuple[int, ...] | int, seed: int = 0,
         fill: int | None = None) -> dict[str, Any]:
    """A picklable description of a tensor both processes can rebuild bit-exactly: pattern bytes
    from ``seed``, or every byte ``fill`` (cheap for huge tensors whose content does not matter)."""
    if isinstance(shape, int):
        shape = (shape,)
    return {"dtype": dtype if isinstance(dtype, str) else dtype_name(dtype), "shape": tuple(shape),
            "seed": seed, "fill": fill}


def u8(nbytes: int, seed: int = 0) -> dict[str, Any]:
    """Spec of a 1-D uint8 tensor of ``nbytes`` bytes."""
    return spec(torch.uint8, (nbytes,), seed)


def spec_dtype(sp: dict[str, Any]) -> torch.dtype:
    dt = getattr(torch, sp["dtype"])
    assert isinstance(dt, torch.dtype)
    return dt


def spec_nbytes(sp: dict[str, Any]) -> int:
    shape: tuple[int, ...] = sp["shape"]
    return math.prod(shape) * element_size(spec_dtype(sp))


def pattern(nbytes: int, seed: int = 0) -> torch.Tensor:
    """``nbytes`` pseudo-random bytes (its own storage, exactly that size). Large patterns repeat an
    8 MiB random block with every copy shifted by its index, so no two 8 MiB blocks are equal and a
    chunk written at the wrong offset is still detected."""
    g = torch.Generator().manual_seed(seed)
    block = min(nbytes, 8 * MiB)
    base = torch.randint(0, 256, (block,), dtype=torch.uint8, generator=g)
    if block == nbytes:
        return base
    out = torch.empty(nbytes, dtype=torch.uint8)
    for i, off in enumerate(range(0, nbytes, block)):
        n = min(block, nbytes - off)
        piece = out[off:off + n]
        piece.copy_(base[:n])
        piece.add_(i % 251 + 1)
    return out


def make_tensor(sp: dict[str, Any]) -> torch.Tensor:
    """The tensor a spec describes: contiguous, its bytes drawn from :func:`pattern`."""
    dt = spec_dtype(sp)
    if sp.get("fill") is not None:
        return filled(sp["shape"], dt, sp["fill"])
    numel = math.prod(sp["shape"])
    raw = pattern(numel * element_size(dt), sp["seed"])
    return raw.view(dt).reshape(sp["shape"])


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    """The bytes of ``t`` in logical element order, as a flat uint8 tensor (a view if contiguous)."""
    if not t.is_contiguous():
        t = t.contiguous()
    return t.reshape(-1).view(torch.uint8)


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-exact equality of dtype, shape and every byte (NaN payloads, -0.0 ... included)."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(as_bytes(a), as_bytes(b))


def filled(shape: tuple[int, ...] | int, dtype: torch.dtype = torch.uint8,
           byte: int = SENTINEL) -> torch.Tensor:
    """A fresh contiguous tensor whose every byte is ``byte``."""
    t = torch.empty(shape, dtype=dtype)
    as_bytes(t).fill_(byte)
    return t


def dest_for(sp: dict[str, Any]) -> torch.Tensor:
    """A sentinel-filled destination with the spec's dtype and shape."""
    return filled(sp["shape"], spec_dtype(sp))


def untouched(t: torch.Tensor, byte: int = SENTINEL) -> bool:
    return bool((as_bytes(t) == byte).all())


# =================================================================== process-local measurements
def registrations() -> int:
    return sum(e.stats().registrations for e in planes.existing())


def writes_submitted() -> int:
    return sum(e.stats().writes_submitted for e in planes.existing())


def _regions() -> list[Any]:
    """Every registration the Transfer Engine planes of this process hold."""
    return [r for e in planes.existing() if isinstance(e, TePlane) for r in e.regions()]


def stranded_regions() -> list[tuple[int, int]]:
    """(base, size) of registrations still counted in flight although their memory was freed: left
    behind by cleanup that never ran; any later registration overlapping them fails."""
    return [(r.base, r.size) for r in _regions() if r.inflight and not r.alive()]


def load_script(name: str) -> Any:
    """Import ``tests/tools/<name>.py`` as module ``name`` (the stress, soak and fuzz tools the tests
    drive in a small configuration)."""
    import importlib.util

    tools = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tools")
    spec_ = importlib.util.spec_from_file_location(name, os.path.join(tools, f"{name}.py"))
    assert spec_ is not None and spec_.loader is not None
    mod = importlib.util.module_from_spec(spec_)
    sys.modules[name] = mod
    spec_.loader.exec_module(mod)
    return mod


def regions_in_flight() -> int:
    """Engine registrations this process still counts as used by a transfer in flight (white-box:
    the engine's region cache; 0 whenever nothing is moving)."""
    return sum(r.inflight for r in _regions())


def cpu_seconds() -> float:
    """CPU time (user + system, all threads) this process has used so far: CLOCK_PROCESS_CPUTIME_ID,
    the same count as ``os.times()`` / ``/proc/self/stat`` but with ns rather than 10 ms ticks."""
    return time.process_time()


def exc_info(e: BaseException) -> dict[str, Any]:
    return {"type": type(e).__name__, "mro": [c.__name__ for c in type(e).__mro__],
            "message": str(e), "traceback": "".join(traceback.format_exception(e))}


async def outcome(aw: Awaitable[Any]) -> dict[str, Any]:
    """Await ``aw``; ``{"ok": True}`` or ``{"ok": False, "type": ..., "mro": [...], ...}``."""
    try:
        await aw
    except Exception as e:
        return {"ok": False, **exc_info(e)}
    return {"ok": True}


def failed_with(out: dict[str, Any], exc_type: type[BaseException]) -> bool:
    """True if an outcome is a failure with ``exc_type`` (or a subclass) by name."""
    return not out["ok"] and exc_type.__name__ in out["mro"]


# =================================================================== the pipe
class RemoteDied(RuntimeError):
    pass


class HarnessTimeout(AssertionError):
    pass


class RemoteError(AssertionError):
    """The remote scenario raised; ``info`` has its type, mro, message and traceback."""

    def __init__(self, info: dict[str, Any]) -> None:
        super().__init__(f"remote scenario failed: {info['type']}: {info['message']}\n{info['traceback']}")
        self.info = info


class Channel:
    """Messages over a multiprocessing pipe, awaited through the running loop's ``add_reader``."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self.inbox: list[tuple[Any, ...]] = []
        self.eof = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._waiters: list[asyncio.Future[None]] = []
        self.who: Callable[[], str] = lambda: "the other process"

    def send(self, msg: tuple[Any, ...]) -> None:
        try:
            self.conn.send(msg)
        except (OSError, ValueError) as e:
            raise RemoteDied(f"{self.who()} is gone ({e})") from e

    def attach(self) -> None:
        loop = asyncio.get_running_loop()
        if self._loop is loop:
            return
        self.detach()
        self._loop = loop
        self._waiters = []
        if not self.eof:
            loop.add_reader(self.conn.fileno(), self._pump)
            # uvloop (libuv's uv_poll_init) makes the fd non-blocking; Connection.recv() needs it
            # blocking, or a message larger than the socket buffer fails half-read.
            os.set_blocking(self.conn.fileno(), True)
        self._pump()

    def detach(self) -> None:
        loop, self._loop = self._loop, None
        if loop is not None and not loop.is_closed() and not self.eof:
            with contextlib.suppress(Exception):
                loop.remove_reader(self.conn.fileno())

    def _pump(self) -> None:
        try:
            while not self.eof and self.conn.poll():
                self.inbox.append(self.conn.recv())
        except (EOFError, OSError) as e:
            if not isinstance(e, EOFError):
                print(f"harness: pid {os.getpid()}: reading the pipe failed: {e!r}", file=sys.stderr)
            self.eof = True
            if self._loop is not None:
                with contextlib.suppress(Exception):
                    self._loop.remove_reader(self.conn.fileno())
        waiters, self._waiters = self._waiters, []
        for f in waiters:
            if not f.done():
                f.set_result(None)

    async def get(self, match: Callable[[tuple[Any, ...]], bool], timeout: float | None) -> tuple[Any, ...]:
        """The first message (in arrival order) that ``match`` accepts; it is removed from the inbox."""
        self.attach()
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            for i, m in enumerate(self.inbox):
                if match(m):
                    return self.inbox.pop(i)
            if self.eof:
                raise RemoteDied(f"{self.who()} closed the pipe: it exited or was killed")
            fut = loop.create_future()
            self._waiters.append(fut)
            remaining = None if deadline is None else deadline - loop.time()
            if remaining is not None and remaining <= 0:
                raise HarnessTimeout(f"no matching message within {timeout:g} s; inbox: {self.inbox!r:.300}")
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(fut, remaining)

    def purge(self, sid: int) -> None:
        self.inbox = [m for m in self.inbox if not (len(m) > 1 and m[1] == sid)]


# =================================================================== remote side
class Control:
    """What a scenario uses to talk to the test: ``emit`` events, ``wait`` for the test's ``tell``."""

    def __init__(self, ch: Channel, sid: int) -> None:
        self.ch = ch
        self.sid = sid
        self.kept: dict[str, torch.Tensor] = {}  # tensors reused by steps with keep="name"

    def emit(self, kind: str, payload: Any = None) -> None:
        self.ch.send(("event", self.sid, kind, payload))

    async def wait(self, kind: str, timeout: float = DEFAULT_TIMEOUT) -> Any:
        sid = self.sid

        def match(m: tuple[Any, ...]) -> bool:
            return bool(m[1] == sid and (m[0] == "abort" or (m[0] == "tell" and m[2] == kind)))

        m = await self.ch.get(match, timeout)
        if m[0] == "abort":
            raise RuntimeError("the test aborted this scenario")
        return m[3]


def _die_with_parent(parent: int) -> None:
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: never outlive the test process
    except Exception:
        pass
    if os.getppid() != parent:  # it died before the prctl
        os._exit(1)


def _remote_main(conn: Any, parent: int) -> None:
    _die_with_parent(parent)
    import logging

    # The core's warnings go to stderr, which pytest captures and shows with a failing test.
    logging.basicConfig(level=logging.INFO,
                        format=f"remote {os.getpid()} %(name)s %(levelname)s: %(message)s")
    aiomooncake.run(_serve(Channel(conn)))


async def _serve(ch: Channel) -> None:
    ch.attach()
    ch.send(("hello", os.getpid()))
    while True:
        try:
            msg = await ch.get(lambda m: m[0] in ("run", "quit"), None)
        except RemoteDied:
            print(f"harness: remote {os.getpid()}: the pipe to the test process closed; exiting",
                  file=sys.stderr)
            return  # the test process is gone
        if msg[0] == "quit":
            return
        _, sid, name, kwargs, options = msg
        await _run_one(ch, sid, name, kwargs, options)
        ch.purge(sid)


async def _run_one(ch: Channel, sid: int, name: str, kwargs: dict[str, Any], options: dict[str, Any]) -> None:
    peer = None
    reply: tuple[Any, ...]
    try:
        lst = await aiomooncake.listen(HOST, 0, **options)
        try:
            ch.send(("port", sid, lst.port))
            peer = await asyncio.wait_for(lst.accept(), DEFAULT_TIMEOUT)
        finally:
            await lst.close()
        value = await SCENARIOS[name](peer, Control(ch, sid), **kwargs)
        reply = ("result", sid, value)
    except Exception as e:
        reply = ("error", sid, exc_info(e))
    if peer is not None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(peer.close(), CLOSE_GRACE)
    ch.send(reply)


# ------------------------------------------------------------------- scenarios
async def echo(peer: aiomooncake.Peer, ctl: Control, count: int = 1, tag: int = 0) -> list[dict[str, Any]]:
    """``count`` times: ``recv_tensor(tag)`` and send the tensor straight back. Returns what arrived
    and how many engine writes sending it back took."""
    seen = []
    for _ in range(count):
        t = await peer.recv_tensor(tag)
        info = {"dtype": dtype_name(t.dtype), "shape": tuple(t.shape), "contiguous": t.is_contiguous(),
                "device": str(t.device)}
        w0 = writes_submitted()
        await peer.send(t, tag)
        info["writes"] = writes_submitted() - w0
        seen.append(info)
        del t
    return seen


async def _step(peer: aiomooncake.Peer, ctl: Control, st: dict[str, Any]) -> Any:
    op = st["op"]
    timeout = st.get("timeout")
    if op == "send":
        src = ctl.kept.get(st["keep"]) if st.get("keep") else None
        if src is None:
            src = make_tensor(st["spec"])
        else:
            src.copy_(make_tensor(st["spec"]))
        if st.get("keep"):
            ctl.kept[st["keep"]] = src
        if st.get("noncontiguous"):
            src = src.t()
        w0, r0 = writes_submitted(), registrations()
        out = await outcome(peer.send(src, st.get("tag", 0), timeout=timeout))
        out.update(writes=writes_submitted() - w0, registrations=registrations() - r0)
        return out
    if op == "recv":
        sp = st["spec"]
        dest = ctl.kept.get(st["keep"]) if st.get("keep") else None
        if dest is None:
            dest = dest_for(st.get("dest", sp))
        if st.get("keep"):
            ctl.kept[st["keep"]] = dest
        r0 = registrations()
        out = await outcome(peer.recv(dest, st.get("tag", 0), timeout=timeout))
        out["registrations"] = registrations() - r0
        if out["ok"]:
            out["match"] = same_bytes(dest, make_tensor(sp))
        else:
            out["untouched"] = untouched(dest)
        return out
    if op == "recv_tensor":
        got: list[torch.Tensor] = []

        async def rt() -> None:
            got.append(await peer.recv_tensor(st.get("tag", 0), timeout=timeout))

        out = await outcome(rt())
        if out["ok"]:
            t = got[0]
            out.update(dtype=dtype_name(t.dtype), shape=tuple(t.shape))
            if "spec" in st:
                out["match"] = same_bytes(t, make_tensor(st["spec"]))
        return out
    if op == "echo":
        return await echo(peer, ctl, st.get("count", 1), st.get("tag", 0))
    if op == "gather":
        tasks = [asyncio.ensure_future(_step(peer, ctl, s)) for s in st["steps"]]
        await asyncio.sleep(0)  # every task reached its first await: all operations are posted
        if st.get("posted"):
            ctl.emit(st["posted"], len(tasks))
        return await asyncio.gather(*tasks)
    if op == "wait":
        return await ctl.wait(st["kind"])
    if op == "emit":
        ctl.emit(st["kind"], st.get("payload"))
        return None
    if op == "sleep":
        await asyncio.sleep(st["seconds"])
        return None
    if op == "close":
        await peer.close()
        return None
    if op == "stats":
        return {"registrations": registrations(), "writes": writes_submitted()}
    if op == "idle_cpu":
        c0, t0 = cpu_seconds(), time.monotonic()
        await asyncio.sleep(st["seconds"])
        return {"cpu": cpu_seconds() - c0, "wall": time.monotonic() - t0}
    if op == "exit":
        os._exit(st.get("code", 0))
    raise ValueError(f"unknown step {op!r}")


async def script(peer: aiomooncake.Peer, ctl: Control, steps: list[dict[str, Any]]) -> list[Any]:
    """Run ``steps`` (built with :class:`do`) in order; return each step's result. A step with
    ``emit=kind`` also reports its result to the test as event ``kind`` as soon as it is done."""
    results = []
    for st in steps:
        r = await _step(peer, ctl, st)
        if st.get("emit"):
            ctl.emit(st["emit"], r)
        results.append(r)
    return results


SCENARIOS: dict[str, Callable[..., Awaitable[Any]]] = {"echo": echo, "script": script}


class do:  # a namespace of step builders, read as do.send(...), do.recv(...)
    """Builders for :func:`script` steps (plain dicts, so they cross the pipe)."""

    @staticmethod
    def send(tag: int, sp: dict[str, Any], **kw: Any) -> dict[str, Any]:
        """Send ``make_tensor(sp)`` (``noncontiguous=True``: its transpose; ``keep="x"``: from the
        same tensor as other steps with that name, refilled). Result: an outcome plus the engine
        ``writes`` and ``registrations`` it cost."""
        return {"op": "send", "tag": tag, "spec": sp, **kw}

    @staticmethod
    def recv(tag: int, sp: dict[str, Any], dest: dict[str, Any] | None = None, **kw: Any) -> dict[str, Any]:
        """Receive into a sentinel-filled tensor shaped like ``dest`` (default ``sp``; ``keep="x"``:
        the same tensor as other steps with that name); the result says whether the bytes equal
        ``make_tensor(sp)`` or, on failure, whether it is untouched, and the registrations it cost."""
        st = {"op": "recv", "tag": tag, "spec": sp, **kw}
        if dest is not None:
            st["dest"] = dest
        return st

    @staticmethod
    def recv_tensor(tag: int, sp: dict[str, Any] | None = None, **kw: Any) -> dict[str, Any]:
        st = {"op": "recv_tensor", "tag": tag, **kw}
        if sp is not None:
            st["spec"] = sp
        return st

    @staticmethod
    def echo(tag: int = 0, count: int = 1, **kw: Any) -> dict[str, Any]:
        return {"op": "echo", "tag": tag, "count": count, **kw}

    @staticmethod
    def gather(steps: list[dict[str, Any]], posted: str | None = None, **kw: Any) -> dict[str, Any]:
        """Start ``steps`` concurrently, in order; emit event ``posted`` once all are posted."""
        return {"op": "gather", "steps": steps, "posted": posted, **kw}

    @staticmethod
    def wait(kind: str, **kw: Any) -> dict[str, Any]:
        return {"op": "wait", "kind": kind, **kw}

    @staticmethod
    def emit(kind: str, payload: Any = None) -> dict[str, Any]:
        return {"op": "emit", "kind": kind, "payload": payload}

    @staticmethod
    def sleep(seconds: float) -> dict[str, Any]:
        return {"op": "sleep", "seconds": seconds}

    @staticmethod
    def close(**kw: Any) -> dict[str, Any]:
        return {"op": "close", **kw}

    @staticmethod
    def stats(**kw: Any) -> dict[str, Any]:
        return {"op": "stats", **kw}

    @staticmethod
    def idle_cpu(seconds: float, **kw: Any) -> dict[str, Any]:
        return {"op": "idle_cpu", "seconds": seconds, **kw}


# =================================================================== test side
class Scenario:
    """A running remote scenario and the test's connected :attr:`peer` to it."""

    def __init__(self, remote: Remote, sid: int, peer: aiomooncake.Peer) -> None:
        self.remote = remote
        self.sid = sid
        self.peer = peer
        self.final: tuple[Any, ...] | None = None

    def _final_or(self, kind: str | None) -> Callable[[tuple[Any, ...]], bool]:
        sid = self.sid

        def match(m: tuple[Any, ...]) -> bool:
            if len(m) < 2 or m[1] != sid:
                return False
            return m[0] in ("result", "error") or (kind is not None and m[0] == "event" and m[2] == kind)

        return match

    async def _get(self, kind: str | None, timeout: float, fatal: bool = True) -> tuple[Any, ...]:
        if self.final is not None:
            return self.final
        assert self.remote.ch is not None
        try:
            m = await self.remote.ch.get(self._final_or(kind), timeout)
        except RemoteDied:
            self.remote.broken = True
            raise
        except HarnessTimeout:
            if fatal:
                self.remote.broken = True
            raise
        if m[0] in ("result", "error"):
            self.final = m
        return m

    async def event(self, kind: str, timeout: float = DEFAULT_TIMEOUT) -> Any:
        """The payload of the scenario's next ``kind`` event."""
        m = await self._get(kind, timeout)
        if m[0] == "event":
            return m[3]
        if m[0] == "error":
            raise RemoteError(m[2])
        raise AssertionError(f"the remote scenario ended before emitting {kind!r}: {m[2]!r:.500}")

    async def no_event(self, kind: str, seconds: float) -> None:
        """Assert that the scenario neither emits ``kind`` nor ends within ``seconds``."""
        try:
            m = await self._get(kind, seconds, fatal=False)
        except HarnessTimeout:
            return
        raise AssertionError(f"the remote scenario emitted or ended early: {m!r:.500}")

    def tell(self, kind: str, payload: Any = None) -> None:
        """Deliver ``kind`` to the scenario's ``ctl.wait(kind)`` (a script's ``do.wait``)."""
        assert self.remote.ch is not None, "the remote process is not running"
        self.remote.ch.send(("tell", self.sid, kind, payload))

    async def result(self, timeout: float = DEFAULT_TIMEOUT) -> Any:
        """The scenario's return value (it has closed its peer by then); RemoteError if it raised."""
        m = await self._get(None, timeout)
        if m[0] == "error":
            raise RemoteError(m[2])
        return m[2]


class Remote:
    """A peer process. ``start()`` spawns it; ``scenario(...)`` runs one scripted conversation."""

    def __init__(self, name: str = "aiomooncake-remote") -> None:
        self.name = name
        self.proc: Any = None
        self.ch: Channel | None = None
        self.pid = 0
        self.broken = False
        self._sid = 0

    # ------------------------------------------------------------ lifecycle (sync)
    def spawn(self) -> None:
        parent, child = CTX.Pipe()
        self.proc = CTX.Process(target=_remote_main, args=(child, os.getpid()), name=self.name, daemon=True)
        self.proc.start()
        child.close()
        self.ch = Channel(parent)
        self.ch.who = self.describe
        self.broken = False

    def wait_ready(self, timeout: float = STARTUP_TIMEOUT) -> None:
        assert self.ch is not None
        if not self.ch.conn.poll(timeout):
            self.broken = True
            raise HarnessTimeout(f"the remote process did not start within {timeout:g} s")
        msg = self.ch.conn.recv()
        assert msg[0] == "hello", msg
        self.pid = msg[1]

    def start(self) -> Remote:
        self.spawn()
        self.wait_ready()
        return self

    def describe(self) -> str:
        """Who the remote is and, if it is gone, how it ended (a negative code is the signal)."""
        if self.proc is None:
            return "the remote process (stopped)"
        self.proc.join(1.0)
        state = "running" if self.proc.is_alive() else f"exit code {self.proc.exitcode}"
        return f"the remote process {self.pid} ({state})"

    @property
    def healthy(self) -> bool:
        return (not self.broken and self.proc is not None and self.proc.is_alive()
                and self.ch is not None and not self.ch.eof)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        os.kill(self.pid, sig)
        if sig in (signal.SIGKILL, signal.SIGTERM, signal.SIGSTOP):
            self.broken = True

    def pause(self) -> None:
        """Freeze the whole process (SIGSTOP): its engine threads and event loop stop. Keep it
        shorter than the heartbeat timeout, then :meth:`resume`."""
        os.kill(self.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.pid, signal.SIGCONT)

    def ask_to_quit(self) -> None:
        if self.proc is not None and self.proc.is_alive() and not self.broken:
            with contextlib.suppress(Exception):
                assert self.ch is not None
                self.ch.conn.send(("quit",))

    def stop(self, timeout: float = 5.0) -> None:
        """Ask the process to exit; kill it if it does not. Always returns with it gone."""
        if self.proc is None:
            return
        self.ask_to_quit()
        self.proc.join(timeout)
        if self.proc.is_alive():
            with contextlib.suppress(OSError):
                os.kill(self.proc.pid, signal.SIGCONT)  # a SIGSTOPped process cannot act on SIGTERM
            self.proc.kill()
            self.proc.join(timeout)
        if self.ch is not None:
            self.ch.detach()
            with contextlib.suppress(Exception):
                self.ch.conn.close()
        self.proc = None

    def restart(self) -> Remote:
        self.stop()
        return self.start()

    # ------------------------------------------------------------ scenarios (async)
    @contextlib.asynccontextmanager
    async def scenario(self, name: str = "script", *, options: dict[str, Any] | None = None,
                       remote_options: dict[str, Any] | None = None,
                       **kwargs: Any) -> AsyncIterator[Scenario]:
        """Start scenario ``name`` (``script`` takes ``steps=[...]``) in the remote and connect to it.

        ``options`` go to both ``connect`` (here) and ``listen`` (there) unless ``remote_options``
        is given; both default to :data:`TE_OPTIONS`. On exit the local peer is closed and the
        remote must finish within CLOSE_GRACE seconds, or the remote is marked broken (the fixtures
        replace it)."""
        assert self.ch is not None and self.healthy, "the remote process is not running"
        ch = self.ch
        ch.attach()
        self._sid += 1
        sid = self._sid
        opts = {**TE_OPTIONS, **(options or {})}
        ropts = {**TE_OPTIONS, **(remote_options if remote_options is not None else opts)}
        ch.send(("run", sid, name, kwargs, ropts))
        try:
            m = await ch.get(lambda m: m[1] == sid and m[0] in ("port", "error"), DEFAULT_TIMEOUT)
        except BaseException:
            self.broken = True
            raise
        if m[0] == "error":
            raise RemoteError(m[2])
        try:
            peer = await aiomooncake.connect(HOST, m[2], **opts)
        except BaseException:
            self.broken = True
            raise
        sc = Scenario(self, sid, peer)
        failure: BaseException | None = None
        try:
            if opts.get("host_transport") == "te" and ropts.get("host_transport") == "te":
                assert peer.transports.get("cpu") == "tcp", f"not the engine over TCP: {peer.transports}"
            yield sc
        except BaseException as e:
            failure = e
            raise
        finally:
            try:
                await asyncio.wait_for(peer.close(), CLOSE_GRACE)
            except BaseException:
                self.broken = True
                raise
            finally:
                if sc.final is None and not self.broken:
                    with contextlib.suppress(RemoteDied):
                        ch.send(("abort", sid))
                    with contextlib.suppress(HarnessTimeout, RemoteDied):
                        await sc._get(None, CLOSE_GRACE)
                    if sc.final is None:
                        self.broken = True
                if failure is not None:
                    note = self._final_note(sc)
                    if sys.version_info >= (3, 11):
                        failure.add_note(note)
                    else:  # no BaseException.add_note before 3.11; pytest prints __notes__ either way
                        setattr(failure, "__notes__", [*getattr(failure, "__notes__", []), note])  # noqa: B010
                ch.purge(sid)
                ch.detach()

    def _final_note(self, sc: Scenario) -> str:
        """How the remote side of a failed test ended, for the failure report."""
        m = sc.final
        if m is None:
            return f"remote scenario {sc.sid}: no final word; {self.describe()}"
        if m[0] == "error":
            info = m[2]
            return f"remote scenario {sc.sid} raised {info['type']}: {info['message']}\n{info['traceback']}"
        return f"remote scenario {sc.sid} returned {m[2]!r:.2000}"


def stop_remotes(remotes: list[Remote]) -> None:
    """Stop several remotes, letting them shut down in parallel."""
    for r in remotes:
        r.ask_to_quit()
    for r in remotes:
        r.stop()


def start_remotes(n: int) -> list[Remote]:
    """Spawn ``n`` remote processes at once (their start-ups overlap) and wait for all of them."""
    remotes = [Remote(f"aiomooncake-remote-{i}") for i in range(n)]
    try:
        for r in remotes:
            r.spawn()
        for r in remotes:
            r.wait_ready()
    except BaseException:
        stop_remotes(remotes)
        raise
    return remotes


async def wait_until(pred: Callable[[], bool], timeout: float, interval: float = 0.005) -> bool:
    """Sleep-poll ``pred`` (cheap checks only) until it holds or ``timeout`` passes."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not pred():
        if loop.time() >= deadline:
            return False
        await asyncio.sleep(interval)
    return True
