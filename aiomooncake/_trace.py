"""Opt-in timeline tracing of the hot path (AIOMOONCAKE_TRACE=1), for profiling per-message cost.

Marks are ``(name, time.perf_counter())`` pairs; perf_counter is CLOCK_MONOTONIC on Linux, so
marks from two processes on one host share a time base and can be merged into one timeline.
"""

from __future__ import annotations

import os
import time

on = bool(os.environ.get("AIOMOONCAKE_TRACE"))
marks: list[tuple[str, float]] = []


def mark(name: str) -> None:
    marks.append((name, time.perf_counter()))


def take() -> list[tuple[str, float]]:
    out = marks[:]
    marks.clear()
    return out
