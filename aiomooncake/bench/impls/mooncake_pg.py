"""``mooncake-pg``: Mooncake's own torch.distributed backend (``from mooncake import pg``, backend
``"mooncake"`` for CUDA tensors, ``"mooncake-cpu"`` for CPU ones), measured like gloo (see
``_torchdist``).

Importing it can crash the process (on GPU hosts it may need libstdc++ preloaded), so the launcher
only probes it in a throw-away subprocess and its ranks run, like every implementation, in child
processes: a crash becomes a reported skip reason with the signal's name, never the benchmark's end.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

from ..common import MODES as ALL_MODES
from ..common import RankContext, describe_exit
from ._torchdist import run_backend

NAME = "mooncake-pg"
WORLD = 2
MODES = ALL_MODES

LIBSTDCXX = "/usr/lib/x86_64-linux-gnu/libstdc++.so.6"
PROBE_TIMEOUT = 420  # recent wheels compile their torch adapter on first import (cached after)


def child_env(device: str) -> dict[str, str]:
    if device == "cuda" and os.path.exists(LIBSTDCXX):
        pre = os.environ.get("LD_PRELOAD", "")
        return {"LD_PRELOAD": f"{LIBSTDCXX}:{pre}" if pre else LIBSTDCXX}
    return {}


def available(device: str) -> str | None:
    env = {**os.environ, **child_env(device)}
    try:
        proc = subprocess.run([sys.executable, "-c", "from mooncake import pg"], env=env,
                              capture_output=True, text=True, timeout=PROBE_TIMEOUT)
    except subprocess.TimeoutExpired:
        return f"importing mooncake.pg did not finish within {PROBE_TIMEOUT} s"
    if proc.returncode == 0:
        return None
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    detail = lines[-1] if lines else ""
    if proc.returncode < 0:
        return f"importing mooncake.pg {describe_exit(proc.returncode)}" + (f": {detail}" if detail else "")
    if "ImportError" in proc.stderr or "ModuleNotFoundError" in proc.stderr:
        # e.g. "Mooncake PG was not built against torch==2.13.0" (the CPU wheel has no PG build):
        # the last exception's line, and the lines of its message after it
        starts = [i for i, ln in enumerate(lines) if re.match(r"[\w.]+(Error|Exception)\b", ln)]
        msg = " ".join(ln.strip() for ln in lines[starts[-1]:]) if starts else detail
        return f"mooncake.pg is not importable: {msg}"
    return f"importing mooncake.pg failed ({describe_exit(proc.returncode)}): {detail}"


def run(ctx: RankContext) -> None:
    from mooncake import pg  # noqa: F401  (registers "mooncake" for CUDA, "mooncake-cpu" for CPU)

    run_backend(ctx, "mooncake" if ctx.cfg.device == "cuda" else "mooncake-cpu")
