"""Separate "hosts" on one machine: network namespaces joined by veth pairs.

Two processes of one host reach each other over loopback, and aiomooncake then copies CPU tensors
with ``process_vm_readv``; what two hosts do (the Transfer Engine over a real link between two
network stacks) is reached only when forced. A :class:`Network` makes hosts that really are
separate: every host is a network namespace of its own with one interface (``amc0``) and one
address, joined to the others by a veth pair, either directly (two hosts: ``bridge=False``) or
through a bridge in a hub namespace (any number of hosts, so that one host's cable can be cut, or
its namespace destroyed, while the others stay connected). The benchmark's ``--netns`` runs its
two ranks in two such hosts; the tests (``tests/netns.py``) start peers in them, optionally in
their own PID, UTS and IPC namespaces too (:meth:`Network.argv`), and cut links mid-transfer.

Only what is created here is touched: namespaces named ``amc-<pid>-<n>-...`` (the creating
process's pid, so that :func:`sweep` can remove those of dead processes) and addresses
``10.231.<n>.<i>/24``, which exist only inside these namespaces (nothing is added to the caller's
namespace, so no route or address of the machine can clash). :meth:`Network.close` kills the
processes left in the namespaces and deletes them; it runs at exit too. Needs root (CAP_SYS_ADMIN,
CAP_NET_ADMIN) and iproute2's ``ip``; :func:`unavailable` says why not.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import itertools
import logging
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Sequence

log = logging.getLogger(__name__)

IFNAME = "amc0"  # the one interface of every host namespace (same name everywhere: GLOO_SOCKET_IFNAME)
PREFIX = "amc"
SUBNET = "10.231"
CLONE_NEWNET = 0x40000000
# What the tests start peers under when they must not share a PID namespace with anyone (and own
# hostname and IPC, as in a container); --kill-child: the peer dies with the unshare process.
UNSHARE = ("unshare", "--pid", "--fork", "--uts", "--ipc", "--mount-proc", "--kill-child")

_counter = itertools.count()
_open: set[Network] = set()
_lock = threading.Lock()


class NetnsError(RuntimeError):
    """A namespace, link or address could not be made or changed."""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and proc.returncode != 0:
        raise NetnsError(f"ip {' '.join(args)}: {proc.stderr.strip() or f'exit status {proc.returncode}'}")
    return proc


def unavailable() -> str | None:
    """Why namespaces cannot be made here (not root, no ``ip``, a kernel or container that refuses),
    or None when they can: tries to add and delete one."""
    if not hasattr(os, "geteuid") or not os.path.isdir("/proc/self/ns"):
        return "needs Linux network namespaces"
    if shutil.which("ip") is None:
        return "iproute2's `ip` is not installed"
    name = f"{PREFIX}-{os.getpid()}-probe{next(_counter)}"
    try:
        proc = _ip("netns", "add", name, check=False)
    except (OSError, subprocess.SubprocessError) as e:
        return f"`ip netns add` failed to run ({e})"
    if proc.returncode != 0:
        why = proc.stderr.strip() or f"exit status {proc.returncode}"
        root = "" if os.geteuid() == 0 else " (needs root: CAP_SYS_ADMIN and CAP_NET_ADMIN)"
        return f"`ip netns add` failed: {why}{root}"
    _ip("netns", "del", name, check=False)
    return None


def unshare_unavailable() -> str | None:
    """Why peers cannot get their own PID, UTS and IPC namespaces here, or None when they can."""
    if shutil.which("unshare") is None:
        return "util-linux's `unshare` is not installed"
    try:
        proc = subprocess.run([*UNSHARE, "true"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as e:
        return f"`unshare` failed to run ({e})"
    if proc.returncode != 0:
        return f"`{' '.join(UNSHARE)} true` failed: {proc.stderr.strip() or proc.returncode}"
    return None


def enter(name: str) -> None:
    """Move the calling thread into network namespace ``name`` (``/run/netns/<name>``). Sockets made
    before stay in the old one; threads started afterwards inherit the new one."""
    fd = os.open(f"/run/netns/{name}", os.O_RDONLY | os.O_CLOEXEC)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise NetnsError(f"setns into {name}: {os.strerror(err)}")
    finally:
        os.close(fd)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep() -> list[str]:
    """Delete the namespaces this module made in processes that are gone (a crashed test run, a
    killed benchmark), with any process still in them; returns their names."""
    proc = _ip("netns", "list", check=False)
    gone = []
    for line in proc.stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        m = re.fullmatch(rf"{PREFIX}-(\d+)-.+", name)
        if m and not _alive(int(m.group(1))):
            _kill_in(name)
            _ip("netns", "del", name, check=False)
            gone.append(name)
    if gone:
        log.info("removed %d namespaces left by dead processes: %s", len(gone), ", ".join(gone))
    return gone


def _pids_in(name: str) -> list[int]:
    proc = _ip("netns", "pids", name, check=False)
    return [int(p) for p in proc.stdout.split() if p.isdigit()]


def _kill_in(name: str) -> None:
    """SIGKILL every process in namespace ``name`` and wait (briefly) until none is left."""
    deadline = time.monotonic() + 5.0
    while True:
        pids = [p for p in _pids_in(name) if p != os.getpid()]
        if not pids or time.monotonic() > deadline:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.02)


class Network:
    """``hosts`` network namespaces, each with interface ``amc0`` at ``10.231.<n>.<i+1>/24``.

    ``bridge=False`` (two hosts only) joins them by one veth pair; otherwise every host's ``amc0``
    is one end of a veth pair whose other end, ``p<i>``, is a port of bridge ``br0`` in a hub
    namespace. Use as a context manager or call :meth:`close`; every network still open at exit is
    closed then."""

    def __init__(self, hosts: int = 2, *, bridge: bool = True) -> None:
        if hosts < 1 or (not bridge and hosts != 2):
            raise ValueError("a network has >= 1 host; without a bridge, exactly 2")
        self.n = next(_counter)
        self.tag = f"{PREFIX}-{os.getpid()}-{self.n}"
        self.bridge = bridge
        self.names = [f"{self.tag}-h{i}" for i in range(hosts)]
        self.hub = f"{self.tag}-hub" if bridge else None
        self.addrs = [f"{SUBNET}.{self.n % 250}.{i + 1}" for i in range(hosts)]
        self.closed = False
        with _lock:
            _open.add(self)
        try:
            if self.hub is not None:
                self._add_ns(self.hub)
                _ip("-n", self.hub, "link", "add", "br0", "type", "bridge")
                _ip("-n", self.hub, "link", "set", "br0", "up")
            for i in range(hosts):
                self._add_host(i)
            if self.hub is None:  # both ends are made inside their namespaces: no name clash
                a, b = self.names
                _ip("link", "add", IFNAME, "address", self.mac(0), "netns", a, "type", "veth", "peer",
                    "name", IFNAME, "address", self.mac(1), "netns", b)
                for i, name in enumerate(self.names):
                    self._configure(name, self.addrs[i])
        except BaseException:
            self.close()
            raise

    def __repr__(self) -> str:
        return f"<Network {self.tag} hosts {self.addrs}{' (closed)' if self.closed else ''}>"

    def __enter__(self) -> Network:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ making
    @staticmethod
    def _add_ns(name: str) -> None:
        _ip("netns", "add", name)
        _ip("-n", name, "link", "set", "lo", "up")

    def _add_host(self, i: int) -> None:
        name = self.names[i]
        self._add_ns(name)
        if self.hub is not None:
            self._cable(i)

    def _cable(self, i: int) -> None:
        """Host ``i``'s veth pair to the hub's bridge, and its address."""
        assert self.hub is not None
        name = self.names[i]
        _ip("link", "add", IFNAME, "address", self.mac(i), "netns", name, "type", "veth", "peer", "name",
            f"p{i}", "netns", self.hub)
        _ip("-n", self.hub, "link", "set", f"p{i}", "master", "br0")
        _ip("-n", self.hub, "link", "set", f"p{i}", "up")
        self._configure(name, self.addrs[i])

    def mac(self, i: int) -> str:
        """Host ``i``'s fixed MAC address (locally administered): a revived host keeps it, as a
        rebooted machine keeps its NIC's, so its neighbours' ARP entries stay right."""
        return f"02:a3:1e:{self.n % 256:02x}:{i % 256:02x}:01"

    @staticmethod
    def _configure(name: str, addr: str) -> None:
        _ip("-n", name, "addr", "add", f"{addr}/24", "dev", IFNAME)
        _ip("-n", name, "link", "set", IFNAME, "up")

    # ----------------------------------------------------------------- running
    def argv(self, i: int, command: Sequence[str], *, own_pid_ns: bool = False) -> list[str]:
        """The command line that runs ``command`` in host ``i``'s network namespace, and with
        ``own_pid_ns`` in new PID, UTS and IPC namespaces (it is then pid 1 there, sees only its own
        processes in /proc, and all of them die with it)."""
        return ["ip", "netns", "exec", self.names[i], *(UNSHARE if own_pid_ns else ()), *command]

    def pids(self, i: int) -> list[int]:
        """The processes in host ``i``'s network namespace."""
        return _pids_in(self.names[i])

    # ------------------------------------------------------------------ faults
    def _ends(self, i: int, side: str) -> tuple[str, str]:
        """(namespace, interface) of host ``i``'s cable at ``side``: "host" (its ``amc0``) or
        "far" (the hub's port, or without a bridge the other host's ``amc0``)."""
        if side == "host":
            return self.names[i], IFNAME
        if side != "far":
            raise ValueError(f"side is 'host' or 'far', got {side!r}")
        if self.hub is not None:
            return self.hub, f"p{i}"
        return self.names[1 - i], IFNAME

    def link_down(self, i: int, side: str = "far") -> None:
        """Cut host ``i`` off: ``ip link set ... down`` on one end of its cable. Nothing is sent to
        either side (no reset, no FIN): packets are dropped, as when a cable is pulled."""
        ns, dev = self._ends(i, side)
        _ip("-n", ns, "link", "set", dev, "down")

    def link_up(self, i: int, side: str = "far") -> None:
        ns, dev = self._ends(i, side)
        _ip("-n", ns, "link", "set", dev, "up")

    def throttle(self, i: int, mbit: int) -> bool:
        """Limit host ``i``'s traffic both ways to ``mbit`` Mbit/s (tc tbf on both ends of its cable),
        so that a large transfer is surely in flight when a fault hits; False if tc cannot."""
        if shutil.which("tc") is None:
            return False
        for side in ("host", "far"):
            ns, dev = self._ends(i, side)
            proc = subprocess.run(["ip", "netns", "exec", ns, "tc", "qdisc", "replace", "dev", dev, "root",
                                   "tbf", "rate", f"{mbit}mbit", "burst", "256kb", "latency", "50ms"],
                                  capture_output=True, text=True, timeout=30)
            if proc.returncode != 0:
                log.info("tc tbf on %s/%s failed: %s", ns, dev, proc.stderr.strip())
                return False
        return True

    def destroy(self, i: int) -> None:
        """Host ``i`` vanishes: its cable is deleted first (so no FIN or reset escapes), then every
        process in it is killed and the namespace deleted. :meth:`revive` makes it again."""
        name = self.names[i]
        _ip("-n", name, "link", "del", IFNAME, check=False)
        _kill_in(name)
        _ip("netns", "del", name, check=False)

    def revive(self, i: int) -> None:
        """Make host ``i`` again (a fresh namespace, same name and address) after :meth:`destroy`."""
        if self.hub is None:
            raise NetnsError("only a bridged network can revive a host")
        self._add_host(i)

    # ----------------------------------------------------------------- cleanup
    def close(self) -> None:
        """Kill every process left in the namespaces and delete them (idempotent)."""
        if self.closed:
            return
        self.closed = True
        for name in [*self.names, *([self.hub] if self.hub else [])]:
            _kill_in(name)
            _ip("netns", "del", name, check=False)
        with _lock:
            _open.discard(self)


@atexit.register
def _close_all() -> None:
    with _lock:
        nets = list(_open)
    for net in nets:
        with contextlib.suppress(Exception):
            net.close()
