#!/usr/bin/env python3
"""Paired A/B of builds of the package: one experiment launched for each build in turn, round
after round, so a machine whose speed drifts (the lent GPU host, a shared VM) affects every build
alike; prints each launch's matching lines and, per build, the values they carry.

    python experiments/ab_builds.py export 0c5d843          # here: .ab-builds/0c5d843/aiomooncake
    python experiments/ab_builds.py run --rounds 3 --grep '^== rank 1' --value 'median ([0-9.]+) ms' \\
        0c5d843 work -- python3 experiments/eplb_profile.py --device cuda --experts 64 --top 0

``export`` takes ``git archive`` of the package at each revision (``.ab-builds/`` is ignored by git;
carry it to the device with ``.device``). ``run`` launches the command once per build and round,
from the build's directory with the build first on ``PYTHONPATH`` (the rest kept: the device's
engine lives there) and relative paths in the command taken from the repository root; ``work`` is
the working tree itself. Spawned children inherit the environment, so they import the same build.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUILDS = ROOT / ".ab-builds"


def export(revs: list[str]) -> None:
    for rev in revs:
        dest = BUILDS / rev
        dest.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "aiomooncake"], check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
        print(f"{rev}: {dest / 'aiomooncake'}")


def _absolute(cmd: list[str]) -> list[str]:
    """Relative paths of files in the repository, made absolute (the command runs elsewhere)."""
    return [str(ROOT / a) if not a.startswith("-") and (ROOT / a).is_file() else a for a in cmd]


def run(args: argparse.Namespace) -> None:
    cmd = _absolute(args.cmd)
    values: dict[str, list[float]] = {b: [] for b in args.builds}
    for r in range(args.rounds):
        for build in args.builds:
            where = ROOT if build == "work" else BUILDS / build
            if not (where / "aiomooncake").is_dir():
                sys.exit(f"no build {build!r}: run `{sys.argv[0]} export {build}` first")
            env = dict(os.environ)
            env["PYTHONPATH"] = os.pathsep.join([str(where), *filter(None, env.get("PYTHONPATH", "").split(
                os.pathsep))])
            try:
                out = subprocess.run(cmd, cwd=where, env=env, capture_output=True, text=True,
                                     timeout=args.timeout).stdout
            except subprocess.TimeoutExpired:
                print(f"[{build}] round {r + 1}: timed out after {args.timeout:g} s", flush=True)
                continue
            for line in out.splitlines():
                if re.search(args.grep, line):
                    print(f"[{build}] {line}", flush=True)
                    m = re.search(args.value, line) if args.value else None
                    if m:
                        values[build].append(float(m.group(1)))
    if args.value:
        for build, vs in values.items():
            shown = " / ".join(f"{v:g}" for v in vs)
            med = f"median {statistics.median(vs):g}" if vs else "no value"
            print(f"{build}: {med} ({shown})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="verb", required=True)
    e = sub.add_parser("export", help="git archive the package at each revision into .ab-builds/")
    e.add_argument("revs", nargs="+")
    r = sub.add_parser("run", help="launch the command for each build in turn, round after round")
    r.add_argument("--rounds", type=int, default=3)
    r.add_argument("--grep", default="^==", help="print the output lines that match (regex)")
    r.add_argument("--value", default="", help="a regex whose first group, in a printed line, is "
                   "a number to summarize per build (e.g. 'median ([0-9.]+) ms')")
    r.add_argument("--timeout", type=float, default=120.0, help="seconds per launch")
    r.add_argument("builds", nargs="+", help="exported revisions, or 'work' (this tree); then -- "
                   "and the command")
    argv = sys.argv[1:]
    cut = argv.index("--") if "--" in argv else len(argv)
    args = p.parse_args(argv[:cut])
    if args.verb == "export":
        export(args.revs)
        return
    args.cmd = argv[cut + 1:]
    if not args.cmd:
        p.error("give the command after --")
    run(args)


if __name__ == "__main__":
    main()
