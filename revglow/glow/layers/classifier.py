"""The class head of a class-conditional Glow (the authors' code: `model.py`, "Predictive loss", with
`linear_zeros`): a zero-initialized linear map of the spatial mean of the top latent to class logits.

It reads the top level's output before the prior standardizes it, so the flow itself is pushed to put the label
where the head can see it; the trainer adds `TrainConfig.weight_y` times its cross-entropy (in bits) to the
bits/dim (the reference's weight_y: 0.01). It is not part of the bijection and has no log-determinant.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from revglow.glow.config import check_logscale_factor

__all__ = ["ClassHead", "class_bits"]


class ClassHead(nn.Module):
    """logits = (mean_{h,w} z) W + b, times exp(f * logs) per class with a log-scale factor f (reference: 3).

    W, b and logs start at 0, so at initialization every class has logit 0 (a uniform prediction) and the head
    adds nothing to the gradient of the flow until it has learned something.
    """

    def __init__(self, channels: int, num_classes: int, logscale_factor: Optional[float] = None):
        super().__init__()
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"ClassHead: num_classes must be a positive int; got {num_classes!r}")
        self.linear = nn.Linear(channels, num_classes)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)
        self.logscale_factor = check_logscale_factor("ClassHead: logscale_factor", logscale_factor, allow_none=True)
        if self.logscale_factor is not None:
            self.logs = nn.Parameter(torch.zeros(num_classes))

    def forward(self, z_top: torch.Tensor) -> torch.Tensor:
        """[N, C, H, W] top latent -> [N, num_classes] logits."""
        logits = self.linear(z_top.mean(dim=(2, 3)))
        if self.logscale_factor is not None:
            logits = logits * torch.exp(self.logs * self.logscale_factor)
        return logits


def class_bits(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sample cross-entropy of the true class in bits ([N]): -log2 softmax(logits)[y]."""
    return F.cross_entropy(logits, y, reduction="none") / math.log(2.0)
