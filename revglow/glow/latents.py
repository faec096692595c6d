"""Arithmetic on Glow's latents (paper, section 5): straight lines between two images' latents, and attribute
directions (the mean latent of images with an attribute minus that of images without), applied with a scale; and
samples drawn in batches of bounded memory (`sample_in_batches`, what `revglow sample` runs).

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

import math
from typing import Iterable, Iterator, List, Optional, Sequence, Tuple

import torch

from revglow.glow.checks import check_sample_request
from revglow.glow.config import GlowConfig

__all__ = ["encode_images", "interpolate_latents", "mean_latents", "attribute_direction", "move_latents",
           "sample_in_batches", "default_sample_batch", "DRAW_CHUNK", "SAMPLE_BATCH_VALUES"]

Latents = List[torch.Tensor]

# Images whose latents one call of the random generator draws: sampling draws whole chunks in image order, so each
# image's latents depend on the seed and its index alone, never on the batch size.
DRAW_CHUNK = 16
# What one batch of default size holds of the widest level's activations (its coupling network's hidden channels at
# that level's size): 2**24 values, 64 MiB in float32; decoding keeps a few such tensors alive at a time.
SAMPLE_BATCH_VALUES = 2 ** 24


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


def default_sample_batch(config: GlowConfig) -> int:
    """Images decoded at once by default: as many as keep the widest level's activations (hidden channels at the
    first level's size, or the images themselves) near SAMPLE_BATCH_VALUES values, so that the memory of sampling
    does not grow with the number of images.

    Example:
        >>> default_sample_batch(GlowConfig())          # the paper's CIFAR-10 model: 512 channels at 16x16
        128
    """
    c, h, w = config.image_shape
    widest = max(config.hidden * (h >> level) * (w >> level) for level in range(1, config.levels + 1))
    return max(1, SAMPLE_BATCH_VALUES // max(widest, c * h * w))


def _latent_rows(generator: torch.Generator, values: int) -> Iterator[torch.Tensor]:
    """Rows [1, values] of standard-normal latents, one per image in image order, drawn DRAW_CHUNK at a time."""
    while True:
        yield from torch.randn((DRAW_CHUNK, values), generator=generator).split(1)


@torch.no_grad()
def sample_in_batches(model, n: int, batch_size: int, temperature: float = 1.0, label: Optional[int] = None,
                      seed: int = 0) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    """n samples of `model` (latents from N(0, temperature^2 I)), decoded `batch_size` at a time: yields per batch
    (images [b, C, H, W] as floats in [0, 1], finite [b] bool). A sample whose decoded values are not all finite
    comes back black, with finite False. A class-conditional model draws every image of class `label`, or with
    label None image i of class i mod num_classes.

    Deterministic for a seed, and the same images whatever the batch size or device (up to the arithmetic of
    convolutions at another batch size): the latents come from a CPU generator seeded with `seed`, drawn
    DRAW_CHUNK images at a time in image order. They are not the images `Glow.sample(n, generator=...)` draws with
    that seed (it draws each level's latents for all n images at once).

    Example:
        >>> from revglow import Glow
        >>> model = Glow(GlowConfig(image_shape=(1, 8, 8), levels=2, depth=2, hidden=8))
        >>> model.initialize(torch.randint(0, 256, (4, 1, 8, 8), dtype=torch.uint8))
        >>> [images.shape[0] for images, finite in sample_in_batches(model, 10, batch_size=4)]
        [4, 4, 2]
    """
    ref = next(model.parameters())
    check_sample_request(n, temperature, None, ref.device)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"sample_in_batches: batch_size must be a positive int; got {batch_size!r}")
    k = model.config.num_classes
    if label is not None and k == 0:
        raise ValueError(f"sample_in_batches: label {label!r} given to an unconditional model (num_classes=0)")
    rows = _latent_rows(torch.Generator().manual_seed(seed), sum(math.prod(s) for s in model.latent_shapes))
    for start in range(0, n, batch_size):
        b = min(batch_size, n - start)
        y = None
        if k > 0:
            y = torch.full((b,), label, dtype=torch.long) if label is not None else torch.arange(start, start + b) % k
        yield _decode_batch(model, torch.cat([next(rows) for _ in range(b)]) * temperature, y)


def _decode_batch(model, flat: torch.Tensor, y: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """(images, finite) of the latents `flat` [b, all levels' values] (in a function of its own, so that nothing of
    one batch but what it returns stays alive while the next one decodes)."""
    ref = next(model.parameters())
    shapes = [tuple(s) for s in model.latent_shapes]
    parts = flat.to(device=ref.device, dtype=ref.dtype).split([math.prod(s) for s in shapes], dim=1)
    xc = model.decode([part.reshape((flat.shape[0],) + s) for part, s in zip(parts, shapes)],
                      None if y is None else y.to(ref.device))
    finite = torch.isfinite(xc).flatten(1).all(dim=1)
    return model.postprocess(torch.where(finite[:, None, None, None], xc, -0.5)), finite
