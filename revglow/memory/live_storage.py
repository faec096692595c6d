"""Exact accounting of the tensor storage a block of code allocates: `LiveStorageTracker`, a dispatch mode that counts
every storage an op creates while it is active and still alive (the running total, its peak, and the largest
storages alive at the peak), the same on every device. Given `OpWorkspaces`, it also counts each convolution's
working buffers while it runs (measured once per call signature on the device: revglow.memory.workspaces).
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from revglow.memory.workspaces import OpWorkspaces

__all__ = ["LiveStorageTracker"]


@dataclass
class _Live:
    nbytes: int
    label: str


class LiveStorageTracker(TorchDispatchMode):
    """Counts the bytes of tensor storage allocated while it is active and still alive: the running total, its
    peak, and the largest storages alive at the peak. Storages that existed before (parameters, gradients updated
    in place, optimizer state, the input) are not counted: an op's output is counted only when its storage is
    none of its inputs' (views and in-place results share their input's storage).

    Given `workspaces` (an `OpWorkspaces`), it also counts, while each of their ops runs, how far that op alone
    raises the device's memory (measured once per call signature: outputs and what it holds below the dispatcher),
    and keeps that peak apart: `peak_with_workspace`, with `workspace_at_peak` (bytes, op) the part of it that no
    tensor holds.

    Example:
        >>> with LiveStorageTracker() as tracker:
        ...     a = torch.ones(1024, 256)          # 1 MiB, alive at the end
        ...     b = (a * 2).sum()                 # a temporary of 1 MiB, freed
        >>> round(tracker.peak / 2**20), round(tracker.current / 2**20)
        (2, 1)
    """

    def __init__(self, root: Optional[nn.Module] = None, top: int = 5, workspaces: Optional[OpWorkspaces] = None):
        super().__init__()
        self.current = 0
        self.peak = 0
        self.workspaces = workspaces
        self.peak_with_workspace = 0
        self.workspace_at_peak: Tuple[int, str] = (0, "")
        self.workspace_unmeasured = False   # an op of `workspaces` ran on a device without a meter
        self.top = top
        self.at_peak: List[Tuple[int, str]] = []
        self._live: Dict[int, _Live] = {}
        self._snapshot_peak = 0
        self._names = {id(m): name or type(m).__name__ for name, m in root.named_modules()} if root is not None else {}
        self._stack: List[str] = []
        self._hooks = []

    def __enter__(self):
        if self._names:
            from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook
            self._hooks = [register_module_forward_pre_hook(self._push), register_module_forward_hook(self._pop)]
        return super().__enter__()

    def __exit__(self, *exc):
        for h in self._hooks:
            h.remove()
        self._hooks = []
        return super().__exit__(*exc)

    def _push(self, module, args):
        self._stack.append(self._names.get(id(module), type(module).__name__))

    def _pop(self, module, args, output):
        if self._stack:
            self._stack.pop()

    def _where(self) -> str:
        node = torch._C._current_autograd_node()
        inside = self._stack[-1] if self._stack else ""
        if node is not None:
            return f"backward {node.name()}" + (f" (in {inside})" if inside else "")
        return inside or "outside any module"

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        grown = None
        if self.workspaces is not None and func in self.workspaces:
            grown = self.workspaces.measure(func, args, kwargs)   # before the op: it runs it on the same inputs
            self.workspace_unmeasured |= grown is None
        before = self.current
        out = func(*args, **kwargs)
        inputs = {id(t.untyped_storage()) for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._track(t, func, inputs)
        if grown and before + grown > self.peak_with_workspace:   # the op's own rise, outputs included
            self.peak_with_workspace = before + grown
            new_outputs = self.current - before   # what _track just counted of the op's outputs
            self.workspace_at_peak = (max(0, grown - new_outputs),
                                      f"{getattr(func, '__name__', func)} in {self._where()}")
        return out

    def _track(self, t: torch.Tensor, func, inputs) -> None:
        try:
            storage = t.untyped_storage()
        except (RuntimeError, NotImplementedError):
            return
        key = id(storage)
        if key in inputs or key in self._live or storage.nbytes() == 0:
            return
        label = f"{func.__name__ if hasattr(func, '__name__') else func} {tuple(t.shape)} {str(t.dtype).replace('torch.', '')}, {self._where()}"
        self._live[key] = _Live(storage.nbytes(), label)
        self.current += storage.nbytes()
        weakref.finalize(storage, self._free, key)
        if self.current > self.peak_with_workspace:
            self.peak_with_workspace = self.current
            self.workspace_at_peak = (0, "")
        if self.current > self.peak:
            self.peak = self.current
            if self.peak > 1.005 * self._snapshot_peak:    # the top-k list: refreshed when the peak grows 0.5%
                self._snapshot_peak = self.peak
                largest = sorted(self._live.values(), key=lambda e: -e.nbytes)[:self.top]
                self.at_peak = [(e.nbytes, e.label) for e in largest]

    def _free(self, key: int) -> None:
        entry = self._live.pop(key, None)
        if entry is not None:
            self.current -= entry.nbytes

