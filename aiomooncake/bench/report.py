"""Results: the table of medians with ratios (rich and Markdown), the JSON records, the plot."""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
from dataclasses import dataclass, field
from typing import Any

import torch

from .common import MODES, BenchConfig, Point, human_bytes
from .impls import OURS, REFERENCES

TITLES = {
    "pingpong": "pingpong: round-trip latency (median, µs; lower is better)",
    "stream": "stream: one-way bandwidth, {window} messages in flight (median, GB/s)",
    "bidir": "bidir: both directions at once, {window} messages each way (median, GB/s, sum of both)",
    "eplb": "eplb: DeepSeek-V3 expert exchange, batch_isend_irecv both ways "
            "(median, GB/s, sum of both; size = bytes one rank sends, scale {scale:g})",
}


def machine_description(device: str) -> str:
    from .. import __version__

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    parts = [f"{os.cpu_count()} cores ({cpu})", f"{platform.system()} {platform.release()}",
             f"Python {platform.python_version()}", f"torch {torch.__version__}",
             f"aiomooncake {__version__}"]
    with contextlib.suppress(OSError):
        parts.append(f"load average {os.getloadavg()[0]:.1f} at start")
    if device == "cuda" and torch.cuda.is_available():
        parts.insert(1, f"{torch.cuda.device_count()}x {torch.cuda.get_device_name(0)}")
    return ", ".join(parts)


@dataclass
class Results:
    cfg: BenchConfig
    impls: list[str]
    points: list[Point]
    records: dict[tuple[str, int], dict[str, Any]] = field(default_factory=dict)
    failures: dict[tuple[str, int], str] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    date: str = field(
        default_factory=lambda: datetime.datetime.now().astimezone().isoformat(timespec="minutes"))
    machine: str = ""

    def __post_init__(self) -> None:
        if not self.machine:
            self.machine = machine_description(self.cfg.device)

    # ------------------------------------------------------------- events
    def begin(self, impl: str, p: Point) -> None:
        pass

    def record(self, impl: str, p: Point, rec: dict[str, Any]) -> None:
        self.records[(impl, p.idx)] = rec

    def failed(self, impl: str, p: Point, reason: str) -> None:
        self.failures[(impl, p.idx)] = reason

    def skip(self, impl: str, reason: str) -> None:
        self.skipped[impl] = reason

    # -------------------------------------------------------------- views
    def json_records(self) -> list[dict[str, Any]]:
        order = {name: i for i, name in enumerate(self.impls)}
        by_idx = {p.idx: p for p in self.points}
        keys = sorted(self.records, key=lambda k: (MODES.index(by_idx[k[1]].mode), order.get(k[0], 99),
                                                   by_idx[k[1]].size))
        return [self.records[k] for k in keys]

    def modes(self) -> list[str]:
        return [m for m in MODES if any(p.mode == m for p in self.points)]

    def shown_impls(self, mode: str) -> list[str]:
        idx = {p.idx for p in self.points if p.mode == mode}
        return [i for i in self.impls if any((i, j) in self.records or (i, j) in self.failures for j in idx)]

    def table(self, mode: str) -> tuple[str, list[str], list[list[str]]]:
        """(title, headers, rows) of one mode: a column per implementation, then the ratios."""
        impls = self.shown_impls(mode)
        ours = [o for o in OURS if o in impls]
        refs = [r for r in REFERENCES if r in impls]
        ratio_cols = [(o, r) for o in ours for r in refs if o != r]
        headers = ["size", *impls, *(f"{_short(o)}/{r}" for o, r in ratio_cols)]
        rows = []
        for p in (p for p in self.points if p.mode == mode):
            row = [p.label(self.cfg)]
            for i in impls:
                rec = self.records.get((i, p.idx))
                if rec is not None:
                    row.append(_num(rec["rtt_us"] if mode == "pingpong" else rec["gbps"]))
                else:
                    row.append("failed" if (i, p.idx) in self.failures else "—")
            for o, r in ratio_cols:
                a, b = self.records.get((o, p.idx)), self.records.get((r, p.idx))
                row.append(_ratio(a["gbps"] / b["gbps"]) if a and b and b["gbps"] > 0 else "—")
            rows.append(row)
        title = TITLES[mode].format(window=self.cfg.window, scale=self.cfg.scale)
        return title, headers, rows

    def problems(self) -> list[tuple[str, str, str]]:
        """(implementation, points, reason) for every skip, and every failure (points that failed
        for the same reason grouped)."""
        by_idx = {p.idx: p for p in self.points}
        out = [(impl, "all", f"skipped: {reason}") for impl, reason in self.skipped.items()]
        grouped: dict[tuple[str, str], list[Point]] = {}
        for (impl, idx), reason in self.failures.items():
            grouped.setdefault((impl, reason), []).append(by_idx[idx])
        for (impl, reason), pts in grouped.items():
            ran = [k for k in self.records if k[0] == impl]
            where = ("all" if not ran and len(pts) > 1 else
                     ", ".join(f"{p.mode} {p.label(self.cfg)}" for p in pts))
            out.append((impl, where, reason))
        return out


def _short(impl: str) -> str:
    return {"aiomooncake": "aio", "aiomooncake-torch": "aio-torch"}.get(impl, impl)


def _num(v: float) -> str:
    if v >= 100:
        return f"{v:,.0f}"
    return f"{v:.3g}"


def _ratio(r: float) -> str:
    return f"{r:.2f}x" if r >= 0.1 else f"{r:.2g}x"


RATIO_NOTE = ("Ratios compare throughput (for pingpong: the inverse of the round trip), ours / reference: "
              "above 1.00x ours is faster.")


# ================================================================== output
def print_report(console: Any, res: Results) -> None:
    from rich.markup import escape
    from rich.table import Table

    for mode in res.modes():
        title, headers, rows = res.table(mode)
        if len(headers) <= 1:
            continue
        console.print(f"[bold]{escape(title)}[/bold]")
        t = Table(header_style="bold")
        for i, h in enumerate(headers):
            t.add_column(h, justify="left" if i == 0 else "right", style="cyan" if "/" in h else None,
                         overflow="fold")
        for row in rows:
            t.add_row(*map(escape, row))
        console.print(t)
    console.print(f"[dim]{RATIO_NOTE}[/dim]")
    probs = res.problems()
    if probs:
        console.print("[bold]skipped and failed[/bold]")
        t = Table(header_style="bold")
        t.add_column("implementation")
        t.add_column("point")
        t.add_column("reason", overflow="fold")
        for impl, where, why in probs:
            t.add_row(escape(impl), escape(where), escape(why))
        console.print(t)
    console.print(f"[dim]{escape(res.machine)}; device {res.cfg.device}; {res.date}[/dim]")


def markdown(res: Results) -> str:
    out = [f"Machine: {res.machine}; device `{res.cfg.device}`; date {res.date}.", ""]
    for mode in res.modes():
        title, headers, rows = res.table(mode)
        if len(headers) <= 1:
            continue
        out += [f"**{title}**", "", "| " + " | ".join(headers) + " |",
                "|" + "|".join(["---"] + ["---:"] * (len(headers) - 1)) + "|"]
        out += ["| " + " | ".join(r) + " |" for r in rows]
        out.append("")
    out += [RATIO_NOTE, ""]
    probs = res.problems()
    if probs:
        out += ["Skipped and failed:", ""]
        out += [f"- `{impl}` ({where}): {why}" for impl, where, why in probs]
        out.append("")
    return "\n".join(out)


def write_json(res: Results, path: str) -> None:
    with open(path, "w") as f:
        json.dump(res.json_records(), f, indent=1)
        f.write("\n")


def plot(res: Results, path: str) -> None:
    """Latency (pingpong) and bandwidth (the other modes) against size, one line per implementation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    modes = [m for m in res.modes() if any(res.records.get((i, p.idx)) for i in res.impls
                                           for p in res.points if p.mode == m)]
    if not modes:
        return
    cols = min(2, len(modes))
    rows = (len(modes) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(6.4 * cols, 4.6 * rows), squeeze=False)
    markers = "os^Dvx*P"
    flat = [ax for row in axes for ax in row]
    for ax in flat[len(modes):]:
        ax.set_visible(False)
    for ax, mode in zip(flat, modes, strict=False):
        pts = [p for p in res.points if p.mode == mode]
        for k, impl in enumerate(res.impls):
            recs = [r for p in pts if (r := res.records.get((impl, p.idx))) is not None]
            if not recs:
                continue
            recs.sort(key=lambda r: r["bytes"])
            ys = [r["rtt_us"] if mode == "pingpong" else r["gbps"] for r in recs]
            ax.plot([r["bytes"] for r in recs], ys, marker=markers[k % len(markers)], label=impl,
                    linewidth=2.2 if impl in OURS else 1.2, linestyle="-" if impl in OURS else "--")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _pos: human_bytes(int(x)).replace(" ", "")))
        ax.set_xlabel("bytes per message" if mode != "eplb" else "bytes per rank per batch")
        ax.set_ylabel("round trip (µs)" if mode == "pingpong" else "GB/s")
        ax.set_title(mode)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        for lab in ax.get_xticklabels():
            lab.set_rotation(45)
    fig.suptitle(f"aiomooncake.bench, device {res.cfg.device}: {res.machine}\n{res.date}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
