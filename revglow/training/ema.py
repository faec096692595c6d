"""Polyak averaging (an exponential moving average) of a model's weights, used for evaluation and samples.

Example:
    >>> model = torch.nn.Linear(2, 2)
    >>> ema = ExponentialMovingAverage(model, decay=0.999)
    >>> ema.update()                  # after each optimizer step
    >>> with ema.applied() as averaged:
    ...     _ = averaged(torch.zeros(1, 2))
"""
from __future__ import annotations

import contextlib
from typing import Dict, Iterator

import torch
from torch import nn

__all__ = ["ExponentialMovingAverage"]


class ExponentialMovingAverage:
    """Polyak averaging of a model's floating-point parameters.

    The decay warms up as min(decay, (1 + n) / (10 + n)) after n updates, so short runs are not dominated
    by the random initial weights. The shadow copy starts at the first update (after ActNorm's
    data-dependent initialization has run).
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must lie in (0, 1); got {decay}")
        self.model = model
        self.decay = float(decay)
        self.num_updates = 0
        self.shadow: Dict[str, torch.Tensor] = {}

    def _parameters(self):
        return [(name, p) for name, p in self.model.named_parameters() if p.is_floating_point()]

    @torch.no_grad()
    def update(self) -> None:
        if not self.shadow:
            self.shadow = {name: p.detach().clone() for name, p in self._parameters()}
        else:
            decay = min(self.decay, (1.0 + self.num_updates) / (10.0 + self.num_updates))
            for name, p in self._parameters():
                self.shadow[name].lerp_(p.detach(), 1.0 - decay)
        self.num_updates += 1

    @contextlib.contextmanager
    def applied(self) -> Iterator[nn.Module]:
        """Temporarily swap the averaged weights into the model (no-op before the first update)."""
        if not self.shadow:
            yield self.model
            return
        saved = {}
        with torch.no_grad():
            for name, p in self._parameters():
                saved[name] = p.detach().clone()
                p.copy_(self.shadow[name])
        try:
            yield self.model
        finally:
            with torch.no_grad():
                for name, p in self._parameters():
                    p.copy_(saved[name])

    def state_dict(self) -> Dict:
        return {"decay": self.decay, "num_updates": self.num_updates, "shadow": dict(self.shadow)}

    def load_state_dict(self, state: Dict) -> None:
        self.decay = float(state["decay"])
        self.num_updates = int(state["num_updates"])
        device = next(self.model.parameters()).device
        self.shadow = {name: t.to(device) for name, t in state["shadow"].items()}
