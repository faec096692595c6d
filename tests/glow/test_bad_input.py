"""Bad input gets a clear ValueError/TypeError that names the problem."""
import pytest
import torch

from revglow import Glow, GlowConfig


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(image_shape=(3, 30, 32), levels=2), ValueError, "divisible by 2\\*\\*levels"),
    (dict(image_shape=(3, 32, 32), levels=6), ValueError, "divisible by 2\\*\\*levels"),
    (dict(image_shape=(0, 8, 8)), ValueError, "channel count"),
    (dict(image_shape=(3, 8)), ValueError, "image_shape"),
    (dict(image_shape=(3, 8.0, 8)), TypeError, "image_shape"),
    (dict(coupling="spline"), ValueError, "coupling"),
    (dict(permutation="random"), ValueError, "permutation"),
    (dict(memory="fast"), ValueError, "memory"),
    (dict(kernels="cuda"), ValueError, "kernels"),
    (dict(n_bits=9), ValueError, "n_bits"),
    (dict(depth=0), ValueError, "depth"),
    (dict(hidden=3.5), TypeError, "hidden"),
    (dict(num_classes=-1), ValueError, "num_classes"),
    (dict(learn_top="yes"), TypeError, "learn_top"),
    (dict(check_reconstruction="maybe"), ValueError, "check_reconstruction"),
])
def test_bad_config(kwargs, error, match):
    base = dict(image_shape=(1, 8, 8), levels=2, depth=1, hidden=4)
    with pytest.raises(error, match=match):
        GlowConfig(**{**base, **kwargs})


def test_unknown_config_key_in_from_dict():
    with pytest.raises(ValueError, match="unknown option"):
        GlowConfig.from_dict({"image_shape": [1, 8, 8], "widht": 3})
    with pytest.raises(TypeError):
        Glow({"image_shape": (1, 8, 8)})


@pytest.fixture
def model():
    torch.manual_seed(0)
    return Glow(GlowConfig(image_shape=(1, 8, 8), levels=2, depth=1, hidden=4))


@pytest.fixture
def conditional():
    torch.manual_seed(0)
    return Glow(GlowConfig(image_shape=(1, 8, 8), levels=2, depth=1, hidden=4, num_classes=3))


@pytest.mark.parametrize("x,error,match", [
    (torch.rand(1, 8, 8), ValueError, "4-D"),
    (torch.rand(0, 1, 8, 8), ValueError, "empty batch"),
    (torch.rand(2, 3, 8, 8), ValueError, "image_shape"),
    (torch.full((2, 1, 8, 8), float("nan")), ValueError, "NaN or Inf"),
    (torch.full((2, 1, 8, 8), float("inf")), ValueError, "NaN or Inf"),
    (torch.rand(2, 1, 8, 8) * 255, ValueError, r"\[0, 1\]"),
    (-torch.rand(2, 1, 8, 8), ValueError, r"\[0, 1\]"),
    (torch.randint(0, 255, (2, 1, 8, 8), dtype=torch.int64), TypeError, "uint8"),
    (torch.rand(2, 1, 8, 8).numpy(), TypeError, "torch.Tensor"),
])
def test_bad_images(model, x, error, match):
    with pytest.raises(error, match=match):
        model(x)


def test_labels_missing_unexpected_or_out_of_range(model, conditional):
    x = torch.rand(2, 1, 8, 8)
    with pytest.raises(ValueError, match="unconditional"):
        model(x, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="class-conditional"):
        conditional(x)
    with pytest.raises(ValueError, match=r"\[0, 2\]"):
        conditional(x, torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="shape"):
        conditional(x, torch.tensor([0, 1, 2]))
    with pytest.raises(TypeError, match="integer"):
        conditional(x, torch.tensor([0.0, 1.0]))


def test_uninitialized_model_says_so(model):
    with pytest.raises(RuntimeError, match="not initialized"):
        model.sample(2)
    with pytest.raises(RuntimeError, match="not initialized"):
        model.encode(torch.rand(2, 1, 8, 8) - 0.5)
    with pytest.raises(RuntimeError, match="not initialized"):
        model.log_prob(torch.rand(2, 1, 8, 8) - 0.5)


def test_bad_sampling_and_decoding_arguments(model):
    model.initialize(torch.rand(4, 1, 8, 8))
    with pytest.raises(ValueError, match="positive int"):
        model.sample(0)
    with pytest.raises(ValueError, match="temperature"):
        model.sample(2, temperature=-1.0)
    with pytest.raises(ValueError, match="one per level"):
        model.decode([torch.randn(2, 2, 4, 4)])
    with pytest.raises(ValueError, match="latent 0"):
        model.decode([torch.randn(2, 3, 4, 4), torch.randn(2, 8, 2, 2)])
    with pytest.raises(TypeError, match="preprocessed float"):
        model.log_prob(torch.zeros(2, 1, 8, 8, dtype=torch.uint8))
