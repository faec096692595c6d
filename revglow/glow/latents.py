"""Arithmetic on Glow's latents (paper, section 5): straight lines between two images' latents, and attribute
directions (the mean latent of images with an attribute minus that of images without), applied with a scale.

Latents are what `Glow.encode` returns: a list with one tensor [N, ...] per level. Every function here works on
each level alike and returns the same kind of list, ready for `Glow.decode`.

Example:
    >>> from revglow import Glow, GlowConfig
    >>> model = Glow(GlowConfig(image_shape=(1, 8, 8), levels=2, depth=2, hidden=16))
    >>> x = torch.randint(0, 256, (2, 1, 8, 8), dtype=torch.uint8)
    >>> model.initialize(x)
    >>> z = encode_images(model, x)
    >>> line = interpolate_latents([t[:1] for t in z], [t[1:] for t in z], steps=5)
    >>> model.postprocess(model.decode(line)).shape
    torch.Size([5, 1, 8, 8])
"""
from __future__ import annotations

from typing import Iterable, List, Optional, Sequence

import torch

__all__ = ["encode_images", "interpolate_latents", "mean_latents", "attribute_direction", "move_latents"]

Latents = List[torch.Tensor]


@torch.no_grad()
def encode_images(model, images: torch.Tensor, y: Optional[torch.Tensor] = None) -> Latents:
    """Images (uint8 0..255 or float in [0, 1]) -> their latents, one dequantization draw (the global RNG)."""
    return model.encode(model.preprocess(images), y)


def interpolate_latents(a: Latents, b: Latents, steps: int) -> Latents:
    """`steps` latents on the straight line from `a` to `b` (each a one-image latent, [1, ...] per level), both
    ends included: per level a tensor [steps, ...]."""
    if steps < 2:
        raise ValueError(f"interpolate_latents: steps must be >= 2 (both ends are included); got {steps}")
    weights = torch.linspace(0.0, 1.0, steps, device=a[0].device)
    return [torch.stack([(1 - t) * za[0] + t * zb[0] for t in weights]) for za, zb in zip(a, b)]


def mean_latents(batches: Iterable[Latents]) -> Latents:
    """The mean latent of all images of several batches of latents (summed per batch, then divided once)."""
    sums, count = None, 0
    for latents in batches:
        batch_sums = [z.sum(dim=0) for z in latents]
        sums = batch_sums if sums is None else [s + t for s, t in zip(sums, batch_sums)]
        count += latents[0].shape[0]
    if sums is None:
        raise ValueError("mean_latents: no latents given")
    return [s / count for s in sums]


def attribute_direction(with_attribute: Latents, without_attribute: Latents) -> Latents:
    """The direction of an attribute in latent space: mean latent with it minus mean latent without it."""
    return [a - b for a, b in zip(with_attribute, without_attribute)]


def move_latents(latents: Latents, direction: Latents, alphas: Sequence[float]) -> Latents:
    """One image's latents ([1, ...] per level) moved by each alpha times `direction`: [len(alphas), ...] per level."""
    return [torch.stack([z[0] + alpha * d for alpha in alphas]) for z, d in zip(latents, direction)]
