"""Who and where this process is: the host identity peers compare to find same-host paths, and the
GPU a thread works on (two peers on one GPU let one of them run every copy between them)."""

from __future__ import annotations

import socket

import torch


def host_id() -> str:
    """This host's identity: its name and boot id (two containers of one host differ in name only
    if their UTS namespaces differ; the boot id tells a rebooted or another machine apart)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = ""
    return f"{socket.gethostname()}/{boot}"


def gpu_uuid() -> str | None:
    """The UUID of this thread's current CUDA device (None without CUDA)."""
    try:
        if not torch.cuda.is_available():
            return None
        return str(torch.cuda.get_device_properties(torch.cuda.current_device()).uuid)
    except Exception:  # an old torch without .uuid, a broken driver: just no election
        return None
