"""A simple reference density: independent per-pixel categorical distributions.

Each of the C*H*W dimensions gets its own histogram over the 2**n_bits grey levels, counted on the
training images with Laplace (add-one) smoothing. Its bits/dim on the test images is what a model that
ignores every correlation between pixels achieves; a flow must beat it clearly.

Example:
    >>> import torch
    >>> train = torch.randint(0, 256, (100, 1, 4, 4), dtype=torch.uint8)
    >>> baseline = PixelCategoricalBaseline.fit(train, n_bits=5)
    >>> bool(baseline.bits_per_dim(train).mean() <= 5.0)
    True
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["PixelCategoricalBaseline", "reduce_bits"]


def reduce_bits(images: torch.Tensor, n_bits: int) -> torch.Tensor:
    """uint8 images 0..255 reduced to n_bits: the integer levels floor(x / 2**(8 - n_bits)), int64."""
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8:
        raise TypeError("reduce_bits expects a uint8 tensor of images")
    if not 1 <= n_bits <= 8:
        raise ValueError(f"n_bits must be between 1 and 8; got {n_bits}")
    return images.long() >> (8 - n_bits)


@dataclass
class PixelCategoricalBaseline:
    """Per-dimension categorical distributions: log2_probs [D, 2**n_bits] for D = C*H*W dimensions."""

    log2_probs: torch.Tensor
    n_bits: int

    @classmethod
    def fit(cls, images: torch.Tensor, n_bits: int = 8, smoothing: float = 1.0) -> "PixelCategoricalBaseline":
        """Count each dimension's levels over uint8 images [N, C, H, W]; add `smoothing` to every count."""
        if images.dim() != 4 or images.shape[0] == 0:
            raise ValueError(f"PixelCategoricalBaseline.fit expects uint8 images [N, C, H, W]; got {tuple(images.shape)}")
        if smoothing <= 0:
            raise ValueError(f"smoothing must be > 0 (Laplace smoothing keeps unseen levels finite); got {smoothing}")
        levels = reduce_bits(images, n_bits).flatten(1)             # [N, D]
        n, dims = levels.shape
        bins = 2 ** n_bits
        counts = torch.zeros(dims, bins, dtype=torch.float64)
        counts.scatter_add_(1, levels.t().contiguous(), torch.ones(dims, n, dtype=torch.float64))
        counts += smoothing
        log2_probs = torch.log2(counts) - torch.log2(counts.sum(dim=1, keepdim=True))
        return cls(log2_probs=log2_probs, n_bits=n_bits)

    def bits_per_dim(self, images: torch.Tensor) -> torch.Tensor:
        """Per-image bits/dim [N] (float64) of uint8 images [N, C, H, W] with the fitted shape."""
        levels = reduce_bits(images, self.n_bits).flatten(1)
        if levels.shape[1] != self.log2_probs.shape[0]:
            raise ValueError(f"images have {levels.shape[1]} dimensions; the baseline was fitted on "
                             f"{self.log2_probs.shape[0]}")
        picked = self.log2_probs.gather(1, levels.t().contiguous())   # [D, N]
        return -picked.mean(dim=0)

    @property
    def uniform_bits_per_dim(self) -> float:
        """bits/dim of the uniform distribution over the levels (= n_bits), for reference."""
        return math.log2(2 ** self.n_bits)
