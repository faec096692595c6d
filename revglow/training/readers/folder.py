"""PNG/JPEG files under a folder, searched recursively: class subfolders give labels; `root/train` and `root/test`
give the split when both exist, else a fixed 10% test split. Every file is decoded once when the data set is
loaded, so an unreadable one stops before training, naming its path (or is left out, and counted, with
skip_bad_images=True).

Example:
    >>> data = load_image_folder("data/faces", image_size=64)     # doctest: +SKIP
    >>> data.image_shape                                          # doctest: +SKIP
    (3, 64, 64)
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import torch

from revglow.training.datasets import (DEFAULT_TEST_FRACTION, DataError, ImageData, ImageFileDataset, make_image_data,
                                       split_indices)
from revglow.training.images import IMAGE_SUFFIXES, is_grey_mode

__all__ = ["load_image_folder"]


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
        train_idx, test_idx = split_indices(len(files), DEFAULT_TEST_FRACTION)
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
    data = make_image_data("folder", ImageFileDataset(train_files, train_labels, size, channels),
                           ImageFileDataset(test_files, test_labels, size, channels),
                           (channels, image_size, image_size), all_labels, classes)
    if classes:
        data.num_classes = len(classes)
    data.skipped = sorted(str(p) for p in bad)
    return data
