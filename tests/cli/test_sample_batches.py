"""Sampling in batches (revglow.glow.latents.sample_in_batches, what `revglow sample` runs): the same images for a seed
whatever the batch size, decode calls of at most the batch size, and a peak of memory that does not grow with the
number of images."""
import pytest
import torch

from revglow import Glow, GlowConfig
from revglow.cli import main
from revglow.glow.latents import default_sample_batch, sample_in_batches
from revglow.memory.live_storage import LiveStorageTracker
from revglow.training.checkpoints import save_checkpoint


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    glow = Glow(GlowConfig(image_shape=(1, 8, 8), levels=2, depth=2, hidden=16, n_bits=5, num_classes=3)).double()
    x = torch.randint(0, 256, (16, 1, 8, 8), dtype=torch.uint8)
    glow.initialize(x, torch.arange(16) % 3)
    with torch.no_grad():                               # off the zero initialization: the labels then matter
        for p in glow.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return glow.eval()


def _all(model, n, batch_size, **options):
    images, finite = zip(*sample_in_batches(model, n, batch_size, **options))
    return torch.cat(images), torch.cat(finite)


def test_the_images_of_a_seed_do_not_depend_on_the_batch_size(model):
    """Each image's latents are its own rows of the seeded stream (drawn 16 images at a time), so every batch size
    gives the same images; float64, so that convolutions at other batch sizes cannot move a value across a bin."""
    reference, finite = _all(model, 21, 21, temperature=0.7, seed=5)
    assert finite.all() and reference.shape == (21, 1, 8, 8)
    for batch_size in (1, 4, 16, 17, 64):
        assert torch.equal(_all(model, 21, batch_size, temperature=0.7, seed=5)[0], reference), batch_size
    assert torch.equal(_all(model, 10, 3, temperature=0.7, seed=5)[0], reference[:10])     # and the first of more
    assert not torch.equal(_all(model, 21, 21, temperature=0.7, seed=6)[0], reference)
    labelled, _ = _all(model, 21, 4, temperature=0.7, seed=5, label=2)    # a class-conditional model: one class
    assert not torch.equal(labelled, reference)                           # (classes cycle without a label)


def test_decode_sees_batches_of_at_most_the_batch_size(model, monkeypatch):
    sizes = []
    real_decode = Glow.decode

    def decode(self, latents, y=None, context=None):
        sizes.append((latents[0].shape[0], y.tolist()))
        return real_decode(self, latents, y, context)

    monkeypatch.setattr(Glow, "decode", decode)
    _all(model, 10, 4)
    assert sizes == [(4, [0, 1, 2, 0]), (4, [1, 2, 0, 1]), (2, [2, 0])]


def _peak_of_sampling(model, n, batch_size):
    with LiveStorageTracker() as tracker:
        for images, finite in sample_in_batches(model, n, batch_size):
            del images, finite                          # what the caller keeps is its own affair
    return tracker.peak


def test_the_peak_of_sampling_does_not_grow_with_the_number_of_images(model):
    """Counted tensor by tensor (exact): 16 images in batches of 16, 256 of them, and 256 in one batch."""
    one_batch, many = _peak_of_sampling(model, 16, 16), _peak_of_sampling(model, 256, 16)
    assert many <= 1.1 * one_batch, (many, one_batch)       # one batch's temporaries, and 16 rows of latents
    assert _peak_of_sampling(model, 256, 256) > 8 * many     # what one batch of all of them costs


def test_default_batch_keeps_a_bounded_number_of_activations():
    assert default_sample_batch(GlowConfig()) == 128                  # 512 channels at 16x16: 2**24 / 2**17
    assert default_sample_batch(GlowConfig(image_shape=(1, 8, 8), levels=2, hidden=64)) == 2 ** 14
    assert default_sample_batch(GlowConfig(image_shape=(3, 256, 256), levels=6, hidden=512)) == 2   # 128x128


def test_revglow_sample_writes_the_same_grid_whatever_the_batch_size(model, tmp_path):
    checkpoint = tmp_path / "checkpoint.pt"
    glow = model.float()
    try:
        save_checkpoint({"model": glow.state_dict(), "glow_config": glow.config.to_dict(), "step": 0}, checkpoint)
    finally:
        model.double()
    grids = []
    for batch_size in ("5", "12"):
        grid = tmp_path / f"grid{batch_size}.png"
        assert main(["sample", "--checkpoint", str(checkpoint), "--n", "12", "--batch-size", batch_size, "--seed",
                     "3", "--out", str(grid)]) == 0
        grids.append(grid.read_bytes())
    assert grids[0] == grids[1]
