"""The benchmark CLI (``python -m aiomooncake.bench``): a tiny real run, its JSON records, and the
launcher surviving a crashing child; plus the pure helpers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from aiomooncake.bench.common import BenchConfig, Point, expert_bytes, parse_size
from aiomooncake.bench.report import Results, markdown

REPO = Path(__file__).resolve().parent.parent
KEYS = {"impl": str, "mode": str, "device": str, "bytes": int, "gbps": float, "iters": int}


def run_bench(tmp_path: Path, *args: str, env: dict[str, str] | None = None,
              timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "aiomooncake.bench", "--no-progress", *args],
        cwd=tmp_path, env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=timeout)


def check_schema(rec: dict[str, Any]) -> None:
    for key, typ in KEYS.items():
        assert isinstance(rec[key], typ), (key, rec)
    assert rec["device"] in ("cpu", "cuda")
    assert rec["gbps"] > 0
    assert rec["iters"] >= 1
    if rec["mode"] == "pingpong":
        assert isinstance(rec["rtt_us"], float) and rec["rtt_us"] > 0
        # gbps = 2 * bytes / rtt
        assert rec["gbps"] == pytest.approx(2 * rec["bytes"] / (rec["rtt_us"] * 1e-6) / 1e9, rel=1e-6)
    else:
        assert rec["rtt_us"] is None


@pytest.mark.timeout(150)
def test_quick_cpu_run_writes_records_for_each_implementation(tmp_path: Path) -> None:
    proc = run_bench(tmp_path, "--quick", "--device", "cpu", "--sizes", "8,64K", "--experts", "1",
                     "--iters", "3", "--impls", "aiomooncake,te-raw,gloo", "--json", "out.json",
                     "--markdown", "out.md")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    records = json.loads((tmp_path / "out.json").read_text())
    assert isinstance(records, list)
    for rec in records:
        check_schema(rec)
    seen = {(r["impl"], r["mode"], r["bytes"]) for r in records}
    for impl in ("aiomooncake", "te-raw", "gloo"):
        for mode in ("pingpong", "stream", "bidir"):
            for size in (8, 64 * 1024):
                assert (impl, mode, size) in seen, (impl, mode, size, proc.stdout + proc.stderr)
        assert any(r["impl"] == impl and r["mode"] == "eplb" and r["experts"] == 1 for r in records)
    assert all(r["device"] == "cpu" for r in records)
    assert "aio/te-raw" in proc.stdout and "aio/gloo" in proc.stdout
    assert "| size |" in (tmp_path / "out.md").read_text()


@pytest.mark.timeout(150)
def test_a_crashing_child_is_reported_and_the_run_goes_on(tmp_path: Path) -> None:
    proc = run_bench(tmp_path, "--device", "cpu", "--modes", "pingpong,stream", "--sizes", "8,64K",
                     "--iters", "2", "--warmup", "1", "--impls", "te-raw,copy", "--json", "out.json",
                     env={"AIOMOONCAKE_BENCH_FAULT": "te-raw:stream:8:1:crash"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout + proc.stderr
    assert "SIGSEGV" in out
    got = {(r["impl"], r["mode"], r["bytes"]) for r in json.loads((tmp_path / "out.json").read_text())}
    # the crashed point is missing; the points before and after it (a fresh pair) are not
    assert ("te-raw", "stream", 8) not in got
    assert {("te-raw", "pingpong", 8), ("te-raw", "pingpong", 65536), ("te-raw", "stream", 65536)} <= got
    assert ("copy", "stream", 8) in got


def test_unavailable_implementations_are_skipped_with_a_reason(tmp_path: Path) -> None:
    proc = run_bench(tmp_path, "--device", "cpu", "--impls", "nccl,copy", "--modes", "pingpong",
                     "--sizes", "8", "--iters", "2")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "skipping nccl" in proc.stderr and "--device cuda" in proc.stderr


def test_bad_arguments_are_refused(tmp_path: Path) -> None:
    proc = run_bench(tmp_path, "--impls", "nope")
    assert proc.returncode == 2 and "choose from" in proc.stderr


def test_parse_size() -> None:
    assert parse_size("8") == 8
    assert parse_size("64K") == 65536
    assert parse_size("1M") == 1 << 20
    assert parse_size("1GiB") == 1 << 30
    assert parse_size("0.5K") == 512
    for bad in ("", "x", "1.3", "0", "-1"):
        with pytest.raises(ValueError):
            parse_size(bad)


def test_eplb_expert_shapes() -> None:
    # DeepSeek-V3 FP8 expert: w13 29,360,128 B + w2 14,680,064 B + fp32 scales 7,168 B and 3,584 B
    assert expert_bytes(1.0) == 29_360_128 + 14_680_064 + 7_168 + 3_584
    assert expert_bytes(1 / 16) == 29_360_128 // 16 + 14_680_064 // 16 + 7_168 + 3_584


def test_records_iteration_counts_and_markdown() -> None:
    cfg = BenchConfig(iters=20, warmup=3, window=4, max_bytes=1 << 30)
    ping, stream, eplb = Point(0, "pingpong", 1000), Point(1, "stream", 1000), Point(2, "eplb", 2)
    rec = cfg.record("aiomooncake", ping, [1e-3, 2e-3, 3e-3])
    assert rec["rtt_us"] == pytest.approx(2000) and rec["gbps"] == pytest.approx(2000 / 2e-3 / 1e9)
    rec = cfg.record("aiomooncake", stream, [1e-3])
    assert rec["rtt_us"] is None and rec["gbps"] == pytest.approx(4000 / 1e-3 / 1e9)
    assert cfg.record("te-raw", eplb, [1.0])["bytes"] == 2 * expert_bytes(1.0)
    assert cfg.counts(stream) == (20, 200)  # small points: more iterations (a median of ten is noise)
    assert cfg.counts(Point(4, "stream", 1 << 20)) == (3, 20)
    assert cfg.counts(Point(3, "stream", 1 << 30)) == (1, 3)  # huge points: fewer iterations
    res = Results(cfg, ["aiomooncake", "te-raw"], [ping], machine="test machine")
    res.record("aiomooncake", ping, cfg.record("aiomooncake", ping, [1e-3]))
    res.record("te-raw", ping, cfg.record("te-raw", ping, [2e-3]))
    text = markdown(res)
    assert "| size | aiomooncake | te-raw | aio/te-raw |" in text
    assert "2.00x" in text  # ours twice as fast


@pytest.mark.timeout(150)
def test_netns_runs_the_ranks_as_two_hosts(tmp_path: Path) -> None:
    """--netns: the ranks in two network namespaces joined by a veth; both take the Transfer
    Engine over TCP (the records say which plane), and nothing is left behind."""
    from aiomooncake.bench import netns

    why = netns.unavailable()
    if why is not None:
        pytest.skip(f"cannot make network namespaces: {why}")
    def ours() -> set[str]:
        out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        return {w for w in out.split() if w.startswith(f"{netns.PREFIX}-")}

    before = ours()
    proc = run_bench(tmp_path, "--netns", "--impls", "aiomooncake,te-raw", "--modes", "stream",
                     "--sizes", "1M", "--iters", "3", "--warmup", "1", "--json", "out.json",
                     "--markdown", "out.md")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    records = json.loads((tmp_path / "out.json").read_text())
    for rec in records:
        check_schema(rec)
    assert {(r["impl"], r["data_path"]) for r in records} == {("aiomooncake", "te:tcp"), ("te-raw", "te:tcp")}
    assert "two network namespaces" in (tmp_path / "out.md").read_text()
    assert ours() <= before, "the benchmark left namespaces behind"
