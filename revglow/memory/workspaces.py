"""Memory that an op allocates below the dispatcher, where no tensor shows it: measured on the device, once per
call signature.

A CPU convolution copies its operands into the blocked layouts its kernels read (oneDNN) or unfolds its input
into columns (the fallback path); cuDNN asks for a workspace. None of these buffers passes through the dispatcher,
so `LiveStorageTracker` cannot count them, yet they are part of a training step's peak: at 32x32 with 64 hidden
channels they are about a third of a reversible step's memory per sample on the CPU. `OpWorkspaces` runs such an
op on its own inputs under the device's meter (`revglow.memory.device_meters`), once to warm up (a first run also pays
one-off costs: a kernel generated, a cache filled) and `repeats` times more, and keeps the smallest peak growth
(outputs included: an op may free its buffers before it writes its outputs, or not), keyed by everything the
library's choice of algorithm can depend on: shapes, strides, dtypes, device, the op's arguments, the thread count
and the mkldnn switch.
"""
from __future__ import annotations

from typing import Dict, Iterable, Optional, Tuple

import torch
from torch.utils._pytree import tree_leaves

from revglow.memory.device_meters import device_peak

__all__ = ["OpWorkspaces", "CONVOLUTION_OPS"]

aten = torch.ops.aten
CONVOLUTION_OPS = (aten.convolution.default, aten.convolution_backward.default)


def _signature(func, args, kwargs) -> Tuple:
    parts = [str(func), torch.get_num_threads(), torch.backends.mkldnn.enabled]
    for leaf in tree_leaves((args, kwargs)):
        if isinstance(leaf, torch.Tensor):
            parts.append((tuple(leaf.shape), tuple(leaf.stride()), leaf.dtype, str(leaf.device)))
        else:
            parts.append(leaf)
    return tuple(parts)


class OpWorkspaces:
    """`measure(func, args, kwargs)`: how far the device's memory rises while `func` runs on inputs like these
    (bytes, its new outputs included), or None where the device has no meter (see `revglow.memory.device_meters`). Only for
    ops in `ops` (`func in workspaces`); the part of it beyond the op's outputs is what LiveStorageTracker reports
    as the op's workspace.

    Example (not run as a doctest: on the CPU the measurement leaves glibc's thresholds low for the rest of the
    process, see `revglow.memory.device_meters.ResidentSet`; tests/memory/test_op_workspace.py runs it in a forked child):
        >>> workspaces = OpWorkspaces()
        >>> x, w = torch.randn(16, 64, 16, 16), torch.randn(64, 64, 3, 3)
        >>> grown = workspaces.measure(torch.ops.aten.convolution.default, (x, w, None, [1, 1], [1, 1], [1, 1],
        ...                                                                  False, [0, 0], 1), {})  # doctest: +SKIP
        >>> grown >= 16 * 64 * 16 * 16 * 4      # at least the output  # doctest: +SKIP
        True
    """

    def __init__(self, ops: Iterable = CONVOLUTION_OPS, repeats: int = 1):
        if repeats < 1:
            raise ValueError(f"OpWorkspaces: repeats must be at least 1; got {repeats}")
        self.ops = frozenset(ops)
        self.repeats = repeats
        self._bytes: Dict[Tuple, Optional[int]] = {}

    def __contains__(self, func) -> bool:
        return func in self.ops

    def __len__(self) -> int:
        return len(self._bytes)

    def measure(self, func, args, kwargs) -> Optional[int]:
        key = _signature(func, args, kwargs)
        if key not in self._bytes:
            self._bytes[key] = self._run(func, args, kwargs)
        return self._bytes[key]

    def _run(self, func, args, kwargs) -> Optional[int]:
        device = next((t.device for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)), None)
        if device is None:
            return 0
        growths = []
        for _ in range(self.repeats + 1):      # the first run only warms up
            meter = device_peak(device)
            if meter is None:
                return None
            with meter:
                out = func(*args, **kwargs)
            growths.append(meter.peak)
            del out
        return max(0, int(min(growths[1:])))
