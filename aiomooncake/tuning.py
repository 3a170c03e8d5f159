"""Process-wide timing knobs, in one place: how long things are held, corked, spun and batched.

Per-connection choices (``busy_poll``, ``hold_acks``, ``batch_replies``, ``inline_cuda``,
``one_copier``) are :class:`~aiomooncake.Options` fields. What is here is shared by every
connection of a process (the loop's completion poller, burst holding, CUDA stream marks, the
same-host CPU plane); each value says what it was measured against. The torch backend's thread
hand-over timings live in :mod:`aiomooncake.torch.loop`. Change one for a measurement by assigning
the module attribute (``aiomooncake.tuning.POLL_SPIN_S = 0.01``): readers look it up at use time.
"""

from __future__ import annotations

import os

# ---- bursts of frames and copies
# A copy of at most this many bytes is held back to share an engine submission with the rest of its
# burst (a Peer.batch(), a batch_isend_irecv, the frames of one socket read); a larger one outlasts
# parsing the burst, so holding it (or corking its RTS) only idles the device (16 x 100 MB streamed
# on the H100: 649-654 GB/s held against 703-740 alone).
HOLD_BYTES = 32 << 20
# Held copies go to the data plane in groups of at most this many, so the first ones start before a
# long burst is parsed.
MAX_GROUP = 32
# Frames held back (a batch's posts, one read's replies) leave once this many are queued, so the
# remote starts on the first ones while the rest are still being made (a 64-expert EPLB exchange is
# hundreds of frames each way: held whole, each side's handling waits for the other's last frame).
# With MAX_GROUP, on the H200 (CUDA IPC, experiments/eplb_profile.py, alternating launches): 10.8-11.9
# ms per exchange against 16.2-19.2 ms with both at 100000; 16 for either was within the noise.
CORK_FRAMES = 64

# The CUDA IPC plane queues a burst's copies with one launch of its own copy kernel
# (planes/cuda_kernel.py) instead of one driver call per copy (~4-6 us of host time each on the H200
# host, whichever driver call). AIOMOONCAKE_COPY_KERNEL=0 turns it off (copies then go through
# cuMemcpyBatchAsync or cuMemcpyAsync).
COPY_KERNEL = os.environ.get("AIOMOONCAKE_COPY_KERNEL", "1") != "0"

# ---- the completion poller (aiomooncake.planes.poller)
# It spins (yielding the loop and the core) while copies progress, backs off to sleeps of up to
# POLL_MAX_SLEEP once nothing moved for POLL_SPIN_S, and stops when nothing is in flight.
POLL_SPIN_S = 0.05
POLL_MAX_SLEEP = 0.001

# ---- the loop's busy window (aiomooncake.transport.busypoll)
# A receiver expecting a DONE after the remote's device write keeps the loop hot at most this long
# (on the lent H100's VM a frame reached a loop idle for a few ms 80-200 us after it left).
BUSY_EXPECT_MAX_S = 0.02

# ---- CUDA stream marks (aiomooncake.tensors)
# An idle stream is looked at (cudaStreamQuery) instead of having an event recorded on it: between
# two processes on one GPU every command queued costs a context switch (H200: EPLB 1.08x through
# the core, 1.18x through the torch backend).
SKIP_IDLE_STREAMS = True

# ---- the same-host CPU plane (aiomooncake.planes.shm)
# Copies up to SHM_INLINE_BYTES run on the loop (~40 % faster at 1 MiB than a thread hand-off on a
# 2-core VM); larger ones are cut into pieces of at most SHM_CHUNK_BYTES for a small thread pool.
SHM_INLINE_BYTES = 1 << 20
SHM_CHUNK_BYTES = 4 << 20
