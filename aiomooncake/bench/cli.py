"""The command line: ``python -m aiomooncake.bench [--quick] [--device cpu|cuda] ...``."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .common import (
    DEFAULT_EXPERTS,
    DEFAULT_SIZES,
    MODES,
    QUICK_EXPERTS,
    QUICK_SIZES,
    BenchConfig,
    GiB,
    MiB,
    Point,
    parse_size,
)
from .impls import IMPLS, load
from .runner import launch, run_torchrun, torchrun_rank, under_torchrun

if TYPE_CHECKING:
    from .netns import Network

# what runs with --netns: told the rank's address through RankContext.host / $AIOMOONCAKE_HOST,
# or (gloo) its interface through $GLOO_SOCKET_IFNAME; copy has one rank
NETNS_IMPLS = ("aiomooncake", "aiomooncake-torch", "te-raw", "gloo", "copy")

EPILOG = """\
examples:
  python -m aiomooncake.bench --quick --device cpu --json bench.json --plot bench.png
  python -m aiomooncake.bench --impls aiomooncake,te-raw --modes stream --sizes 1M,64M,1G
  torchrun --nproc-per-node 2 -m aiomooncake.bench --device cuda --quick
  sudo python -m aiomooncake.bench --netns --impls aiomooncake,te-raw --modes stream --sizes 1M,16M,64M

gbps is GB/s (1e9 B/s) of payload crossing between the two processes (both directions summed for
bidir and eplb); pingpong also reports the round trip (rtt_us). Every number is a median.
"""


def _csv(choices: Sequence[str]) -> Any:
    def parse(text: str) -> list[str]:
        items = [s.strip() for s in text.split(",") if s.strip()]
        bad = [s for s in items if s not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"choose from {', '.join(choices)} (got {text!r})")
        return items
    return parse


def _sizes(text: str) -> list[int]:
    try:
        return [parse_size(s) for s in text.split(",") if s.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _ints(text: str) -> list[int]:
    try:
        vals = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not vals or min(vals) < 1:
        raise argparse.ArgumentTypeError("expected integers >= 1")
    return vals


def _positive(kind: type) -> Any:
    def parse(text: str) -> Any:
        v = kind(text)
        if v <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return v
    return parse


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m aiomooncake.bench", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Benchmark aiomooncake against the raw Transfer Engine, torch.distributed backends "
                    "and a local copy: pingpong latency, stream and bidirectional bandwidth, and the "
                    "EPLB expert exchange. Launches its own processes, or runs under torchrun.",
        epilog=EPILOG)
    ap.add_argument("--device", choices=("cpu", "cuda"), default=None,
                    help="where the tensors live (default: cuda if available, else cpu)")
    ap.add_argument("--quick", action="store_true",
                    help="a short run: sizes 8,64K,1M,16M,64M, experts 1,4, 10 iterations, 2 warm-up")
    ap.add_argument("--impls", type=_csv(tuple(IMPLS)), default=list(IMPLS),
                    help=f"implementations, comma-separated (default: all of {','.join(IMPLS)})")
    ap.add_argument("--modes", type=_csv(MODES), default=list(MODES),
                    help=f"modes, comma-separated (default: {','.join(MODES)})")
    ap.add_argument("--sizes", type=_sizes, default=None,
                    help="message sizes, e.g. 8,64K,1M,1G (default: 8 B to 1 GiB, x4 steps)")
    ap.add_argument("--experts", type=_ints, default=None,
                    help=f"eplb: experts per batch (default: {','.join(map(str, DEFAULT_EXPERTS))})")
    ap.add_argument("--scale", type=_positive(float), default=None,
                    help="eplb: factor on the expert weights' size (default: 1 on cuda, 1/16 on cpu)")
    ap.add_argument("--iters", type=_positive(int), default=None,
                    help="timed iterations per point (default 20, --quick 10; fewer for huge points, "
                         "at least 200 for points moving <= 256 KiB per iteration)")
    ap.add_argument("--warmup", type=int, default=None,
                    help="warm-up iterations (default 3, --quick 2; at least 20 for small points)")
    ap.add_argument("--window", type=_positive(int), default=4,
                    help="stream/bidir: messages in flight per iteration (default 4)")
    ap.add_argument("--max-bytes", type=_sizes, default=None, metavar="SIZE",
                    help="payload budget per point; iterations shrink (to >= 3) above it "
                         "(default 2G, --quick 512M)")
    ap.add_argument("--timeout", type=_positive(float), default=None,
                    help="seconds one point may take before its processes are killed "
                         "(default 120, --quick 60)")
    ap.add_argument("--host", default="127.0.0.1", help="address the processes use (default 127.0.0.1)")
    ap.add_argument("--netns", action="store_true",
                    help="two hosts on one machine: run the two ranks in two network namespaces joined by "
                         "a veth pair (needs root), so traffic crosses a link between two network stacks; "
                         "aiomooncake's CPU tensors then take the Transfer Engine over TCP, as between "
                         f"two hosts. Implementations: {', '.join(NETNS_IMPLS)}")
    ap.add_argument("--json", metavar="FILE", help="write the records as JSON")
    ap.add_argument("--plot", metavar="FILE.png", help="plot bandwidth and latency against size")
    ap.add_argument("--markdown", metavar="FILE", help="write the tables as Markdown")
    ap.add_argument("--logs", metavar="DIR",
                    help="keep the benchmark processes' output in DIR (default: a temporary directory, "
                         "kept only when something failed)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    ap.add_argument("-v", "--verbose", action="store_true",
                    help="let the benchmark processes log to this terminal")
    return ap


def make_config(args: argparse.Namespace, net: Network | None = None) -> tuple[BenchConfig, list[Point]]:
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    q = args.quick
    sizes = args.sizes or list(QUICK_SIZES if q else DEFAULT_SIZES)
    experts = args.experts or list(QUICK_EXPERTS if q else DEFAULT_EXPERTS)
    cfg = BenchConfig(
        device=device,
        iters=args.iters or (10 if q else 20),
        warmup=args.warmup if args.warmup is not None else (2 if q else 3),
        window=args.window,
        scale=args.scale or (1.0 if device == "cuda" else 1 / 16),
        timeout=args.timeout or (60.0 if q else 120.0),
        max_bytes=(args.max_bytes[0] if args.max_bytes else (512 * MiB if q else 2 * GiB)),
        host=args.host,
        verbose=args.verbose,
        netns=tuple(net.names) if net is not None else (),
        addrs=tuple(net.addrs) if net is not None else (),
    )
    points: list[Point] = []
    for mode in (m for m in MODES if m in args.modes):
        for size in (experts if mode == "eplb" else sizes):
            points.append(Point(len(points), mode, size))
    return cfg, points


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    torchrun = under_torchrun()
    net = None
    if args.netns:
        from . import netns

        why = "it runs its own two processes, not under torchrun" if torchrun else netns.unavailable()
        if why is not None:
            print(f"--netns: {why}", file=sys.stderr)
            return 2
        netns.sweep()
        net = netns.Network(2, bridge=False)
    try:
        return _main(args, net, torchrun)
    finally:
        if net is not None:
            net.close()


def _main(args: argparse.Namespace, net: Network | None, torchrun: bool) -> int:
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        SpinnerColumn,
        TextColumn,
        TimeElapsedColumn,
    )

    from . import report

    cfg, points = make_config(args, net)
    if torchrun and not cfg.verbose:
        os.environ.setdefault("MC_LOG_LEVEL", "ERROR")  # before any engine loads in this process
    lead = not torchrun or torchrun_rank() == 0
    console = Console(stderr=True, quiet=not lead)
    # a pipe or file gets wide tables rather than folded ones
    out = Console(quiet=not lead, width=None if sys.stdout.isatty() else 200)

    results = report.Results(cfg, list(args.impls), points)
    if net is not None:
        results.machine += (f"; ranks in two network namespaces joined by a veth pair ({net.addrs[0]}, "
                            f"{net.addrs[1]}; --netns)")
    plan: list[tuple[str, list[Point]]] = []
    with console.status("checking which implementations can run..."):
        for name in args.impls:
            impl = load(name)
            reason = impl.available(cfg.device)
            if reason is None and net is not None and name not in NETNS_IMPLS:
                reason = f"not adapted to --netns (only {', '.join(NETNS_IMPLS)})"
            if reason is None and torchrun and name == "mooncake-pg":
                reason = "runs only under the built-in launcher (a crash would take torchrun's ranks down)"
            if reason is not None:
                results.skip(name, reason)
                continue
            plan.append((name, [p for p in points if p.mode in impl.MODES]))
    for name, reason in results.skipped.items():
        console.print(f"[yellow]skipping {name}[/yellow]: {escape(reason)}")
    if not plan:
        console.print("[red]nothing can run[/red]")
        return 1

    total = sum(len(pts) for _, pts in plan)
    with Progress(SpinnerColumn(), TextColumn("{task.description:<40}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=console, disable=args.no_progress or not lead,
                  transient=False) as progress:
        task = progress.add_task("starting", total=total)
        events = _Live(results, progress, task, cfg)
        logs = None
        if torchrun:
            run_torchrun(plan, cfg, events)
        else:
            logs = launch(plan, cfg, events, args.logs)
        progress.update(task, description="done")
    if not lead:
        return 0

    report.print_report(out, results)
    if logs is not None and results.failures:
        console.print(f"the benchmark processes' output is in {logs}")
    if args.json:
        report.write_json(results, args.json)
        console.print(f"wrote {len(results.records)} records to {args.json}")
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(report.markdown(results))
        console.print(f"wrote the tables to {args.markdown}")
    if args.plot:
        report.plot(results, args.plot)
        console.print(f"wrote the plot to {args.plot}")
    return 0 if results.records else 1


def escape(text: str) -> str:
    from rich.markup import escape as _escape

    return _escape(text)


class _Live:
    """Feeds the results and moves the progress bar."""

    def __init__(self, results: Any, progress: Any, task: Any, cfg: BenchConfig) -> None:
        self.results, self.progress, self.task, self.cfg = results, progress, task, cfg
        self.last: dict[str, str] = {}

    def begin(self, impl: str, p: Point) -> None:
        self.progress.update(self.task, description=f"{impl} {p.mode} {p.label(self.cfg)}")

    def record(self, impl: str, p: Point, rec: dict[str, Any]) -> None:
        self.results.record(impl, p, rec)
        self.progress.advance(self.task)

    def failed(self, impl: str, p: Point, reason: str) -> None:
        self.results.failed(impl, p, reason)
        self.progress.advance(self.task)
        if self.last.get(impl) == reason:
            return  # e.g. a start-up failure fails every point at once: say it once
        self.last[impl] = reason
        self.progress.console.print(f"[yellow]{impl} {p.mode} {p.label(self.cfg)} failed[/yellow]: "
                                    f"{escape(reason)}")


if __name__ == "__main__":
    sys.exit(main())
