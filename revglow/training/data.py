"""Image data sets for training and evaluation, read from local files only (nothing is downloaded).

Every data set is a pair of torch Datasets (train, test) whose items are `(image, label)`: image a uint8
tensor [C, H, W] with values 0..255, label an int (-1 when the data set has no labels).

Sources (`load_dataset(name, root, image_size)`):
  digits   the 8x8 handwritten digits shipped with scikit-learn (1797 images, 10 classes), grey levels
           0..16 mapped to 0..255; a fixed split (seed 0) keeps 20% for the test set.
  cifar10  the CIFAR-10 "python" batches (data_batch_1..5, test_batch) in the folder `root`.
  folder   PNG/JPEG files under `root`, searched recursively; class subfolders give labels; `root/train`
           and `root/test` give the split when both exist, else a fixed 10% test split. Every file is
           decoded once when the data set is loaded, so an unreadable one stops before training, naming
           its path (or is left out, and counted, with skip_bad_images=True).
  npz      a NumPy .npz file `root` with x_train/x_test (+ y_train/y_test), or images|x (+ labels|y)
           and a fixed 10% test split; [N, H, W, C], [N, C, H, W] or [N, H, W] uint8 arrays.
  photos   square crops (side `image_size`, default 64) of the two 427x640 colour photographs shipped with
           scikit-learn (`load_sample_images`): a real high-resolution source that needs no files. The right
           strip of each photograph (a quarter of its width, at least one crop wide) is the test region, the
           rest the train region, so no train crop shares a pixel with a test crop; crop positions are fixed
           (seed 0). Labels: which photograph (0 china, 1 flower).

`READERS` maps each name of DATASETS to its reader. The training order and the DataLoaders (sampling and
positioning) are in revglow.training.loaders; its names are importable from here too.

Example:
    >>> data = load_dataset("digits")
    >>> data.image_shape, data.num_classes, len(data.train), len(data.test)
    ((1, 8, 8), 10, 1438, 359)
"""
from __future__ import annotations

import os
import pickle
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset

from revglow.training.config import DATASETS
from revglow.errors import RevglowError
from revglow.training.images import IMAGE_SUFFIXES, is_grey_mode, load_image
from revglow.training.loaders import DataPosition, EpochBatchSampler, epoch_permutation, make_eval_loader, make_train_loader

__all__ = [
    "DATASETS",
    "READERS",
    "DataError",
    "ImageData",
    "TensorImageDataset",
    "ImageFileDataset",
    "DataPosition",
    "EpochBatchSampler",
    "epoch_permutation",
    "load_dataset",
    "load_digits",
    "load_cifar10",
    "load_image_folder",
    "load_npz",
    "load_photos",
    "make_train_loader",
    "make_eval_loader",
    "stack_images",
]

SPLIT_SEED = 0                 # the fixed train/test split does not depend on the training seed
DIGITS_TEST_FRACTION = 0.2
DEFAULT_TEST_FRACTION = 0.1
CIFAR10_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST_FILE = "test_batch"
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
PHOTOS_DEFAULT_SIZE = 64
PHOTOS_TRAIN_PIXELS = 2048 * 64 * 64     # train crops per photograph: this many pixels (2048 at 64x64), at least 64
PHOTOS_TEST_CROPS = 128                  # test crops per photograph


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


# ----------------------------------------------------------------------------------------------- helpers

def _split_indices(n: int, test_fraction: float) -> Tuple[np.ndarray, np.ndarray]:
    """Fixed permutation (seed SPLIT_SEED): the last `test_fraction` of it is the test set."""
    order = np.random.default_rng(SPLIT_SEED).permutation(n)
    n_test = max(1, int(round(n * test_fraction))) if n > 1 else 0
    return np.sort(order[: n - n_test]), np.sort(order[n - n_test:])


def _split_tensors(name: str, images: torch.Tensor, labels: Optional[torch.Tensor], test_fraction: float,
                   class_names: Sequence[str] = ()) -> ImageData:
    if images.shape[0] < 2:
        raise DataError(f"{name}: need at least 2 images to make a train/test split; got {images.shape[0]}")
    train_idx, test_idx = _split_indices(images.shape[0], test_fraction)
    pick = (lambda t, i: None if t is None else t[torch.from_numpy(i)])
    return _make_data(name, TensorImageDataset(pick(images, train_idx), pick(labels, train_idx)),
                      TensorImageDataset(pick(images, test_idx), pick(labels, test_idx)),
                      tuple(images.shape[1:]), labels, class_names)


def _make_data(name: str, train: Dataset, test: Dataset, image_shape, labels, class_names=()) -> ImageData:
    num_classes = 0
    if labels is not None and len(labels):
        labels = torch.as_tensor(labels)
        if int(labels.min()) < 0:
            raise DataError(f"{name}: labels must be >= 0; found {int(labels.min())}")
        num_classes = int(labels.max()) + 1
    names = list(class_names) if class_names else [str(i) for i in range(num_classes)]
    return ImageData(name, train, test, tuple(int(s) for s in image_shape), num_classes, names)


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


def _labels_array(array: np.ndarray, n: int, where: str) -> torch.Tensor:
    array = np.asarray(array).reshape(-1)
    if array.shape[0] != n:
        raise DataError(f"{where}: {array.shape[0]} labels for {n} images")
    if not np.issubdtype(array.dtype, np.integer):
        raise DataError(f"{where}: labels must be integers; got dtype {array.dtype}")
    return torch.from_numpy(array.astype(np.int64))


def _check_image_size(name: str, image_size: Optional[int], shape: Tuple[int, int, int]) -> None:
    if image_size is not None and (shape[1], shape[2]) != (image_size, image_size):
        raise DataError(f"{name} images are {shape[1]}x{shape[2]}; --image-size {image_size} only applies to "
                        f"--data folder (resize the images yourself for other data sets)")


# ----------------------------------------------------------------------------------------------- sources

def load_digits() -> ImageData:
    """scikit-learn's 8x8 digits as uint8 [N, 1, 8, 8] (round(v * 255 / 16)), labels 0..9, fixed 80/20 split."""
    grey, target = _digits_file() or _sklearn_digits()
    images = np.round(grey.astype(np.float64) * 255.0 / 16.0).clip(0, 255).astype(np.uint8)
    images = torch.from_numpy(images[:, None])
    labels = torch.from_numpy(target.astype(np.int64))
    return _split_tensors("digits", images, labels, DIGITS_TEST_FRACTION)


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


PHOTO_NAMES = ("china", "flower")   # sklearn/datasets/images/<name>.jpg, in load_sample_images' (sorted) order


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


def _read_cifar_batch(path: Path) -> Tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as handle:
            batch = pickle.load(handle, encoding="bytes")
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
    train_y = _labels_array(np.concatenate([p[1] for p in parts]), train_x.shape[0], str(folder))
    test_x, test_y = _read_cifar_batch(folder / CIFAR10_TEST_FILE)
    test_y = _labels_array(test_y, test_x.shape[0], str(folder / CIFAR10_TEST_FILE))
    return _make_data("cifar10", TensorImageDataset(train_x, train_y),
                      TensorImageDataset(torch.from_numpy(test_x), test_y),
                      (3, 32, 32), torch.cat([train_y, test_y]), CIFAR10_CLASSES)


def _image_files(folder: Path) -> List[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _labelled_files(folder: Path, classes: Optional[List[str]]) -> Tuple[List[Path], Optional[List[int]], List[str]]:
    """Files under `folder`; labels from its immediate subfolders when every image lies in one."""
    files = _image_files(folder)
    if classes is None:
        direct = [p for p in files if p.parent == folder]
        subdirs = sorted({p.relative_to(folder).parts[0] for p in files if p.parent != folder})
        classes = subdirs if subdirs and not direct else []
    if not classes:
        return files, None, []
    index = {name: i for i, name in enumerate(classes)}
    labels = []
    for p in files:
        name = p.relative_to(folder).parts[0] if p.parent != folder else None
        if name not in index:
            raise DataError(f"{p}: not in one of the class subfolders {classes} of {folder}")
        labels.append(index[name])
    return files, labels, classes


def _decode_mode(path: Path) -> Tuple[Optional[str], str]:
    """(PIL mode, "") when the whole file decodes, else (None, why)."""
    from PIL import Image

    try:
        with Image.open(path) as picture:
            picture.load()     # decodes every pixel: a truncated or damaged file fails here, not mid-run
            return picture.mode, ""
    except Exception as exc:  # PIL raises UnidentifiedImageError, OSError, SyntaxError... for bad files
        return None, f"{type(exc).__name__}: {exc}"


def _check_image_files(files: Sequence[Path], skip_bad: bool) -> Tuple[set, int]:
    """Decode every file once (threads: Pillow's decoders release the GIL). Returns (unreadable files, channels:
    1 when every readable file is grey, else 3). Without `skip_bad` the first unreadable file is a DataError."""
    workers = min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(pool.map(_decode_mode, files, chunksize=64))
    bad = [(path, why) for path, (mode, why) in zip(files, results) if mode is None]
    if bad and not skip_bad:
        path, why = bad[0]
        more = f" ({len(bad)} of {len(files)} files are unreadable)" if len(bad) > 1 else ""
        raise DataError(f"{path}: not a readable image ({why}){more}; fix or remove it, or pass --skip-bad-images "
                        f"to train without the unreadable files")
    grey = all(is_grey_mode(mode) for mode, _ in results if mode is not None)
    return {path for path, _ in bad}, 1 if grey else 3


def _drop(files: List[Path], labels: Optional[List[int]], bad: set) -> Tuple[List[Path], Optional[List[int]]]:
    keep = [i for i, p in enumerate(files) if p not in bad]
    return [files[i] for i in keep], None if labels is None else [labels[i] for i in keep]


def load_image_folder(root: Optional[str], image_size: Optional[int], skip_bad_images: bool = False) -> ImageData:
    """PNG/JPEG files under `root` (recursive), resized and centre-cropped to image_size x image_size.

    Labels come from class subfolders (root/CLASS/...) when every image lies in one. With root/train and
    root/test present those are the split; otherwise a fixed 10% of the files is the test set. Images are
    grey (C=1) when every file is grey, else RGB. Every file is decoded here once: an unreadable one is a
    DataError naming it, or, with skip_bad_images, is left out (listed in ImageData.skipped).
    """
    if root is None:
        raise DataError("--data folder needs --data-root: a folder of PNG/JPEG images (class subfolders optional)")
    folder = Path(root)
    if not folder.is_dir():
        raise DataError(f"{folder}: no such folder; --data folder expects a folder of PNG/JPEG images")
    if image_size is None or image_size < 1:
        raise DataError(f"--data folder needs --image-size (a positive int); got {image_size}")
    size = (image_size, image_size)
    if (folder / "train").is_dir() and (folder / "test").is_dir():
        train_files, train_labels, classes = _labelled_files(folder / "train", None)
        test_files, test_labels, _ = _labelled_files(folder / "test", classes or [])
        if classes and test_labels is None:
            raise DataError(f"{folder / 'test'}: expected the class subfolders {classes} of {folder / 'train'}")
        for part, files in (("train", train_files), ("test", test_files)):
            if not files:
                raise DataError(f"{folder / part}: no PNG/JPEG images found (looked for {IMAGE_SUFFIXES})")
    else:
        files, labels, classes = _labelled_files(folder, None)
        if len(files) < 2:
            raise DataError(f"{folder}: found {len(files)} PNG/JPEG image(s); need at least 2 "
                            f"(looked recursively for {IMAGE_SUFFIXES})")
        train_idx, test_idx = _split_indices(len(files), DEFAULT_TEST_FRACTION)
        train_files, test_files = [files[i] for i in train_idx], [files[i] for i in test_idx]
        train_labels = None if labels is None else [labels[i] for i in train_idx]
        test_labels = None if labels is None else [labels[i] for i in test_idx]
    bad, channels = _check_image_files(train_files + test_files, skip_bad_images)
    if bad:
        train_files, train_labels = _drop(train_files, train_labels, bad)
        test_files, test_labels = _drop(test_files, test_labels, bad)
        for part, kept in (("train", train_files), ("test", test_files)):
            if not kept:
                raise DataError(f"{folder}: no readable images left in the {part} split after skipping "
                                f"{len(bad)} unreadable file(s)")
    all_labels = None if train_labels is None else torch.tensor(train_labels + (test_labels or []))
    data = _make_data("folder", ImageFileDataset(train_files, train_labels, size, channels),
                      ImageFileDataset(test_files, test_labels, size, channels),
                      (channels, image_size, image_size), all_labels, classes)
    if classes:
        data.num_classes = len(classes)
    data.skipped = sorted(str(p) for p in bad)
    return data


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
            train_y = _labels_array(_member(archive, "y_train", path), train_x.shape[0], f"{path}[y_train]") if has_y else None
            test_y = _labels_array(_member(archive, "y_test", path), test_x.shape[0], f"{path}[y_test]") if has_y else None
            labels = torch.cat([train_y, test_y]) if has_y else None
            if train_x.shape[0] == 0 or test_x.shape[0] == 0:
                raise DataError(f"{path}: x_train and x_test must both hold at least one image")
            return _make_data("npz", TensorImageDataset(torch.from_numpy(train_x), train_y),
                              TensorImageDataset(torch.from_numpy(test_x), test_y), train_x.shape[1:], labels)
        image_key = _first_key(archive, ("images", "x"))
        if image_key is None:
            raise DataError(f"{path}: expected arrays x_train and x_test, or images or x; found {archive.files}")
        images = _to_nchw(_member(archive, image_key, path), f"{path}[{image_key}]")
        label_key = _first_key(archive, ("labels", "y"))
        labels = _labels_array(_member(archive, label_key, path), images.shape[0], f"{path}[{label_key}]") if label_key else None
    return _split_tensors("npz", torch.from_numpy(images), labels, DEFAULT_TEST_FRACTION)


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
    return _make_data("photos", TensorImageDataset(torch.from_numpy(np.concatenate(train)), torch.tensor(train_labels)),
                      TensorImageDataset(torch.from_numpy(np.concatenate(test)), torch.tensor(test_labels)),
                      (3, size, size), labels, PHOTO_NAMES)


def load_dataset(name: str, root: Optional[str] = None, image_size: Optional[int] = None,
                 skip_bad_images: bool = False) -> ImageData:
    """Load one of DATASETS from local files (see the module docstring)."""
    if name not in READERS:
        raise DataError(f"unknown data set {name!r}; choose one of {DATASETS}")
    return READERS[name](root, image_size, skip_bad_images)


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

