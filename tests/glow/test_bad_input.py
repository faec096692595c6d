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


def test_sample_label_must_be_an_int_or_integer_tensor(conditional):
    conditional.initialize(torch.rand(4, 1, 8, 8), torch.tensor([0, 1, 2, 0]))
    for label in (2.7, 2.0, True, "2"):
        with pytest.raises(TypeError, match="int label"):
            conditional.sample(2, y=label)
    import numpy as np

    torch.manual_seed(1)
    by_numpy = conditional.sample(2, y=np.int64(2))
    torch.manual_seed(1)
    assert torch.equal(by_numpy, conditional.sample(2, y=torch.tensor([2, 2])))


def test_float64_input_is_computed_in_the_models_dtype_as_forward_does(model):
    """model(x) takes float64 images into a float32 model; encode, decode, log_prob and bits_per_dim take float64
    (and float16) the same way, returning the model's dtype, equal to what float32 input gives."""
    x = torch.rand(3, 1, 8, 8)
    model.initialize(x)
    assert model(x.double()).dtype == torch.float32
    xc = model.preprocess(x)
    for dtype in (torch.float64, torch.float16):
        given = xc.to(dtype)
        torch.testing.assert_close(model.log_prob(given), model.log_prob(given.float()))
        torch.testing.assert_close(model.bits_per_dim(given), model.bits_per_dim(given.float()))
        latents = model.encode(given)
        assert all(z.dtype == torch.float32 for z in latents)
        decoded = model.decode([z.to(dtype) for z in latents])
        assert decoded.dtype == torch.float32
        torch.testing.assert_close(decoded, model.decode([z.to(dtype).float() for z in latents]))
    with pytest.raises(TypeError, match="floating-point"):
        model.decode([z.long() for z in model.encode(xc)])


def _glow(**options):
    torch.manual_seed(0)
    glow = Glow(GlowConfig(**{**dict(image_shape=(1, 8, 8), levels=2, depth=1, hidden=4), **options}))
    glow.initialize(torch.rand(4, 1, 8, 8))
    return glow


@pytest.mark.parametrize("saved,loaded,named", [
    (dict(n_bits=4), dict(n_bits=5), "n_bits=4; this one has n_bits=5"),
    (dict(learn_top=True), dict(learn_top=False), "learn_top=True; this one has learn_top=False"),
    (dict(zero_logscale_factor=3.0), dict(zero_logscale_factor=None), "zero_logscale_factor=3.0"),
    (dict(hidden=4, n_bits=4), dict(hidden=8, n_bits=5), "hidden=4, n_bits=4; this one has hidden=8, n_bits=5"),
])
def test_a_state_dict_of_another_configuration_is_refused(saved, loaded, named):
    """Same keys and shapes (n_bits, learn_top: torch reports "All keys matched" and the model computes another
    density) or not: refused before anything is copied, naming the options."""
    from revglow.glow.checks import ConfigMismatchError

    source, target = _glow(**saved), _glow(**loaded)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(ConfigMismatchError, match=named.replace("(", r"\(")) as caught:
        target.load_state_dict(source.state_dict())
    assert isinstance(caught.value, RuntimeError)       # as torch's own load_state_dict errors
    assert all(torch.equal(v, target.state_dict()[k]) for k, v in before.items())    # nothing was loaded


def test_a_state_dict_loads_across_runtime_options_and_as_a_plain_dict(tmp_path):
    import io

    source = _glow(n_bits=4)
    buffer = io.BytesIO()
    torch.save(source.state_dict(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)       # the configuration travels through torch.save
    xc = source.preprocess(torch.rand(2, 1, 8, 8))
    other = _glow(n_bits=4, memory="autograd", kernels="torch", check_reconstruction="off")
    other.load_state_dict(saved)
    torch.testing.assert_close(other.log_prob(xc), source.log_prob(xc))
    five = _glow(n_bits=5)
    five.load_state_dict(dict(saved))                     # a plain dict carries no configuration: loaded as asked
    assert all(torch.equal(v, saved[k]) for k, v in five.state_dict().items())
