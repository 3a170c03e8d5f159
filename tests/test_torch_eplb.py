"""The EPLB example at small scale: bit-exact on aiomooncake (2 and 4 ranks, spawned and under
torchrun), the same plan and bytes as gloo, and a clear message for an unavailable backend."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "eplb_rebalance.py"
SMALL = ["--scale", "0.05", "--layers", "2", "--experts-per-rank", "3", "--redundant", "2", "--iters", "2",
         "--timeout", "60"]


def _run(cmd: list[str], timeout: float = 150.0) -> subprocess.CompletedProcess[str]:
    """Run in a new session so that on timeout the whole tree (spawned ranks too) is killed."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", GLOG_minloglevel="2")
    p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True)
    try:
        out, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, _ = p.communicate()
        pytest.fail(f"{' '.join(cmd)} timed out after {timeout} s:\n{out[-4000:]}")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGKILL)  # stragglers of a finished run, if any
    return subprocess.CompletedProcess(cmd, p.returncode, out, "")


def _result(proc: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert proc.returncode == 0, proc.stdout[-4000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert len(lines) == 1, proc.stdout[-4000:]
    res: dict[str, Any] = json.loads(lines[0][len("RESULT "):])
    return res


def test_eplb_two_ranks_matches_gloo() -> None:
    ours = _result(_run([sys.executable, str(EXAMPLE), "--nprocs", "2", "--backend", "aiomooncake", *SMALL]))
    ref = _result(_run([sys.executable, str(EXAMPLE), "--nprocs", "2", "--backend", "gloo", *SMALL]))
    assert ours["verified_bytes"] > 0 and ours["verified_bytes"] == ref["verified_bytes"]
    assert ours["layer_bytes"] == ref["layer_bytes"] and sum(ours["layer_bytes"]) > 0
    assert len(ours["layer_ms"]) == 4


def test_eplb_four_ranks_under_torchrun() -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "4",
           str(EXAMPLE), "--backend", "aiomooncake", *SMALL]
    res = _result(_run(cmd, timeout=240))
    assert res["world"] == 4 and res["verified_bytes"] > 0


def test_eplb_unavailable_backend_says_so() -> None:
    proc = _run([sys.executable, str(EXAMPLE), "--nprocs", "2", "--backend", "mooncake", *SMALL], timeout=60)
    try:
        from mooncake import pg  # noqa: F401
    except ImportError:
        assert proc.returncode != 0
        assert "from mooncake import pg" in proc.stdout and "not available" in proc.stdout
    else:  # pragma: no cover - a machine with Mooncake's PG
        assert proc.returncode == 0
