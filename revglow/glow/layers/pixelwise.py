"""Helpers of the layers that act alike at every pixel (ActNorm, the 1x1 channel mixings)."""
from __future__ import annotations

import torch

__all__ = ["logdet_per_sample"]


def logdet_per_sample(per_pixel: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The logdet, shape [N] and x's dtype, of a map applied alike at every pixel of x [N, C, H, W] whose
    log|det| per pixel is `per_pixel` (a scalar): H * W * per_pixel for every sample."""
    return (per_pixel * (x.shape[2] * x.shape[3])).to(x.dtype).expand(x.shape[0])
