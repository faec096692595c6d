"""Data sets in their real on-disk formats, written for the tests: a miniature CIFAR-10 (pickled python batches), an
image folder with class subfolders, an .npz archive."""
import pickle

import numpy as np
from PIL import Image


def write_cifar10(folder, per_batch=6, seed=0):
    """A miniature CIFAR-10 in the real python-batch format: pickled dicts with b'data' and b'labels'."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
                 b"labels": [int(v) for v in rng.integers(0, 10, per_batch)],
                 b"batch_label": name.encode()}
        with open(folder / name, "wb") as handle:
            pickle.dump(batch, handle)
    return folder


def write_image_folder(folder, classes=("cat", "dog"), per_class=5, size=(10, 12), mode="RGB", seed=0):
    """PNG files in class subfolders (JPEG for every third file)."""
    rng = np.random.default_rng(seed)
    for name in classes:
        (folder / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            channels = 3 if mode == "RGB" else 1
            array = rng.integers(0, 256, (size[0], size[1], channels), dtype=np.uint8)
            picture = Image.fromarray(array if channels == 3 else array[:, :, 0], mode=mode)
            picture.save(folder / name / f"img{i}.{'jpg' if i % 3 == 2 else 'png'}")
    return folder


def write_npz(path, n=20, layout="nhwc", channels=1, size=8, labels=True, seed=0):
    rng = np.random.default_rng(seed)
    shape = (n, size, size, channels) if layout == "nhwc" else (n, channels, size, size)
    arrays = {"images": rng.integers(0, 256, shape, dtype=np.uint8)}
    if labels:
        arrays["labels"] = rng.integers(0, 3, n)
    np.savez(path, **arrays)
    return path
