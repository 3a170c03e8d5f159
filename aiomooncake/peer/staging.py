"""CUDA work a peer queues itself, off the caller's stream: a side stream per device, small device
tensors copied to host bytes through a pinned buffer (inline sends), and device tensors staged
through host memory for a link whose plane cannot reach device memory."""

from __future__ import annotations

import ctypes
from typing import Any

import torch

from ..tensors import byte_view, fill_from_bytes


class Staging:
    """One peer's side streams and pinned buffers (one per device, grown on demand)."""

    def __init__(self, min_pinned: int) -> None:
        self._min_pinned = min_pinned
        self._side_streams: dict[int, Any] = {}
        self._pinned: dict[int, torch.Tensor] = {}

    def side_stream(self, device: torch.device) -> Any:
        idx = device.index if device.index is not None else torch.cuda.current_device()
        st = self._side_streams.get(idx)
        if st is None:
            st = self._side_streams[idx] = torch.cuda.Stream(device=idx)
        return st

    def device_bytes(self, src: torch.Tensor) -> bytes:
        """The bytes of a small CUDA tensor whose producer is done: copied on our side stream (it
        waits for nothing else) through a pinned buffer."""
        n = src.nbytes
        idx = src.get_device()
        host = self._pinned.get(idx)
        if host is None or host.numel() < n:
            host = self._pinned[idx] = torch.empty(max(n, self._min_pinned), dtype=torch.uint8,
                                                   pin_memory=True)
        side = self.side_stream(src.device)
        with torch.cuda.stream(side):
            host[:n].copy_(byte_view(src), non_blocking=True)
        side.synchronize()
        return ctypes.string_at(host.data_ptr(), n)

    def to_host(self, src: torch.Tensor) -> torch.Tensor:
        """A host copy of a CUDA tensor whose producer is done (for a link that cannot read device
        memory): one copy on the side stream."""
        with torch.cuda.stream(self.side_stream(src.device)):
            return src.cpu()


def fill_device(work: torch.Tensor, stream: Any, data: bytes) -> None:
    """Copy an inline payload into a CUDA destination on the caller's ``stream``: ordered after its
    earlier work there and before what it queues later. The driver stages the host bytes before
    the call returns."""
    if data:
        with torch.cuda.stream(stream):
            fill_from_bytes(work, data)
