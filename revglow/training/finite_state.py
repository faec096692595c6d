"""Whether a run's training state is finite: its weights, its EMA weights and its optimizer state.

An update can leave the weights finite and still break the run: Adam's second moment of a huge (finite) gradient
overflows to inf, and every later update of that parameter is then zero or NaN. So the check covers the three
parts a checkpoint holds. `state_flags` computes it on the device without a host sync (a few fused reductions,
torch._foreach_norm, per device and dtype), so the trainer can read it together with a number it reads anyway
(the next step's loss); `nonfinite_parts` names what is not finite, for a message.

Each tensor's L1 norm stands for the tensor: NaN and inf propagate through a sum, and a finite tensor whose norm
overflows holds values near the largest float, which no healthy run reaches. (The max norm would not overflow, but
a max may drop NaNs on some devices.)

Example:
    >>> model = torch.nn.Linear(2, 2)
    >>> nonfinite_parts(state_flags(model, None, None, torch.device("cpu")).tolist())
    []
    >>> with torch.no_grad():
    ...     model.weight[0, 0] = float("nan")
    >>> nonfinite_parts(state_flags(model, None, None, torch.device("cpu")).tolist())
    ['the weights']
"""
from __future__ import annotations

from typing import Dict, Iterable, List, Optional, Sequence

import torch
from torch import nn

__all__ = ["STATE_PARTS", "StateCheck", "state_flags", "nonfinite_parts", "all_finite"]

# The parts of a training state, in the order of state_flags.
STATE_PARTS = ("the weights", "the EMA weights", "the optimizer state")


def _on(tensor: torch.Tensor, device: torch.device) -> bool:
    """Whether `tensor` lives on `device` ("cuda" without an index: the current GPU, where tensors say cuda:N)."""
    if tensor.device.type != device.type:
        return False
    return device.index is None or tensor.device.index == device.index or device.type == "cpu"


def _by_dtype(tensors: Iterable[torch.Tensor], device: torch.device) -> List[List[torch.Tensor]]:
    """The floating-point tensors of `tensors` that live on `device`, grouped by dtype (torch._foreach_norm's
    fused path takes one dtype and device). Tensors elsewhere are left out: on a GPU those are Adam's step counters,
    kept on the CPU, which a check would have to copy over."""
    groups: Dict[torch.dtype, List[torch.Tensor]] = {}
    for tensor in tensors:
        if torch.is_tensor(tensor) and tensor.is_floating_point() and tensor.numel() and _on(tensor, device):
            groups.setdefault(tensor.dtype, []).append(tensor.detach())
    return list(groups.values())


def _finite(groups: List[List[torch.Tensor]], device: torch.device) -> torch.Tensor:
    finite = torch.ones((), dtype=torch.bool, device=device)
    for group in groups:
        finite = finite & torch.isfinite(torch.stack(torch._foreach_norm(group, 1))).all()
    return finite


def all_finite(tensors: Iterable[torch.Tensor], device: torch.device) -> torch.Tensor:
    """A bool scalar on `device`: whether every floating-point tensor of `tensors` that lives there is finite (no
    host sync)."""
    device = torch.device(device)
    return _finite(_by_dtype(tensors, device), device)


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> Iterable[torch.Tensor]:
    for state in optimizer.state.values():
        yield from (value for value in state.values() if torch.is_tensor(value))


class StateCheck:
    """state_flags of one run's model, EMA (or None) and optimizer, called after every update: the tensor lists
    are kept between calls (sorting a thousand tensors by dtype and device each step cost more than their norms).
    torch's optimizers and the EMA update their tensors in place, so the lists are rebuilt only when the
    optimizer's state or the EMA's shadow weights are another dict (loaded: a resume, a rollback) or have grown
    (the optimizer's first step)."""

    def __init__(self, model: nn.Module, ema, optimizer: Optional[torch.optim.Optimizer],
                 device: torch.device) -> None:
        self.model, self.ema, self.optimizer, self.device = model, ema, optimizer, torch.device(device)
        self._key: Optional[tuple] = None
        self._groups: List[List[List[torch.Tensor]]] = []

    def _current_key(self) -> tuple:
        state = self.optimizer.state if self.optimizer is not None else {}
        shadow = self.ema.shadow if self.ema is not None else {}
        return state, len(state), shadow, len(shadow)

    def flags(self) -> torch.Tensor:
        """Bool [3] on the device, one per STATE_PARTS (no host sync)."""
        key = self._current_key()
        if self._key is None or any(a is not b if isinstance(a, dict) else a != b for a, b in zip(key, self._key)):
            self._key = key         # holding the dicts keeps their ids from being reused by new ones
            parts = (list(self.model.parameters()) + list(self.model.buffers()), key[2].values(),
                     _optimizer_tensors(self.optimizer) if self.optimizer is not None else ())
            self._groups = [_by_dtype(tensors, self.device) for tensors in parts]
        return torch.stack([_finite(groups, self.device) for groups in self._groups])


def state_flags(model: nn.Module, ema, optimizer: Optional[torch.optim.Optimizer],
                device: torch.device) -> torch.Tensor:
    """Bool [3] on `device`, one per STATE_PARTS: whether the model's parameters and buffers, the EMA's shadow
    weights (an ExponentialMovingAverage, or None) and the optimizer's state (or None) are all finite."""
    return StateCheck(model, ema, optimizer, device).flags()


def nonfinite_parts(flags: Sequence[float]) -> List[str]:
    """The STATE_PARTS whose flag (read back from state_flags: true or 1.0 when finite) says not finite."""
    return [part for part, finite in zip(STATE_PARTS, flags) if not finite]
