"""ActNorm's data-dependent initialization in a training run (paper, section 3.1): the init batch, and the checks
that it can give meaningful scales.

The init batch is the first init_batch_size images (default: one global batch) of the first epoch's training
order, shifted by --augment as the reference's was (drawn from its augmenting training iterator), and split
evenly over the ranks under torch.distributed: `Glow.initialize` then takes the statistics of all shares together.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch.utils.data import Dataset

from revglow.errors import ConfigError
from revglow.glow.layers.actnorm import DegenerateInitError
from revglow.glow.model import Glow
from revglow.training.augment import augment_batch
from revglow.training.config import TrainConfig
from revglow.training.distributed import DistributedContext
from revglow.training.loaders import epoch_permutation

__all__ = ["init_batch", "initialize_on_batch"]


def init_batch(train: Dataset, config: TrainConfig, global_batch_size: int, dist: DistributedContext,
               augment_generator: torch.Generator, device: torch.device,
               conditional: bool) -> Tuple[torch.Tensor, Optional[torch.Tensor], int]:
    """This rank's share of the init batch of the training split `train`, shifted as config.augment asks (with
    `augment_generator`): (images on `device`, labels or None, the number of images of all shares)."""
    total = config.init_batch_size or global_batch_size
    total = min(total, len(train))
    if total < dist.world_size:
        raise ConfigError(f"--init-batch-size {total} is smaller than the number of processes "
                          f"({dist.world_size}); each needs at least one image")
    order = epoch_permutation(len(train), config.seed, 0)[:total]   # the sampler's first epoch
    rank, world = dist.rank, dist.world_size
    mine = order[rank * total // world:(rank + 1) * total // world].tolist()
    items = [train[i] for i in mine]
    x = augment_batch(torch.stack([image for image, _ in items]), config.augment, augment_generator).to(device)
    y = torch.tensor([label for _, label in items], device=device)
    return x, (y if conditional else None), total


def initialize_on_batch(model: Glow, x: torch.Tensor, y: Optional[torch.Tensor], total: int) -> None:
    """model.initialize(x, y) on this rank's share of an init batch of `total` images, with a ConfigError naming
    --init-batch-size where the batch cannot give meaningful scales."""
    _, h, w = model.latent_shapes[-1]
    if total * h * w < 2:
        raise ConfigError(f"ActNorm's data-dependent init would see one value per channel at the top level "
                          f"(an init batch of {total} image(s), {h}x{w} pixels there), which makes its scales "
                          f"meaningless; pass a larger --init-batch-size (the paper's code uses 256)")
    try:
        model.initialize(x, y)
    except DegenerateInitError as exc:
        raise ConfigError(f"ActNorm's data-dependent init got a degenerate batch ({exc}); pass a larger or "
                          f"more varied --init-batch-size (the paper's code uses 256)") from exc
