"""Data sets (in their real on-disk formats, written here), resumable order, images, and the baseline."""
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from revglow.training.baseline import PixelCategoricalBaseline, reduce_bits
from revglow.training.data import load_dataset
from revglow.training.datasets import DataError, stack_images
from revglow.training.loaders import DataPosition, EpochBatchSampler, make_train_loader
from revglow.training.images import load_image, make_grid, save_grid, save_image

from data_writers import write_cifar10, write_image_folder, write_npz


# ------------------------------------------------------------------------------------------- data sets

def test_digits_fixed_split_and_scaling():
    data = load_dataset("digits")
    assert data.image_shape == (1, 8, 8) and data.num_classes == 10
    assert len(data.train) + len(data.test) == 1797
    image, label = data.train[0]
    assert image.dtype == torch.uint8 and image.shape == (1, 8, 8) and 0 <= label < 10
    values = torch.unique(data.train.images)
    assert set(values.tolist()) <= {round(v * 255 / 16) for v in range(17)} and int(values.max()) == 255
    again = load_dataset("digits")
    assert torch.equal(again.test.images, data.test.images)


def test_digits_read_from_the_file_are_scikit_learns(monkeypatch):
    """load_digits reads scikit-learn's digits file itself (importing scikit-learn takes most of a second of
    every `revglow train --data digits` start): the same images and labels as sklearn's load_digits, and the
    same data set when it falls back to sklearn (no such file, or not in the expected format)."""
    import revglow.training.readers.scikit_learn as data_module
    from sklearn.datasets import load_digits as sklearn_digits

    grey, target = data_module._digits_file()
    bunch = sklearn_digits()
    assert np.array_equal(grey, bunch.images) and np.array_equal(target, bunch.target)
    direct = load_dataset("digits")
    monkeypatch.setattr(data_module, "_digits_file", lambda: None)
    through_sklearn = load_dataset("digits")
    for split in ("train", "test"):
        a, b = getattr(direct, split), getattr(through_sklearn, split)
        assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)


def test_photos_read_from_the_files_are_scikit_learns(monkeypatch):
    """load_photos decodes scikit-learn's two sample photographs itself (importing scikit-learn, with scipy, takes
    most of two seconds of every `revglow train --data photos` start): the same pixels as sklearn's
    load_sample_images, and the same data set when it falls back to sklearn (files missing or not RGB)."""
    import revglow.training.readers.scikit_learn as data_module
    from sklearn.datasets import load_sample_images

    direct_photos = data_module._photo_files()
    assert len(direct_photos) == 2
    for mine, theirs in zip(direct_photos, load_sample_images().images):
        assert mine.dtype == theirs.dtype and np.array_equal(mine, theirs)
    direct = load_dataset("photos", image_size=8)
    monkeypatch.setattr(data_module, "_photo_files", lambda: None)
    through_sklearn = load_dataset("photos", image_size=8)
    for split in ("train", "test"):
        a, b = getattr(direct, split), getattr(through_sklearn, split)
        assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    monkeypatch.setattr(data_module, "PHOTO_NAMES", ("china", "no-such-photo"))
    assert data_module._photo_files() is None


def test_cifar10_format(tmp_path):
    write_cifar10(tmp_path / "cifar")
    data = load_dataset("cifar10", str(tmp_path / "cifar"))
    assert data.image_shape == (3, 32, 32) and len(data.train) == 30 and len(data.test) == 6
    with open(tmp_path / "cifar" / "data_batch_1", "rb") as handle:
        raw = pickle.load(handle, encoding="bytes")
    assert torch.equal(data.train[0][0].flatten(), torch.from_numpy(raw[b"data"][0]))
    assert data.train[0][1] == raw[b"labels"][0]


def test_cifar10_missing_files_named(tmp_path):
    write_cifar10(tmp_path / "cifar")
    (tmp_path / "cifar" / "data_batch_3").unlink()
    with pytest.raises(DataError, match=r"cifar.*data_batch_3"):
        load_dataset("cifar10", str(tmp_path / "cifar"))
    (tmp_path / "cifar" / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(DataError, match="data_batch_3.*not a CIFAR-10 python batch"):
        load_dataset("cifar10", str(tmp_path / "cifar"))
    with pytest.raises(DataError, match="needs --data-root"):
        load_dataset("cifar10", None)


def test_image_folder_with_classes(tmp_path):
    write_image_folder(tmp_path / "pics")
    data = load_dataset("folder", str(tmp_path / "pics"), image_size=8)
    assert data.image_shape == (3, 8, 8) and data.num_classes == 2 and data.class_names == ["cat", "dog"]
    assert len(data.train) + len(data.test) == 10 and len(data.test) == 1
    image, label = data.train[0]
    assert image.shape == (3, 8, 8) and image.dtype == torch.uint8 and label in (0, 1)


def test_image_folder_grey_and_train_test_subfolders(tmp_path):
    write_image_folder(tmp_path / "pics" / "train", classes=("a",), per_class=4, mode="L")
    write_image_folder(tmp_path / "pics" / "test", classes=("a",), per_class=2, mode="L", seed=1)
    data = load_dataset("folder", str(tmp_path / "pics"), image_size=4)
    assert data.image_shape == (1, 4, 4) and len(data.train) == 4 and len(data.test) == 2


def test_image_folder_errors(tmp_path):
    with pytest.raises(DataError, match="no such folder"):
        load_dataset("folder", str(tmp_path / "nope"), image_size=8)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="found 0 PNG/JPEG"):
        load_dataset("folder", str(tmp_path / "empty"), image_size=8)
    write_image_folder(tmp_path / "pics")
    with pytest.raises(DataError, match="--image-size"):
        load_dataset("folder", str(tmp_path / "pics"), image_size=None)


@pytest.mark.parametrize("layout,channels", [("nhwc", 1), ("nchw", 3), ("nhwc", 3)])
def test_npz_layouts(tmp_path, layout, channels):
    write_npz(tmp_path / "d.npz", layout=layout, channels=channels)
    data = load_dataset("npz", str(tmp_path / "d.npz"))
    assert data.image_shape == (channels, 8, 8) and len(data.train) == 18 and len(data.test) == 2
    assert data.num_classes >= 1


def test_npz_train_test_keys_and_errors(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "split.npz", x_train=rng.integers(0, 256, (5, 8, 8), dtype=np.uint8),
             x_test=rng.integers(0, 256, (3, 8, 8), dtype=np.uint8))
    data = load_dataset("npz", str(tmp_path / "split.npz"))
    assert (len(data.train), len(data.test), data.num_classes) == (5, 3, 0) and data.train[0][1] == -1
    np.savez(tmp_path / "bad.npz", pixels=np.zeros((4, 8, 8), np.uint8))
    with pytest.raises(DataError, match="expected arrays x_train and x_test, or images or x"):
        load_dataset("npz", str(tmp_path / "bad.npz"))
    np.savez(tmp_path / "float.npz", images=np.zeros((4, 8, 8, 1), np.float32))
    with pytest.raises(DataError, match="uint8"):
        load_dataset("npz", str(tmp_path / "float.npz"))
    np.savez(tmp_path / "shape.npz", images=np.zeros((4, 8, 8, 5), np.uint8))
    with pytest.raises(DataError, match="channel axis"):
        load_dataset("npz", str(tmp_path / "shape.npz"))
    (tmp_path / "junk.npz").write_bytes(b"junk")
    with pytest.raises(DataError, match="junk.npz: not a readable .npz"):
        load_dataset("npz", str(tmp_path / "junk.npz"))
    with pytest.raises(DataError, match="image-size"):
        load_dataset("digits", image_size=16)
    with pytest.raises(DataError, match="unknown data set"):
        load_dataset("mnist")


# ---------------------------------------------------------------------------------------------- order

def test_sampler_order_depends_on_seed_and_epoch_and_resumes():
    sampler = EpochBatchSampler(10, 3, seed=1)
    sampler.set_position(DataPosition(0, 0))
    full = list(sampler)
    assert len(full) == 3 and all(len(b) == 3 for b in full)
    sampler.set_position(DataPosition(0, 3))
    assert list(sampler) == full[1:]
    sampler.set_position(DataPosition(1, 0))
    assert list(sampler) != full
    other = EpochBatchSampler(10, 3, seed=2)
    assert list(other) != full
    small = EpochBatchSampler(2, 8, seed=0)
    assert [sorted(b) for b in small] == [[0, 1]]


def test_loader_does_not_touch_global_rng():
    data = load_dataset("digits")
    loader, sampler = make_train_loader(data.train, 16, seed=0)
    torch.manual_seed(5)
    before = torch.get_rng_state()
    next(iter(loader))
    assert torch.equal(before, torch.get_rng_state())


# --------------------------------------------------------------------------------------------- images

def test_grid_and_image_round_trip(tmp_path):
    images = torch.randint(0, 256, (5, 3, 6, 7), dtype=torch.uint8)
    grid = make_grid(images, nrow=2, padding=1)
    assert grid.shape == (3, 1 + 3 * 7, 1 + 2 * 8)
    assert torch.equal(grid[:, 1:7, 1:8], images[0])
    path = save_image(images[1], tmp_path / "one.png")
    assert torch.equal(load_image(path), images[1])
    grey = save_image(images[2, :1], tmp_path / "grey.png", scale=2)
    loaded = load_image(grey)
    assert loaded.shape == (1, 12, 14) and torch.equal(loaded[:, ::2, ::2], images[2, :1])
    assert load_image(path, size=(4, 4), channels=1).shape == (1, 4, 4)
    out = save_grid(torch.rand(4, 1, 8, 8), tmp_path / "sub" / "grid.png")
    assert Image.open(out).size[0] >= 256
    with pytest.raises(ValueError, match="unsupported image file type"):
        save_image(images[0], tmp_path / "x.gif")
    (tmp_path / "bad.png").write_bytes(b"nope")
    with pytest.raises(ValueError, match="bad.png: not a readable image"):
        load_image(tmp_path / "bad.png")
    with pytest.raises(FileNotFoundError, match="missing.png"):
        load_image(tmp_path / "missing.png")


# ------------------------------------------------------------------------------------------- baseline

def test_baseline_matches_direct_count():
    images = torch.tensor([[[[0, 255]]], [[[0, 128]]], [[[8, 255]]]], dtype=torch.uint8)   # [3, 1, 1, 2]
    baseline = PixelCategoricalBaseline.fit(images, n_bits=1)
    # pixel 0 levels: 0, 0, 0 -> p(0) = 4/5 ; pixel 1 levels: 1, 1, 1 -> p(1) = 4/5
    expected = -np.log2(4 / 5)
    assert torch.allclose(baseline.bits_per_dim(images), torch.full((3,), expected, dtype=torch.float64))
    assert reduce_bits(images, 5).max() == 31


def test_baseline_on_digits_is_below_uniform():
    data = load_dataset("digits")
    train, _ = stack_images(data.train)
    test, _ = stack_images(data.test)
    baseline = PixelCategoricalBaseline.fit(train, n_bits=8)
    bpd = baseline.bits_per_dim(test).mean().item()
    assert 1.0 < bpd < 8.0


# ------------------------------------------------------------------------------ data checked up front

def test_corrupt_image_in_a_folder_is_found_when_loading(tmp_path):
    root = write_image_folder(tmp_path / "pics", per_class=5)
    good = (root / "cat" / "img0.png").read_bytes()
    bad = root / "cat" / "img3.png"
    bad.write_bytes(good[: len(good) // 2])                  # the header reads; the pixel data is cut short
    with pytest.raises(DataError, match=rf"{bad}: not a readable image .*--skip-bad-images"):
        load_dataset("folder", str(root), image_size=8)
    data = load_dataset("folder", str(root), image_size=8, skip_bad_images=True)
    assert data.skipped == [str(bad)] and len(data.train) + len(data.test) == 9
    for dataset in (data.train, data.test):
        assert all(item[0].shape == (3, 8, 8) for item in dataset)     # every kept file decodes


def test_16_bit_images_scale_by_65535(tmp_path):
    dark = np.full((4, 4), 200, dtype=np.uint16)              # 200 / 65535: nearly black, not 200 / 255
    dark[0, 0] = 65535
    Image.fromarray(dark).save(tmp_path / "dark16.png")
    with Image.open(tmp_path / "dark16.png") as picture:
        assert picture.mode.startswith("I")
    image = load_image(tmp_path / "dark16.png")
    assert image.shape == (1, 4, 4) and int(image[0, 0, 0]) == 255 and int(image[0, 1, 1]) == 1
    Image.fromarray(np.full((4, 4), 200, dtype=np.uint16)).save(tmp_path / "darker16.png")
    assert int(load_image(tmp_path / "darker16.png").max()) == 1


def test_corrupt_npz_member_is_one_data_error(tmp_path):
    path = write_npz(tmp_path / "d.npz", n=40)
    data = bytearray(path.read_bytes())
    middle = len(data) // 3
    data[middle:middle + 64] = bytes(64)                      # inside the images array: its CRC no longer matches
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"d\.npz\[images\]: the array is corrupt or unreadable \(BadZipFile"):
        load_dataset("npz", str(path))


def test_distributed_sampler_shares_each_global_batch_and_reshuffles():
    samplers = [EpochBatchSampler(20, 3, seed=1, rank=r, world_size=2) for r in range(2)]
    assert samplers[0].global_batch_size == 6 and samplers[0].batches_per_epoch == 3
    single = EpochBatchSampler(20, 6, seed=1)
    for epoch in (0, 1):
        for sampler in samplers + [single]:
            sampler.set_position(DataPosition(epoch, 6))
        joined = [a + b for a, b in zip(*[list(s) for s in samplers])]
        assert joined == list(single) and len(joined) == 2
    samplers[0].set_position(DataPosition(0, 0))
    first = list(samplers[0])
    samplers[0].set_position(DataPosition(1, 0))
    assert list(samplers[0]) != first


def _find(photo: np.ndarray, crop: np.ndarray):
    """Every (top, left) where crop [3, s, s] occurs in photo [H, W, 3], by brute force: each position whose pixel
    equals the crop's top-left one, then the whole crop compared there."""
    s = crop.shape[1]
    crop = crop.transpose(1, 2, 0)
    corners = np.argwhere((photo[:photo.shape[0] - s + 1, :photo.shape[1] - s + 1] == crop[0, 0]).all(axis=2))
    return [(top, left) for top, left in corners if np.array_equal(photo[top:top + s, left:left + s], crop)]


def test_photos_crops_come_from_disjoint_train_and_test_regions():
    """Each crop is found in its photograph by brute force: train crops lie left of the test strip (the right
    quarter), test crops inside it; the crops are the same on every load; labels name the photograph."""
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images
    data = load_dataset("photos", image_size=16)
    assert data.image_shape == (3, 16, 16) and data.num_classes == 2 and data.class_names == ["china", "flower"]
    assert torch.equal(data.train.images, load_dataset("photos", image_size=16).train.images)
    width, strip = photos[0].shape[1], photos[0].shape[1] // 4
    for dataset, inside in ((data.train, lambda left: left + 16 <= width - strip),
                            (data.test, lambda left: left >= width - strip)):
        labels = dataset.labels
        for label in (0, 1):
            rows = torch.nonzero(labels == label).flatten()
            for i in rows[:: max(1, len(rows) // 4)][:4].tolist():
                found = _find(photos[label], dataset.images[i].numpy())
                assert found and all(inside(left) for _, left in found), (label, i, found)


def test_photos_default_size_and_bad_sizes():
    data = load_dataset("photos")
    assert data.image_shape == (3, 64, 64) and len(data.train) == 2 * 2048 and len(data.test) == 2 * 128
    with pytest.raises(DataError, match="between 2 and 320"):
        load_dataset("photos", image_size=400)
