"""The data sets of revglow.training as torch Datasets: images held in memory or read from files on demand, the
`ImageData` a reader returns (both splits, image shape, classes), and the fixed train/test split the readers share.

Every data set is a pair of torch Datasets (train, test) whose items are `(image, label)`: image a uint8
tensor [C, H, W] with values 0..255, label an int (-1 when the data set has no labels).

Example:
    >>> images = torch.zeros(10, 1, 4, 4, dtype=torch.uint8)
    >>> data = split_tensors("zeros", images, torch.arange(10) % 2, test_fraction=0.2)
    >>> len(data.train), len(data.test), data.image_shape, data.num_classes
    (8, 2, (1, 4, 4), 2)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset

from revglow.errors import RevglowError
from revglow.training.images import load_image
from revglow.training.loaders import make_eval_loader

__all__ = [
    "DataError",
    "ImageData",
    "TensorImageDataset",
    "ImageFileDataset",
    "SPLIT_SEED",
    "DEFAULT_TEST_FRACTION",
    "split_indices",
    "split_tensors",
    "make_image_data",
    "labels_array",
    "stack_images",
]

SPLIT_SEED = 0                 # the fixed train/test split does not depend on the training seed
DEFAULT_TEST_FRACTION = 0.1


class DataError(RevglowError, ValueError):
    """A data set is missing or not in the expected format; the message says what was expected where."""


class TensorImageDataset(Dataset):
    """Images held in memory: uint8 [N, C, H, W] and optional int labels [N]."""

    def __init__(self, images: torch.Tensor, labels: Optional[torch.Tensor] = None) -> None:
        if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.dim() != 4:
            raise DataError("TensorImageDataset expects a uint8 tensor [N, C, H, W]")
        if labels is not None and (labels.dim() != 1 or labels.shape[0] != images.shape[0]):
            raise DataError(f"labels must be [N] with N = {images.shape[0]}; got {tuple(labels.shape)}")
        self.images = images
        self.labels = None if labels is None else labels.long()

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, int]:
        label = -1 if self.labels is None else int(self.labels[index])
        return self.images[index], label


class ImageFileDataset(Dataset):
    """Image files read on demand, resized (shorter side) and centre-cropped to `size`, as uint8 [C, H, W]."""

    def __init__(self, paths: Sequence[Path], labels: Optional[Sequence[int]], size: Tuple[int, int],
                 channels: int) -> None:
        if labels is not None and len(labels) != len(paths):
            raise DataError(f"{len(paths)} image files but {len(labels)} labels")
        self.paths = [Path(p) for p in paths]
        self.labels = None if labels is None else [int(v) for v in labels]
        self.size = tuple(size)
        self.channels = channels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, int]:
        image = load_image(self.paths[index], size=self.size, channels=self.channels)
        label = -1 if self.labels is None else self.labels[index]
        return image, label


@dataclass
class ImageData:
    """A data set with its fixed split, image shape (C, H, W) and number of classes (0: unlabelled)."""

    name: str
    train: Dataset
    test: Dataset
    image_shape: Tuple[int, int, int]
    num_classes: int = 0
    class_names: List[str] = field(default_factory=list)
    skipped: List[str] = field(default_factory=list)   # unreadable files left out (folder, skip_bad_images=True)


# ----------------------------------------------------------------------------------------------- the split

def split_indices(n: int, test_fraction: float) -> Tuple[np.ndarray, np.ndarray]:
    """Fixed permutation (seed SPLIT_SEED): the last `test_fraction` of it is the test set."""
    order = np.random.default_rng(SPLIT_SEED).permutation(n)
    n_test = max(1, int(round(n * test_fraction))) if n > 1 else 0
    return np.sort(order[: n - n_test]), np.sort(order[n - n_test:])


def split_tensors(name: str, images: torch.Tensor, labels: Optional[torch.Tensor], test_fraction: float,
                  class_names: Sequence[str] = ()) -> ImageData:
    """Data set `name` of images [N, C, H, W] held in memory (and labels [N] or None), split with split_indices."""
    if images.shape[0] < 2:
        raise DataError(f"{name}: need at least 2 images to make a train/test split; got {images.shape[0]}")
    train_idx, test_idx = split_indices(images.shape[0], test_fraction)
    pick = (lambda t, i: None if t is None else t[torch.from_numpy(i)])
    return make_image_data(name, TensorImageDataset(pick(images, train_idx), pick(labels, train_idx)),
                           TensorImageDataset(pick(images, test_idx), pick(labels, test_idx)),
                           tuple(images.shape[1:]), labels, class_names)


def make_image_data(name: str, train: Dataset, test: Dataset, image_shape, labels, class_names=()) -> ImageData:
    """ImageData of the two splits; `labels` (of both splits, or None) give the number of classes, named
    `class_names` (default "0", "1", ...)."""
    num_classes = 0
    if labels is not None and len(labels):
        labels = torch.as_tensor(labels)
        if int(labels.min()) < 0:
            raise DataError(f"{name}: labels must be >= 0; found {int(labels.min())}")
        num_classes = int(labels.max()) + 1
    names = list(class_names) if class_names else [str(i) for i in range(num_classes)]
    return ImageData(name, train, test, tuple(int(s) for s in image_shape), num_classes, names)


def labels_array(array: np.ndarray, n: int, where: str) -> torch.Tensor:
    """Integer labels of n images as int64 [n]; a DataError naming `where` otherwise."""
    array = np.asarray(array).reshape(-1)
    if array.shape[0] != n:
        raise DataError(f"{where}: {array.shape[0]} labels for {n} images")
    if not np.issubdtype(array.dtype, np.integer):
        raise DataError(f"{where}: labels must be integers; got dtype {array.dtype}")
    return torch.from_numpy(array.astype(np.int64))


def stack_images(dataset: Dataset, batch_size: int = 512, workers: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """All images of `dataset` as one uint8 tensor [N, C, H, W], and the labels [N] (-1: none)."""
    if isinstance(dataset, TensorImageDataset):
        labels = dataset.labels if dataset.labels is not None else torch.full((len(dataset),), -1)
        return dataset.images, labels
    images, labels = [], []
    for x, y in make_eval_loader(dataset, batch_size, workers):
        images.append(x)
        labels.append(torch.as_tensor(y))
    return torch.cat(images), torch.cat(labels)
