"""The copy jobs' shared forms (:mod:`aiomooncake.planes.base`): a job several messages share
runs to its end when one of them gives up, and a ``Joint`` settles once all of its parts have,
with the first error. No engine, no sockets: jobs settled by hand."""

from __future__ import annotations

import pytest

from aiomooncake.errors import TransferFailed
from aiomooncake.planes.base import DataPlane, Job, Joint


async def test_a_shared_job_is_not_stopped_by_one_of_its_messages() -> None:
    plane = DataPlane()
    alone, shared = Job(plane, None, [], 1), Job(plane, None, [], 1)
    shared.shared = True
    alone.stop()
    shared.stop()
    assert alone.stopped and not shared.stopped


async def test_a_joint_settles_after_its_last_part_with_the_first_error() -> None:
    plane = DataPlane()
    parts = [Job(plane, None, [], 1) for _ in range(3)]
    joint = Joint(plane, list(parts))
    seen: list[str] = []
    joint.then(lambda: seen.append("done"))
    parts[1].settle("second failed")
    parts[0].settle()
    assert not joint.future.done() and not seen
    parts[2].settle("third failed")
    assert seen == ["done"] and joint.shared
    with pytest.raises(TransferFailed, match="second failed"):
        await joint


async def test_a_joint_of_settled_or_no_parts_is_done_at_once() -> None:
    plane = DataPlane()
    done = Job(plane, None, [], 1)
    done.settle()
    assert Joint(plane, [done]).future.done()
    empty = Joint(plane, [])
    assert empty.future.done() and empty.future.exception() is None
