"""Training-time augmentation (`TrainConfig.augment`): random translations, as the Glow authors' CIFAR-10 loader.

The reference (openai/glow `data_loaders/get_mnist_cifar.py`, data augmentation level 1, its default) feeds
CIFAR-10 through Keras' `ImageDataGenerator(width_shift_range=0.1, height_shift_range=0.1)`: each image is
moved by a shift drawn uniformly from [-0.1, 0.1] x its height (and, independently, its width), resampled
nearest-neighbour (Keras of 2018 calls scipy's affine_transform with order=0), so the shift is a whole number
of pixels, and the pixels moved in from outside repeat the edge (`fill_mode="nearest"`, the default). The
ImageNet and CelebA-HQ loaders (`data_loaders/get_data.py`) do not augment.

`random_shift` is a pure function of the batch and a torch.Generator: a run that saves the generator's state in
its checkpoint (revglow.training.resume does, beside the other RNG states) resumes with the same shifts, bit for bit.

Example:
    >>> images = torch.arange(16, dtype=torch.uint8).reshape(1, 1, 4, 4)
    >>> random_shift(images, torch.Generator().manual_seed(0), fraction=0.0).equal(images)
    True
"""
from __future__ import annotations

import math

import torch

from revglow.errors import ConfigError, ConfigTypeError

__all__ = ["SHIFT_FRACTION", "random_shift", "draw_shifts", "shift_images", "augment_batch"]

SHIFT_FRACTION = 0.1    # the reference's width_shift_range = height_shift_range


def draw_shifts(n: int, height: int, width: int, generator: torch.Generator,
                fraction: float = SHIFT_FRACTION) -> torch.Tensor:
    """[n, 2] int64 (dy, dx): uniform in [-fraction * size, fraction * size], rounded to the nearest pixel."""
    if not isinstance(generator, torch.Generator):
        raise ConfigTypeError(f"draw_shifts expects a torch.Generator; got {type(generator).__name__}")
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not math.isfinite(fraction) \
            or not 0.0 <= fraction < 1.0:
        raise ConfigError(f"the shift fraction must be a number in [0, 1); got {fraction!r}")
    uniform = torch.rand(n, 2, generator=generator, dtype=torch.float64, device=generator.device).cpu()
    reach = torch.tensor([fraction * height, fraction * width], dtype=torch.float64)
    return torch.round((2.0 * uniform - 1.0) * reach).to(torch.int64)


def shift_images(images: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
    """Image i moved down by shifts[i, 0] and right by shifts[i, 1] pixels; what comes in repeats the edge.

    Output pixel (r, c) is input pixel (clamp(r - dy), clamp(c - dx)), the clamp to the image being the
    edge repetition.
    """
    n, _, h, w = images.shape
    if shifts.shape != (n, 2):
        raise ConfigError(f"shifts must be [N, 2] = [{n}, 2] for these images; got {list(shifts.shape)}")
    shifts = shifts.to(images.device, torch.int64)
    rows = (torch.arange(h, device=images.device) - shifts[:, :1]).clamp(0, h - 1)   # [N, H]
    cols = (torch.arange(w, device=images.device) - shifts[:, 1:]).clamp(0, w - 1)   # [N, W]
    out = images.gather(2, rows[:, None, :, None].expand(images.shape))
    return out.gather(3, cols[:, None, None, :].expand(images.shape))


def random_shift(images: torch.Tensor, generator: torch.Generator, fraction: float = SHIFT_FRACTION) -> torch.Tensor:
    """A uint8 batch [N, C, H, W] with each image translated at random by up to `fraction` of its size
    (whole pixels, edges repeated; see the module docstring for the reference it follows). The shifts come
    from `generator` alone; the batch is not modified in place."""
    if not isinstance(images, torch.Tensor):
        raise ConfigTypeError(f"random_shift expects a tensor of images; got {type(images).__name__}")
    if images.dtype != torch.uint8 or images.dim() != 4:
        raise ConfigError(f"random_shift expects a uint8 batch [N, C, H, W]; got {images.dtype} of shape "
                          f"{list(images.shape)}")
    n, _, h, w = images.shape
    return shift_images(images, draw_shifts(n, h, w, generator, fraction))


def augment_batch(images: torch.Tensor, augment: str, generator: torch.Generator) -> torch.Tensor:
    """A batch of training images (uint8, before it goes to the device) as `augment` (TrainConfig.augment, one
    of AUGMENTATIONS) asks: "shift" is random_shift with `generator`, "none" leaves the batch as it is."""
    return random_shift(images, generator) if augment == "shift" else images
