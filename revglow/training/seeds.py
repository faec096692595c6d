"""The seeds of a training run: the global RNGs, and the streams of each process under torch.distributed.

A single process uses TrainConfig.seed itself. Under torch.distributed rank r draws from `rank_seed(seed, r)`
= seed * 2**16 + r + 1: streams clear of the single-process one (seed itself) and of each other.

Example:
    >>> rank_seed(0, 0), rank_seed(1, 2)
    (1, 65539)
    >>> seed_global_rngs(3)
    >>> torch.initial_seed()
    3
"""
from __future__ import annotations

import random
from typing import Tuple

import numpy as np
import torch

from revglow.training.distributed import DistributedContext

__all__ = ["rank_seed", "process_seed", "seed_global_rngs", "process_generators"]


def rank_seed(seed: int, rank: int) -> int:
    """The seed of rank `rank`'s streams in a distributed run of seed `seed`."""
    return seed * 65536 + rank + 1


def process_seed(seed: int, dist: DistributedContext) -> int:
    """The seed of this process's streams: `seed` in a single process, else its rank's (rank_seed)."""
    return rank_seed(seed, dist.rank) if dist.enabled else seed


def seed_global_rngs(seed: int) -> None:
    """Seed torch's, NumPy's and Python's global RNGs (NumPy takes the seed modulo 2**32)."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2 ** 32)
    random.seed(seed)


def process_generators(seed: int, dist: DistributedContext,
                       device: torch.device) -> Tuple[torch.Generator, torch.Generator]:
    """(augment, noise): the generators of a training process's own draws, both seeded with process_seed.

    --augment's shifts come from a generator of their own (saved with the other RNG states), so turning
    augmentation on leaves the dequantization noise's stream as it was. The dequantization noise of training steps
    comes from a generator on `device`, saved with the other RNG states (per rank), so a resumed run draws what the
    uninterrupted one would have. Under torch.distributed the global RNGs are seeded per rank too (rank_seed), for
    anything else that draws from them (a user's dropout)."""
    if dist.enabled:
        seed_global_rngs(rank_seed(seed, dist.rank))
    augment = torch.Generator().manual_seed(process_seed(seed, dist))
    noise = torch.Generator(device).manual_seed(process_seed(seed, dist))
    return augment, noise
