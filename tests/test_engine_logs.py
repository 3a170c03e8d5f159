"""The Transfer Engine's own log lines (glog) stay out of the user's terminal by default: a process
that starts the engine and moves a tensor through it prints nothing on stderr, whichever way the
installed wheel links glog (into the engine's module, or as its own ``libglog``)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = """
import asyncio, torch, aiomooncake

async def main():
    opts = dict(host_transport="te", transport="nvlink") if {cuda} else dict(host_transport="te")
    lst = await aiomooncake.listen("127.0.0.1", 0, **opts)
    acc = asyncio.ensure_future(lst.accept())
    c = await aiomooncake.connect("127.0.0.1", lst.port, **opts)
    s = await acc
    dev = "cuda" if {cuda} else "cpu"
    x = torch.arange(1 << 18, dtype=torch.float32, device=dev)
    y = torch.empty_like(x)
    await asyncio.gather(c.send(x, 1), s.recv(y, 1))
    assert torch.equal(x, y)
    await c.close(); await s.close(); await lst.close()
    print("moved", c.data_path)

asyncio.run(main())
"""

GLOG_LINE = re.compile(r"^[IWEF]\\d{4} |Logging before InitGoogleLogging|Local segment descriptor", re.M)


def run(cuda: bool) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("AIOMOONCAKE_ENGINE_LOGS", "GLOG_minloglevel")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-c", SCRIPT.format(cuda=cuda)], capture_output=True, text=True,
                          timeout=120, env=env, cwd=ROOT)


def test_the_engine_prints_nothing_by_default() -> None:
    proc = run(cuda=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "moved te:tcp" in proc.stdout, proc.stdout
    assert not GLOG_LINE.search(proc.stderr), proc.stderr


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_cuda_engine_prints_nothing_by_default() -> None:
    """The CUDA wheels load glog as a library of its own (the lent H200's printed "Local segment
    descriptor not found" at every engine start before its flag was set there too)."""
    proc = run(cuda=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "moved te:nvlink" in proc.stdout, proc.stdout
    assert not GLOG_LINE.search(proc.stderr), proc.stderr
