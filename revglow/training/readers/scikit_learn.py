"""The two data sets shipped with scikit-learn, read from its installed files.

  digits   the 8x8 handwritten digits (1797 images, 10 classes), grey levels 0..16 mapped to 0..255; a fixed
           split (seed 0) keeps 20% for the test set.
  photos   square crops (side `image_size`, default 64) of the two 427x640 colour photographs
           (`load_sample_images`): a real high-resolution source that needs no files. The right strip of each
           photograph (a quarter of its width, at least one crop wide) is the test region, the rest the train
           region, so no train crop shares a pixel with a test crop; crop positions are fixed (seed 0). Labels:
           which photograph (0 china, 1 flower).

Both read scikit-learn's files without importing scikit-learn where they can (that import, with scipy, takes one
or two seconds of every start), and ask scikit-learn itself when the files are not there or not as expected.

Example:
    >>> data = load_digits()
    >>> data.image_shape, data.num_classes, len(data.train), len(data.test)
    ((1, 8, 8), 10, 1438, 359)
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np
import torch

from revglow.training.datasets import (SPLIT_SEED, DataError, ImageData, TensorImageDataset, make_image_data,
                                       split_tensors)

__all__ = ["load_digits", "load_photos", "PHOTO_NAMES", "DIGITS_TEST_FRACTION", "PHOTOS_DEFAULT_SIZE"]

DIGITS_TEST_FRACTION = 0.2
PHOTOS_DEFAULT_SIZE = 64
PHOTOS_TRAIN_PIXELS = 2048 * 64 * 64     # train crops per photograph: this many pixels (2048 at 64x64), at least 64
PHOTOS_TEST_CROPS = 128                  # test crops per photograph
PHOTO_NAMES = ("china", "flower")   # sklearn/datasets/images/<name>.jpg, in load_sample_images' (sorted) order


def _sklearn_folder(*parts: str) -> Optional[Path]:
    """sklearn/<parts> of the installed scikit-learn, found without importing it; None if there is none."""
    import importlib.util

    try:
        spec = importlib.util.find_spec("sklearn")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        path = Path(folder).joinpath(*parts)
        if path.is_dir():
            return path
    return None


def load_digits() -> ImageData:
    """scikit-learn's 8x8 digits as uint8 [N, 1, 8, 8] (round(v * 255 / 16)), labels 0..9, fixed 80/20 split."""
    grey, target = _digits_file() or _sklearn_digits()
    images = np.round(grey.astype(np.float64) * 255.0 / 16.0).clip(0, 255).astype(np.uint8)
    images = torch.from_numpy(images[:, None])
    labels = torch.from_numpy(target.astype(np.int64))
    return split_tensors("digits", images, labels, DIGITS_TEST_FRACTION)


def _sklearn_digits() -> Tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits as sklearn_digits
    except ImportError as exc:
        raise DataError("--data digits needs scikit-learn (pip install scikit-learn)") from exc
    bunch = sklearn_digits()
    return bunch.images, bunch.target


def _digits_file() -> Optional[Tuple[np.ndarray, np.ndarray]]:
    """The digits read straight from scikit-learn's installed sklearn/datasets/data/digits.csv.gz, as its
    load_digits reads them (rows of 64 grey levels 0..16 and the label), without importing scikit-learn: that
    import (it brings scipy) takes most of a second, on every start of `revglow train --data digits`.
    None when the file is not there or not as expected; load_digits then asks scikit-learn itself."""
    import gzip

    folder = _sklearn_folder("datasets", "data")
    path = folder / "digits.csv.gz" if folder is not None else None
    if path is None or not path.is_file():
        return None
    try:
        with gzip.open(path, "rt") as handle:
            data = np.loadtxt(handle, delimiter=",")
    except (OSError, ValueError):
        return None
    if (data.ndim != 2 or data.shape[1] != 65 or not np.all(data == np.round(data))
            or data[:, :64].min() < 0 or data[:, :64].max() > 16
            or not set(np.unique(data[:, 64])) <= set(range(10))):
        return None
    return data[:, :64].reshape(-1, 8, 8), data[:, 64].astype(int)


def _sklearn_photos() -> List[np.ndarray]:
    try:
        from sklearn.datasets import load_sample_images
    except ImportError as exc:
        raise DataError("--data photos needs scikit-learn (pip install scikit-learn)") from exc
    try:
        return load_sample_images().images           # decoding the JPEGs needs Pillow
    except ImportError as exc:
        raise DataError("--data photos needs Pillow to decode the photographs (pip install Pillow)") from exc


def _photo_files() -> Optional[List[np.ndarray]]:
    """The two photographs decoded straight from scikit-learn's installed sklearn/datasets/images/, with Pillow, as
    its load_sample_images decodes them, without importing scikit-learn (most of two seconds, with scipy). None
    when a file is missing, Pillow is not installed or a file is not an RGB image; load_photos then asks
    scikit-learn itself (which says what is missing)."""
    folder = _sklearn_folder("datasets", "images")
    if folder is None:
        return None
    try:
        from PIL import Image
    except ImportError:
        return None
    photos = []
    for name in PHOTO_NAMES:
        try:
            with Image.open(folder / f"{name}.jpg") as image:
                photo = np.asarray(image)
        except (OSError, ValueError):
            return None
        if photo.ndim != 3 or photo.shape[2] != 3 or photo.dtype != np.uint8:
            return None
        photos.append(photo)
    return photos


def _photo_crops(photo: np.ndarray, size: int, count: int, columns: Tuple[int, int],
                 rng: np.random.Generator) -> np.ndarray:
    """`count` crops [count, 3, size, size] of `photo` [H, W, 3] whose columns lie in [columns[0], columns[1])."""
    tops = rng.integers(0, photo.shape[0] - size + 1, count)
    lefts = rng.integers(columns[0], columns[1] - size + 1, count)
    # windows[t, l] is the crop at (t, l), already [3, size, size]: one gather instead of a Python loop per crop
    windows = np.lib.stride_tricks.sliding_window_view(photo, (size, size), axis=(0, 1))
    return np.ascontiguousarray(windows[tops, lefts])


def load_photos(image_size: Optional[int] = None) -> ImageData:
    """Crops of scikit-learn's two sample photographs (see the module docstring), uint8 [N, 3, s, s]."""
    size = PHOTOS_DEFAULT_SIZE if image_size is None else image_size
    if isinstance(size, bool) or not isinstance(size, int):
        raise DataError(f"--data photos: --image-size must be an int; got {size!r}")
    photos = _photo_files() or _sklearn_photos()
    height, width = photos[0].shape[:2]
    test_width = max(width // 4, size)
    if size < 2 or size > min(height, width - test_width):
        raise DataError(f"--data photos: --image-size must lie between 2 and {min(height, width // 2)} (the "
                        f"{height}x{width} photographs keep a test strip of at least one crop); got {size}")
    n_train = max(64, PHOTOS_TRAIN_PIXELS // (size * size))
    rng = np.random.default_rng(SPLIT_SEED)
    train, test, train_labels, test_labels = [], [], [], []
    for label, photo in enumerate(photos):
        train.append(_photo_crops(photo, size, n_train, (0, width - test_width), rng))
        test.append(_photo_crops(photo, size, PHOTOS_TEST_CROPS, (width - test_width, width), rng))
        train_labels += [label] * n_train
        test_labels += [label] * PHOTOS_TEST_CROPS
    labels = torch.tensor(train_labels + test_labels)
    train_set = TensorImageDataset(torch.from_numpy(np.concatenate(train)), torch.tensor(train_labels))
    test_set = TensorImageDataset(torch.from_numpy(np.concatenate(test)), torch.tensor(test_labels))
    return make_image_data("photos", train_set, test_set, (3, size, size), labels, PHOTO_NAMES)
