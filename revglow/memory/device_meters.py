"""The device's own peak memory during a block: CUDA's max_memory_allocated, or on the CPU the process's peak
resident set. `device_peak(device)` picks one (None where neither is available).

Both count what no tensor shows: a convolution library's working buffers, the allocator's rounding. That makes
them the second, independent measurement of `revglow profile` beside its tensor-by-tensor count.
"""
from __future__ import annotations

import ctypes
import os
import sys
from typing import Optional, Union

import torch

__all__ = ["ResidentSet", "CudaPeak", "device_peak"]


class ResidentSet:
    """The CPU's own peak: the peak resident set of this process during a block, above its size before it
    (`.peak`, bytes).

    glibc is told (mallopt) to serve blocks above 64 KiB with mmap and to return them at once, and to trim its
    heap before the block, so the resident size follows live memory; /proc/self/clear_refs resets the peak.
    The mallopt settings stay for the rest of the process (glibc cannot go back to its adaptive threshold), which
    makes large allocations dearer there: profile in a process of its own, as `revglow profile` does."""

    available = sys.platform.startswith("linux") and os.path.exists("/proc/self/clear_refs")

    def __init__(self):
        self._libc = None
        if self.available:
            try:
                self._libc = ctypes.CDLL("libc.so.6")
                self._libc.mallopt(-3, 65536)     # M_MMAP_THRESHOLD
                self._libc.mallopt(-1, 131072)    # M_TRIM_THRESHOLD
            except OSError:
                self._libc = None

    @staticmethod
    def _status(key: str) -> float:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(key):
                    return int(line.split()[1]) * 1024.0
        raise RuntimeError(f"no {key} in /proc/self/status")

    def __enter__(self):
        if self._libc is not None:
            self._libc.malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        self.before = self._status("VmRSS")
        return self

    def __exit__(self, *exc):
        self.peak = self._status("VmHWM") - self.before
        return False


class CudaPeak:
    """CUDA's peak of allocated memory during a block, above what was allocated before it (`.peak`, bytes), and
    how much more the caching allocator reserved at its peak (`.reserved_ratio`)."""

    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self):
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        self.before = torch.cuda.memory_allocated(self.device)
        return self

    def __exit__(self, *exc):
        torch.cuda.synchronize(self.device)
        self.peak = torch.cuda.max_memory_allocated(self.device) - self.before
        self.reserved_ratio = (torch.cuda.max_memory_reserved(self.device)
                               / max(1, torch.cuda.max_memory_allocated(self.device)))
        return False


def device_peak(device: Union[str, torch.device]) -> Optional[Union[ResidentSet, CudaPeak]]:
    """A fresh meter of `device`'s peak for one block, or None where this platform has none."""
    device = torch.device(device)
    if device.type == "cuda":
        return CudaPeak(device)
    if device.type == "cpu" and ResidentSet.available:
        return ResidentSet()
    return None
