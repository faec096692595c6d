"""Training order and loading: a resumable, distributed order over any data set (`EpochBatchSampler`, whose
`DataPosition` says where a run goes on), and the DataLoaders for training and evaluation. The readers of the
data sets themselves are in revglow.training.data.

Training order is reproducible and resumable: `EpochBatchSampler` draws each epoch's permutation from
(seed, epoch) alone, and a `DataPosition` (epoch, index into that permutation) says where to go on.
Under torch.distributed every rank takes its own slice of each global batch of that permutation (a
distributed sampler reshuffled every epoch), so the position means the same for any number of processes.

Example:
    >>> sampler = EpochBatchSampler(10, batch_size=4, seed=0)
    >>> sampler.set_position(DataPosition(epoch=0, index=4))
    >>> len(sampler)                 # two full batches per epoch, one left from index 4
    1
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Iterator, List, Tuple

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from revglow.errors import ConfigError

__all__ = ["DataPosition", "EpochBatchSampler", "epoch_permutation", "make_train_loader", "make_eval_loader"]


@dataclass
class DataPosition:
    """Where training is in the data: the epoch, and the index into that epoch's permutation."""

    epoch: int = 0
    index: int = 0

    def to_dict(self) -> dict:
        return {"epoch": int(self.epoch), "index": int(self.index)}

    @classmethod
    def from_dict(cls, data: dict) -> "DataPosition":
        try:
            return cls(epoch=int(data["epoch"]), index=int(data["index"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"a data position needs int 'epoch' and 'index'; got {data!r}") from exc


def epoch_permutation(num_items: int, seed: int, epoch: int) -> torch.Tensor:
    """The order of items in `epoch`: a permutation that depends on (seed, epoch) only."""
    generator = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch))
    return torch.randperm(num_items, generator=generator)


class EpochBatchSampler(Sampler[List[int]]):
    """Batches of indices for one epoch, starting at a position inside it; a distributed sampler too.

    Each epoch's permutation is cut into global batches of batch_size * world_size items; rank r takes
    items [r * batch_size, (r + 1) * batch_size) of each. The position's index counts items of the
    permutation (global), so a run resumes at the same place whatever the number of processes.
    Only full global batches are drawn (the remainder of each epoch's permutation is skipped), unless the
    data set is smaller than one, in which case the batch shrinks to fit.
    Call `set_position` before iterating; the sampler never touches the global RNG.
    """

    def __init__(self, num_items: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1) -> None:
        if num_items < 1:
            raise ConfigError("EpochBatchSampler: the data set is empty")
        if batch_size < 1:
            raise ConfigError(f"EpochBatchSampler: batch_size must be >= 1; got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ConfigError(f"EpochBatchSampler: need 0 <= rank < world_size; got rank {rank}, world_size {world_size}")
        if num_items < world_size:
            raise ConfigError(f"EpochBatchSampler: {num_items} training images cannot be shared by {world_size} "
                             f"processes")
        self.num_items = num_items
        self.batch_size = min(batch_size, num_items // world_size)
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.position = DataPosition()

    @property
    def global_batch_size(self) -> int:
        """Items of the permutation one step consumes: the per-process batch times the number of processes."""
        return self.batch_size * self.world_size

    @property
    def batches_per_epoch(self) -> int:
        return self.num_items // self.global_batch_size

    def set_position(self, position: DataPosition) -> None:
        self.position = DataPosition(position.epoch, position.index)

    def remaining(self, position: DataPosition) -> int:
        """Batches left in the epoch of `position` from its index on."""
        end = self.batches_per_epoch * self.global_batch_size
        return max(0, (end - position.index) // self.global_batch_size)

    def __len__(self) -> int:
        return self.remaining(self.position)

    def __iter__(self) -> Iterator[List[int]]:
        order = epoch_permutation(self.num_items, self.seed, self.position.epoch).tolist()
        step = self.global_batch_size
        end = self.batches_per_epoch * step
        for start in range(self.position.index, end - step + 1, step):
            first = start + self.rank * self.batch_size
            yield order[first:first + self.batch_size]


def make_train_loader(dataset: Dataset, batch_size: int, seed: int, workers: int = 0, rank: int = 0,
                      world_size: int = 1) -> Tuple[DataLoader, EpochBatchSampler]:
    """A DataLoader over `dataset` in the resumable order of an `EpochBatchSampler` (returned too). A batch larger
    than the data set shrinks to fit it, with a RuntimeWarning saying so."""
    if workers < 0:
        raise ConfigError(f"workers must be >= 0; got {workers}")
    sampler = EpochBatchSampler(len(dataset), batch_size, seed, rank, world_size)
    if sampler.batch_size < batch_size:
        warnings.warn(f"--batch-size {batch_size} is larger than the {len(dataset)} training images allow "
                      f"({world_size} process(es)): each step uses {sampler.batch_size} image(s) per process, the "
                      f"whole split", RuntimeWarning, stacklevel=2)
    # A private generator: DataLoader otherwise draws its worker base seed from the global torch RNG,
    # which would shift the dequantization noise and break exact resume.
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=workers, persistent_workers=workers > 0,
                        generator=torch.Generator().manual_seed(seed))
    return loader, sampler


def make_eval_loader(dataset: Dataset, batch_size: int, workers: int = 0) -> DataLoader:
    """A DataLoader over `dataset` in its stored order (for evaluation)."""
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                      generator=torch.Generator().manual_seed(0))
