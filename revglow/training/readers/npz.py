"""Images from a NumPy .npz file: x_train/x_test (+ y_train/y_test), or images|x (+ labels|y) and a fixed 10% test
split; [N, H, W, C], [N, C, H, W] or [N, H, W] uint8 arrays.

Example:
    >>> data = load_npz("data/faces.npz")          # doctest: +SKIP
"""
from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from revglow.training.datasets import (DEFAULT_TEST_FRACTION, DataError, ImageData, TensorImageDataset, labels_array,
                                       make_image_data, split_tensors)

__all__ = ["load_npz"]


def _to_nchw(array: np.ndarray, where: str) -> np.ndarray:
    """uint8 images [N, C, H, W] from [N, H, W, C], [N, C, H, W] or [N, H, W]; C must be 1 or 3."""
    if array.ndim == 3:
        array = array[:, None]
    if array.ndim != 4:
        raise DataError(f"{where}: expected images [N, H, W, C], [N, C, H, W] or [N, H, W]; got shape {array.shape}")
    if array.shape[1] in (1, 3):          # channels first (wins when both axes could be channels)
        pass
    elif array.shape[3] in (1, 3):
        array = array.transpose(0, 3, 1, 2)
    else:
        raise DataError(f"{where}: cannot find a channel axis with 1 or 3 entries in shape {array.shape}")
    if array.dtype != np.uint8:
        if not np.issubdtype(array.dtype, np.integer) or array.size and (array.min() < 0 or array.max() > 255):
            raise DataError(f"{where}: images must be uint8 (0..255); got dtype {array.dtype}")
        array = array.astype(np.uint8)
    return np.ascontiguousarray(array)


def _first_key(archive, names: Sequence[str]) -> Optional[str]:
    return next((k for k in names if k in archive.files), None)


def _member(archive, key: str, path: Path) -> np.ndarray:
    """archive[key], with a damaged member (bad CRC, truncated, not an array) as one DataError line."""
    try:
        return archive[key]
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError) as exc:
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"{path}[{key}]: the array is corrupt or unreadable ({type(exc).__name__}: {text})") from exc


def load_npz(root: Optional[str]) -> ImageData:
    """Images from a .npz file: x_train/x_test (+ y_train/y_test), or images|x (+ labels|y), uint8."""
    if root is None:
        raise DataError("--data npz needs --data-root: the path of a .npz file with uint8 images "
                        "(keys x_train/x_test, or images or x; labels optional)")
    path = Path(root)
    if not path.is_file():
        raise DataError(f"{path}: no such file; --data npz expects a NumPy .npz file")
    try:
        archive = np.load(path, allow_pickle=False)
        if not hasattr(archive, "files"):
            raise DataError(f"{path}: a single .npy array, not a .npz archive with named arrays")
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"{path}: not a readable .npz file ({type(exc).__name__}: {exc})") from exc
    with archive:
        if "x_train" in archive.files and "x_test" in archive.files:
            train_x = _to_nchw(_member(archive, "x_train", path), f"{path}[x_train]")
            test_x = _to_nchw(_member(archive, "x_test", path), f"{path}[x_test]")
            if train_x.shape[1:] != test_x.shape[1:]:
                raise DataError(f"{path}: x_train images {train_x.shape[1:]} and x_test images {test_x.shape[1:]} differ")
            has_y = "y_train" in archive.files and "y_test" in archive.files
            train_y = labels_array(_member(archive, "y_train", path), train_x.shape[0], f"{path}[y_train]") if has_y else None
            test_y = labels_array(_member(archive, "y_test", path), test_x.shape[0], f"{path}[y_test]") if has_y else None
            labels = torch.cat([train_y, test_y]) if has_y else None
            if train_x.shape[0] == 0 or test_x.shape[0] == 0:
                raise DataError(f"{path}: x_train and x_test must both hold at least one image")
            return make_image_data("npz", TensorImageDataset(torch.from_numpy(train_x), train_y),
                                   TensorImageDataset(torch.from_numpy(test_x), test_y), train_x.shape[1:], labels)
        image_key = _first_key(archive, ("images", "x"))
        if image_key is None:
            raise DataError(f"{path}: expected arrays x_train and x_test, or images or x; found {archive.files}")
        images = _to_nchw(_member(archive, image_key, path), f"{path}[{image_key}]")
        label_key = _first_key(archive, ("labels", "y"))
        labels = labels_array(_member(archive, label_key, path), images.shape[0], f"{path}[{label_key}]") if label_key else None
    return split_tensors("npz", torch.from_numpy(images), labels, DEFAULT_TEST_FRACTION)
