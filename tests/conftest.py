"""Shared fixtures for the multi-process peer tests (see tests/harness.py)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import pytest
from harness import Remote, start_remotes, stop_remotes
from hypothesis import settings

# Property tests draw the same examples on every run, so CI's verdict on a commit does not depend
# on luck; HYPOTHESIS_PROFILE=explore draws fresh ones (run it to hunt, then pin what it finds
# with @example).
settings.register_profile("ci", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(scope="module")
def _module_remote() -> Iterator[Remote]:
    r = Remote().start()
    yield r
    r.stop()


@pytest.fixture
def remote(_module_remote: Remote) -> Remote:
    """A peer process shared by a module's tests; replaced if an earlier test broke or killed it."""
    if not _module_remote.healthy:
        _module_remote.restart()
    return _module_remote


@pytest.fixture
def spawn_remotes() -> Iterator[Callable[[int], list[Remote]]]:
    """Start fresh peer processes for one test (to kill, freeze, or use several); all are stopped
    (killed if need be) at teardown."""
    started: list[Remote] = []

    def spawn(n: int = 1) -> list[Remote]:
        rs = start_remotes(n)
        started.extend(rs)
        return rs

    yield spawn
    stop_remotes(started)
