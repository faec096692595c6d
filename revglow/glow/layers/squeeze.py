"""Squeeze (paper, section 3 / Dinh et al. 2017): trade spatial size for channels, [N,C,H,W] -> [N,4C,H/2,W/2]."""
from __future__ import annotations

import torch

__all__ = ["squeeze2d", "unsqueeze2d"]


def squeeze2d(x: torch.Tensor) -> torch.Tensor:
    n, c, h, w = x.shape
    x = x.reshape(n, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4)
    return x.reshape(n, c * 4, h // 2, w // 2)


def unsqueeze2d(x: torch.Tensor) -> torch.Tensor:
    n, c, h, w = x.shape
    x = x.reshape(n, c // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3)
    return x.reshape(n, c // 4, h * 2, w * 2)
