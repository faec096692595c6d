"""Image data sets for training and evaluation, read from local files only (nothing is downloaded): `load_dataset`,
and `READERS`, the reader of each name of DATASETS.

Every data set is a pair of torch Datasets (train, test) whose items are `(image, label)`: image a uint8
tensor [C, H, W] with values 0..255, label an int (-1 when the data set has no labels); `ImageData` and the
Dataset classes are in revglow.training.datasets.

Sources (`load_dataset(name, root, image_size)`), each read by a module of revglow.training.readers:
  digits   the 8x8 handwritten digits shipped with scikit-learn (1797 images, 10 classes), grey levels
           0..16 mapped to 0..255; a fixed split (seed 0) keeps 20% for the test set (readers.scikit_learn).
  cifar10  the CIFAR-10 "python" batches (data_batch_1..5, test_batch) in the folder `root` (readers.cifar10).
  folder   PNG/JPEG files under `root`, searched recursively; class subfolders give labels; `root/train`
           and `root/test` give the split when both exist, else a fixed 10% test split. Every file is
           decoded once when the data set is loaded, so an unreadable one stops before training, naming
           its path (or is left out, and counted, with skip_bad_images=True) (readers.folder).
  npz      a NumPy .npz file `root` with x_train/x_test (+ y_train/y_test), or images|x (+ labels|y)
           and a fixed 10% test split; [N, H, W, C], [N, C, H, W] or [N, H, W] uint8 arrays (readers.npz).
  photos   square crops (side `image_size`, default 64) of the two 427x640 colour photographs shipped with
           scikit-learn (`load_sample_images`): a real high-resolution source that needs no files. The right
           strip of each photograph (a quarter of its width, at least one crop wide) is the test region, the
           rest the train region, so no train crop shares a pixel with a test crop; crop positions are fixed
           (seed 0). Labels: which photograph (0 china, 1 flower) (readers.scikit_learn).

The training order and the DataLoaders (sampling and positioning) are in revglow.training.loaders.

Example:
    >>> data = load_dataset("digits")
    >>> data.image_shape, data.num_classes, len(data.train), len(data.test)
    ((1, 8, 8), 10, 1438, 359)
"""
from __future__ import annotations

from typing import Optional, Tuple

from revglow.training.config import DATASETS
from revglow.training.datasets import DataError, ImageData
from revglow.training.readers.cifar10 import load_cifar10
from revglow.training.readers.folder import load_image_folder
from revglow.training.readers.npz import load_npz
from revglow.training.readers.scikit_learn import load_digits, load_photos

__all__ = ["READERS", "load_dataset"]


def load_dataset(name: str, root: Optional[str] = None, image_size: Optional[int] = None,
                 skip_bad_images: bool = False) -> ImageData:
    """Load one of DATASETS from local files (see the module docstring)."""
    if name not in READERS:
        raise DataError(f"unknown data set {name!r}; choose one of {DATASETS}")
    return READERS[name](root, image_size, skip_bad_images)


def _check_image_size(name: str, image_size: Optional[int], shape: Tuple[int, int, int]) -> None:
    if image_size is not None and (shape[1], shape[2]) != (image_size, image_size):
        raise DataError(f"{name} images are {shape[1]}x{shape[2]}; --image-size {image_size} only applies to "
                        f"--data folder (resize the images yourself for other data sets)")


def _fixed_size(reader):
    """A reader of a data set whose images have one size: it takes no image_size but checks one that is given."""
    def read(root: Optional[str], image_size: Optional[int], skip_bad_images: bool) -> ImageData:
        data = reader(root)
        _check_image_size(data.name, image_size, data.image_shape)
        return data
    return read


# One reader per name of DATASETS: reader(root, image_size, skip_bad_images) -> ImageData.
READERS = {
    "digits": _fixed_size(lambda root: load_digits()),
    "cifar10": _fixed_size(load_cifar10),
    "folder": load_image_folder,
    "npz": _fixed_size(load_npz),
    "photos": lambda root, image_size, skip_bad_images: load_photos(image_size),
}
assert tuple(READERS) == DATASETS, "revglow.glow.config.DATASETS and revglow.training.data.READERS must name the same data sets"
