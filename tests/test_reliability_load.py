"""Load, the CI-sized run of ``tests/tools/soak.py``: 1,000 messages in flight across 4 peer processes,
mixed sizes (empty to 4 MiB, eager and rendezvous), every message checked by its receiver and echoed
back and checked again: nothing lost, nothing corrupted. The 100,000-message soak with its memory
figures is in docs/reliability.md."""

from __future__ import annotations

from typing import Any

import pytest
from harness import load_script

import aiomooncake

soak = load_script("soak")


@pytest.mark.parametrize("host_transport", ["auto", "te"])
def test_thousand_in_flight_across_four_peers(tmp_path: Any, host_transport: str) -> None:
    args = soak.parse_args(["--messages", "3000", "--peers", "4", "--inflight", "1000",
                            "--timeout", "60", "--log-dir", str(tmp_path),
                            "--options", f'{{"host_transport": "{host_transport}"}}'])
    r = aiomooncake.run(soak.run(args))
    assert r["max_inflight"] == 1000
    assert r["lost"] == 0 and r["errors"] == [] and r["child_errors"] == [], r["errors"] + r["child_errors"]
    assert r["echoed"] == r["received_by_children"] == 3000
    assert r["corrupted_at_hub"] == 0 and r["corrupted_at_children"] == 0


def test_sizes_cover_both_paths() -> None:
    sizes = [soak.size_of(i, 3) for i in range(3000)]
    eager = aiomooncake.Options().eager_threshold
    assert min(sizes) == 0 and max(sizes) > 1 << 20
    assert sum(s <= eager for s in sizes) > 2000 and sum(s > eager for s in sizes) > 200
