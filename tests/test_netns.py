"""Which data plane peers on separate "hosts" choose (network namespaces joined through a bridge,
tests/netns.py), and the torch backend's rendezvous across namespaces. Real processes, the real
Transfer Engine over the veths, every byte compared.

* Separate PID namespaces (as containers without a shared PID namespace): neither peer can see
  the other's process, so the same-host copy (process_vm_readv) must not be used: ``data_path`` is
  ``te:tcp`` on both sides, although both report the same ``host_id``. Also when only one side is
  in a PID namespace of its own (the other could see it, but not the reverse).
* Separate network namespaces, one PID namespace: the same-host copy works there (it needs no
  network), so it is kept: ``shm``, and the receives really are pulled.
* ``MASTER_ADDR`` in one namespace, ranks in others: every rank publishes the address of its own
  interface (the one that routes to the master), which the other ranks reach.
* The fixture removes what it made, and says why it skips.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from typing import Any

import pytest
import torch
from netns import HERE, ROOT, Hosts, NsPeer, _die_with_parent, hosts_fixture  # noqa: F401

from aiomooncake.bench import netns
from aiomooncake.bench.netns import Network

SIZES = [1000, 70000, 3 * 1024 * 1024 + 7]  # eager, then rendezvous (pulled on the shm path)


async def pair(server: NsPeer, client: NsPeer, name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    port = (await server.call("listen", name=name, host=server.addr, options={}))["port"]
    accepted = server.post("accept", listener=name, peer=name)
    c = await client.call("connect", peer=name, host=server.addr, port=port, options={})
    s = await asyncio.wait_for(accepted, 30)
    assert s["ok"], s
    return c, s


async def both_ways(a: NsPeer, b: NsPeer, name: str) -> None:
    """Every size from ``a`` to ``b`` and back, bit-exact."""
    for k, n in enumerate(SIZES):
        for src, dst in ((a, b), (b, a)):
            got = dst.post("recv", peer=name, tag=k, nbytes=n, seed=k, buf="x")
            await src.call("send", peer=name, tag=k, nbytes=n, seed=k)
            reply = await asyncio.wait_for(got, 30)
            assert reply["ok"] and reply["match"], (name, n, reply)


async def test_the_data_plane_follows_the_pid_namespaces(hosts: Hosts) -> None:
    """Four hosts: A and D each in PID namespaces of their own, B and C in ours. B<->C may copy
    (``shm``); A<->D, A->B and B->A (client->server) must use the engine (``te:tcp``)."""
    net = hosts.network(4)
    a, b, c, d = await asyncio.gather(hosts.peer(net, 0, own_pid_ns=True), hosts.peer(net, 1),
                                      hosts.peer(net, 2), hosts.peer(net, 3, own_pid_ns=True))
    info = {p: await p.call("info") for p in (a, b, c, d)}
    assert len({i["host_id"] for i in info.values()}) == 1, "one host as far as host_id goes"
    assert len({i["netns"] for i in info.values()}) == 4
    assert info[a]["pid"] == info[d]["pid"] == 1 and info[a]["pidns"] != info[d]["pidns"]
    assert info[b]["pidns"] == info[c]["pidns"] != info[a]["pidns"]
    assert info[b]["shm"] is None, f"the same-host path is unavailable here: {info[b]['shm']}"
    cases = [(b, c, "shm"), (a, d, "te:tcp"), (a, b, "te:tcp"), (b, a, "te:tcp")]
    for k, (server, client, want) in enumerate(cases):
        name = f"p{k}"
        cinfo, sinfo = await pair(server, client, name)
        for side in (cinfo, sinfo):
            assert side["data_path"] == want, (server.label, client.label, side)
            assert side["data_paths"] == {"cpu": want, "cuda": "te:tcp"}, side
        pulls = [(await p.call("info"))["shm_pulls"] for p in (server, client)]
        await both_ways(client, server, name)
        after = [(await p.call("info"))["shm_pulls"] for p in (server, client)]
        pulled = [x - y for x, y in zip(after, pulls, strict=True)]
        # each side received the two rendezvous sizes: pulled by itself on shm, written by the engine else
        assert pulled == ([2, 2] if want == "shm" else [0, 0]), (want, pulled)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
async def test_separate_pid_namespaces_do_not_use_cuda_ipc(hosts: Hosts) -> None:
    """On a GPU host, peers in separate PID and network namespaces (as containers) do not take the
    engine's NVLink transport on the word of host_id alone: CUDA IPC is tried in the handshake (its
    probe mapped and read back) and, where it does not work, CUDA tensors take the engine's network
    path; either way they arrive."""
    net = hosts.network(2)
    a, b = await asyncio.gather(hosts.peer(net, 0, own_pid_ns=True), hosts.peer(net, 1, own_pid_ns=True))
    for side in await pair(a, b, "g"):
        assert side["data_paths"]["cuda"] in ("cuda-ipc", "te:tcp", "te:rdma"), side
    got = a.post("recv", peer="g", tag=1, nbytes=1 << 20, seed=3, buf="g", device="cuda")
    await b.call("send", peer="g", tag=1, nbytes=1 << 20, seed=3, device="cuda")
    reply = await asyncio.wait_for(got, 30)
    assert reply["match"], reply


async def test_torch_rendezvous_across_namespaces(hosts: Hosts) -> None:
    """MASTER_ADDR is rank 0's namespace; ranks 1 and 2 are in two others, each rank in its own
    PID namespace too. Each publishes its own namespace's address and every pair exchanges
    tensors over the engine."""
    net = hosts.network(3)
    env = {**os.environ, "MASTER_ADDR": net.addrs[0], "MASTER_PORT": "29500", "WORLD_SIZE": "3",
           "PYTHONPATH": os.pathsep.join(p for p in (ROOT, HERE, os.environ.get("PYTHONPATH")) if p)}
    env.pop("AIOMOONCAKE_HOST", None)
    procs = [await asyncio.create_subprocess_exec(
        *net.argv(r, [sys.executable, os.path.join(HERE, "netns_torch_rank.py")], own_pid_ns=True),
        stdout=asyncio.subprocess.PIPE, env={**env, "RANK": str(r), "LOCAL_RANK": "0"},
        preexec_fn=_die_with_parent) for r in range(3)]
    try:
        outs = await asyncio.wait_for(asyncio.gather(*(p.communicate() for p in procs)), 150)
    finally:
        for p in procs:
            if p.returncode is None:
                p.kill()
    recs = [json.loads(out.decode().strip().splitlines()[-1]) for out, _ in outs]
    for r, rec in enumerate(recs):
        assert "error" not in rec, (r, rec)
        assert procs[r].returncode == 0
        assert rec["host"] == net.addrs[r], f"rank {r} published {rec['host']}, not its namespace's address"
        for j, ok in rec["exact"].items():
            assert ok, f"rank {r} received wrong bytes from rank {j}"
        assert all(p == {"cpu": "te:tcp", "cuda": "te:tcp"} for p in rec["paths"].values()), rec


def test_the_network_is_removed_even_when_the_test_fails() -> None:
    """Namespaces and the processes in them are gone after close(), also when an exception ends
    the ``with`` block; a namespace of a dead process is swept."""
    why = netns.unavailable()
    if why is not None:
        pytest.skip(f"cannot make network namespaces: {why}")
    with pytest.raises(RuntimeError), Network(3) as net:
        sleeper = subprocess.Popen(net.argv(1, ["sleep", "600"], own_pid_ns=True))
        assert net.hub is not None
        names = [*net.names, net.hub]
        raise RuntimeError("the test failed")
    assert sleeper.wait(10) is not None
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not any(n in listed.split() for n in names), listed
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = f"{netns.PREFIX}-{dead.pid}-0-h0"
    subprocess.run(["ip", "netns", "add", stale], check=True)
    assert stale in netns.sweep()
    assert stale not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout


def test_no_namespaces_without_privileges() -> None:
    """An unprivileged process gets a reason (which the fixture's skip shows), not an exception."""
    if os.geteuid() != 0 or subprocess.run(["which", "setpriv"], capture_output=True).returncode != 0:
        pytest.skip("needs root and setpriv to drop privileges")
    nobody = ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups", sys.executable]
    if subprocess.run([*nobody, "-c", "pass"], capture_output=True, timeout=60, cwd="/").returncode != 0:
        pytest.skip("an unprivileged user cannot run this Python interpreter")
    # the module alone (stdlib only): the unprivileged user may not read root's site-packages
    code = (f"import importlib.util as u; s = u.spec_from_file_location('n', {netns.__file__!r}); "
            "m = u.module_from_spec(s); s.loader.exec_module(m); print(m.unavailable())")
    proc = subprocess.run([*nobody, "-c", code], capture_output=True, text=True, timeout=60, cwd="/")
    assert proc.returncode == 0, proc.stderr
    assert "ip netns add" in proc.stdout and "needs root" in proc.stdout, proc.stdout
