"""CIFAR-10 from its "python" batches (data_batch_1..5, test_batch) in a local folder (nothing is downloaded). The
batches are pickles, read with revglow.training.safe_pickle: plain data and numpy arrays only, never code.

Example:
    >>> data = load_cifar10("data/cifar-10-batches-py")          # doctest: +SKIP
    >>> data.image_shape, data.num_classes                       # doctest: +SKIP
    ((3, 32, 32), 10)
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Tuple

import numpy as np
import torch

from revglow.training.datasets import DataError, ImageData, TensorImageDataset, labels_array, make_image_data
from revglow.training.safe_pickle import UnsafePickleError, safe_load

__all__ = ["load_cifar10", "CIFAR10_TRAIN_FILES", "CIFAR10_TEST_FILE", "CIFAR10_CLASSES"]

CIFAR10_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST_FILE = "test_batch"
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def _read_cifar_batch(path: Path) -> Tuple[np.ndarray, np.ndarray]:
    """The images [N, 3, 32, 32] and labels of one python batch, unpickled as plain data only (safe_pickle: a
    crafted file that names any other global is refused, naming the file, before anything it names runs)."""
    try:
        batch = safe_load(path, encoding="bytes")
    except UnsafePickleError as exc:
        raise DataError(str(exc)) from None
    except Exception as exc:
        raise DataError(f"{path}: not a CIFAR-10 python batch (a pickled dict) ({type(exc).__name__}: {exc})") from exc
    if not isinstance(batch, dict):
        raise DataError(f"{path}: expected a pickled dict with b'data' and b'labels'; got {type(batch).__name__}")
    data = batch.get(b"data", batch.get("data"))
    labels = batch.get(b"labels", batch.get("labels"))
    if data is None or labels is None:
        raise DataError(f"{path}: expected keys b'data' (uint8 [N, 3072]) and b'labels'; found {sorted(map(str, batch))}")
    data = np.asarray(data)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise DataError(f"{path}: b'data' must be uint8 [N, 3072]; got {data.dtype} {data.shape}")
    labels = np.asarray(labels).reshape(-1)
    if labels.shape[0] != data.shape[0]:
        raise DataError(f"{path}: {labels.shape[0]} labels for {data.shape[0]} images")
    return data.reshape(-1, 3, 32, 32), labels


def load_cifar10(root: Optional[str]) -> ImageData:
    """CIFAR-10 python batches from `root` (or `root/cifar-10-batches-py`): data_batch_1..5 and test_batch."""
    if root is None:
        raise DataError("--data cifar10 needs --data-root: a folder holding the CIFAR-10 python batches "
                        f"({', '.join(CIFAR10_TRAIN_FILES)}, {CIFAR10_TEST_FILE})")
    folder = Path(root)
    if (folder / "cifar-10-batches-py").is_dir():
        folder = folder / "cifar-10-batches-py"
    if not folder.is_dir():
        raise DataError(f"{folder}: no such folder; --data cifar10 expects the CIFAR-10 python batches there")
    expected = CIFAR10_TRAIN_FILES + (CIFAR10_TEST_FILE,)
    missing = [name for name in expected if not (folder / name).is_file()]
    if missing:
        raise DataError(f"{folder}: missing CIFAR-10 python batch file(s) {', '.join(missing)} "
                        f"(expected {', '.join(expected)}; the 'CIFAR-10 python version' archive, unpacked)")
    parts = [_read_cifar_batch(folder / name) for name in CIFAR10_TRAIN_FILES]
    train_x = torch.from_numpy(np.concatenate([p[0] for p in parts]))
    train_y = labels_array(np.concatenate([p[1] for p in parts]), train_x.shape[0], str(folder))
    test_x, test_y = _read_cifar_batch(folder / CIFAR10_TEST_FILE)
    test_y = labels_array(test_y, test_x.shape[0], str(folder / CIFAR10_TEST_FILE))
    return make_image_data("cifar10", TensorImageDataset(train_x, train_y),
                           TensorImageDataset(torch.from_numpy(test_x), test_y),
                           (3, 32, 32), torch.cat([train_y, test_y]), CIFAR10_CLASSES)
