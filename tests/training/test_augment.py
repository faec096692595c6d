"""revglow.training.augment: random shifts keep shape and dtype, stay within 10%, repeat the edge, follow the generator."""
import pytest
import torch

from revglow.training.augment import draw_shifts, random_shift, shift_images
from revglow.errors import ConfigError


def _images(n=6, c=3, h=20, w=30, seed=0):
    return torch.randint(0, 256, (n, c, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_shape_and_dtype_kept_and_input_untouched():
    images = _images()
    before = images.clone()
    out = random_shift(images, torch.Generator().manual_seed(1))
    assert out.shape == images.shape and out.dtype == torch.uint8
    assert torch.equal(images, before)


def test_shifts_are_bounded_by_ten_percent_and_reach_it():
    shifts = draw_shifts(4000, 20, 30, torch.Generator().manual_seed(0))
    assert shifts[:, 0].abs().max() == 2 and shifts[:, 1].abs().max() == 3      # 10% of 20 and of 30
    assert set(shifts[:, 1].tolist()) == {-3, -2, -1, 0, 1, 2, 3}


def test_each_image_is_its_own_translation_with_edges_repeated():
    """Brute force: every output pixel is the input pixel dy rows up and dx columns left, clamped to the image."""
    images = _images(n=3, c=2, h=9, w=11)
    shifts = torch.tensor([[2, -1], [0, 0], [-1, 3]])
    out = shift_images(images, shifts)
    for i, (dy, dx) in enumerate(shifts.tolist()):
        for r in range(9):
            for c in range(11):
                source = images[i, :, min(max(r - dy, 0), 8), min(max(c - dx, 0), 10)]
                assert torch.equal(out[i, :, r, c], source)


def test_same_generator_state_same_shifts():
    images = _images()
    generator = torch.Generator().manual_seed(5)
    state = generator.get_state()
    first = random_shift(images, generator)
    second = random_shift(images, generator)
    generator.set_state(state)
    assert torch.equal(random_shift(images, generator), first)
    assert not torch.equal(first, second), "the generator moves on"


def test_zero_fraction_is_the_identity():
    images = _images(n=2, h=8, w=8)
    assert torch.equal(random_shift(images, torch.Generator().manual_seed(0), fraction=0.0), images)


def test_batch_of_one_and_images_too_small_to_move():
    images = _images(n=1, c=1, h=4, w=4)          # 10% of 4 pixels is 0.4: every shift rounds to 0
    assert torch.equal(random_shift(images, torch.Generator().manual_seed(0)), images)


@pytest.mark.parametrize("images, generator, fraction, error, match", [
    (torch.zeros(2, 1, 4, 4), torch.Generator(), 0.1, ConfigError, "uint8"),
    (torch.zeros(1, 4, 4, dtype=torch.uint8), torch.Generator(), 0.1, ConfigError, r"\[N, C, H, W\]"),
    ([[1]], torch.Generator(), 0.1, TypeError, "tensor"),
    (torch.zeros(1, 1, 4, 4, dtype=torch.uint8), 0, 0.1, TypeError, "Generator"),
    (torch.zeros(1, 1, 4, 4, dtype=torch.uint8), torch.Generator(), 1.5, ConfigError, "fraction"),
])
def test_bad_input_is_named(images, generator, fraction, error, match):
    with pytest.raises(error, match=match):
        random_shift(images, generator, fraction)
