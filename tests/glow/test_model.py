"""The whole Glow model: the bijection to latents, its log-determinant, log_prob, bits/dim, memory modes."""
import dataclasses
import math

import pytest
import torch

from flow_checks import flat_grads, perturb_, rel_err
from revglow import Glow, GlowConfig


def _model(memory="autograd", num_classes=0, coupling="affine", permutation="invconv_lu", shape=(1, 4, 4),
           levels=2, depth=2, hidden=8, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    cfg = GlowConfig(image_shape=shape, levels=levels, depth=depth, hidden=hidden, coupling=coupling,
                     permutation=permutation, num_classes=num_classes, memory=memory, kernels="torch")
    model = Glow(cfg).to(dtype)
    x = torch.rand(16, *shape, dtype=dtype)
    y = torch.randint(0, num_classes, (16,)) if num_classes else None
    model.initialize(x, y)
    perturb_(model, std=0.05, seed=seed + 1)
    return model


def _flat_latents(model, xc, y=None):
    return torch.cat([e.flatten(1) for e in model.encode(xc, y)], dim=1)


@pytest.mark.parametrize("coupling,permutation,num_classes", [
    ("affine", "invconv_lu", 0), ("affine", "invconv", 3), ("additive", "shuffle", 0), ("additive", "reverse", 2)])
def test_encode_decode_logdet_and_log_prob(coupling, permutation, num_classes):
    model = _model(coupling=coupling, permutation=permutation, num_classes=num_classes)
    xc = torch.rand(2, 1, 4, 4, dtype=torch.float64) - 0.5
    y = torch.tensor([0, num_classes - 1]) if num_classes else None
    latents = model.encode(xc, y)
    assert [tuple(e.shape[1:]) for e in latents] == [tuple(s) for s in model.latent_shapes]
    assert rel_err(model.decode(latents, y), xc) < 1e-12
    # the change of variables through encode, with a brute-force Jacobian
    for i in range(2):
        yi = y[i:i + 1] if num_classes else None
        jac = torch.autograd.functional.jacobian(
            lambda v: _flat_latents(model, v.view(1, 1, 4, 4), yi).flatten(), xc[i].flatten())
        logdet = torch.linalg.slogdet(jac)[1]
        eps = _flat_latents(model, xc[i:i + 1], yi)
        expected = (-0.5 * (eps.square() + math.log(2 * math.pi)).sum() + logdet).detach()
        assert abs(float(model.log_prob(xc[i:i + 1], yi).detach()) - float(expected)) < 1e-9 * abs(float(expected)) + 1e-9


def test_bits_per_dim_uses_the_exact_discretization_constant():
    model = _model()
    xc = torch.rand(3, 1, 4, 4, dtype=torch.float64) - 0.5
    d, bins = 16, 2 ** model.config.n_bits
    expected = -(model.log_prob(xc) - d * math.log(bins)) / (d * math.log(2))
    assert torch.allclose(model.bits_per_dim(xc), expected)


def test_preprocess_quantizes_to_n_bits_and_dequantizes_within_one_bin():
    torch.manual_seed(0)
    model = Glow(GlowConfig(image_shape=(1, 4, 4), levels=1, depth=1, hidden=4, n_bits=5))
    x = torch.randint(0, 256, (8, 1, 4, 4), dtype=torch.uint8)
    xc = model.preprocess(x)
    bins = 32
    assert float(xc.min()) >= -0.5 and float(xc.max()) <= 0.5
    assert torch.equal(torch.floor((xc + 0.5) * bins), torch.floor(x.float() / 8))
    # float images in [0, 1] are read as 8-bit values
    assert torch.equal(model.preprocess(x.float() / 255, noise=False), model.preprocess(x, noise=False))
    assert torch.equal(model.postprocess(model.preprocess(x)), torch.floor(x.float() / 8) / (bins - 1))


@pytest.mark.parametrize("memory", ["reversible", "checkpoint"])
def test_memory_modes_match_autograd_in_float64(memory):
    reference, model = _model("autograd"), _model(memory)
    model.load_state_dict(reference.state_dict())
    x = torch.randint(0, 256, (4, 1, 4, 4), dtype=torch.uint8)
    _assert_same_training_step(model, reference, x, loss_tol=1e-12, grad_tol=1e-9)


def _training_step(model, x, seed=5):
    """One loss + backward on x with the dequantization noise of `seed`: the loss and the flat gradients."""
    torch.manual_seed(seed)
    loss = model(x).mean()
    loss.backward()
    return loss.detach(), flat_grads(model)


def _assert_same_training_step(model, reference, x, loss_tol, grad_tol):
    """One loss + backward of each model on the same data and dequantization noise: same loss and gradients."""
    _assert_step_matches(model, x, _training_step(reference, x), loss_tol, grad_tol)


def _assert_step_matches(model, x, reference_step, loss_tol, grad_tol):
    loss, grads = _training_step(model, x)
    reference_loss, reference_grads = reference_step
    assert rel_err(loss, reference_loss) < loss_tol
    assert rel_err(grads, reference_grads) < grad_tol


# The coupling network before the reference implementation's options (what checkpoints without them hold).
PLAIN_NETWORK = dict(nn_actnorm=False, edge_padding=False, zero_logscale_factor=None, actnorm_logscale_factor=1.0)


@pytest.fixture(scope="module")
def trained_float32_glow():
    """(config, trained weights, data, the autograd model's loss and gradients there) of the float32 test below,
    per network: the autograd model, its three Adam steps and its step at the trained weights, once for both
    memory modes."""
    cache = {}

    def trained(network, shape):
        if (network, shape) not in cache:
            torch.manual_seed(0)
            cfg = GlowConfig(image_shape=shape, levels=3, depth=32, hidden=16, memory="autograd", kernels="torch",
                             **(PLAIN_NETWORK if network == "plain" else {}))
            reference = Glow(cfg)
            data = torch.randint(0, 256, (8, *shape), dtype=torch.uint8)
            opt = torch.optim.Adam(reference.parameters(), lr=1e-3)
            for _ in range(3):
                opt.zero_grad()
                reference(data).mean().backward()
                opt.step()
            weights = {k: v.clone() for k, v in reference.state_dict().items()}
            reference.zero_grad(set_to_none=True)
            cache[network, shape] = cfg, weights, data, _training_step(reference, data)
        return cache[network, shape]

    return trained


@pytest.mark.parametrize("memory", ["reversible", "checkpoint"])
@pytest.mark.parametrize("network,shape", [("plain", (3, 8, 8)), ("reference", (1, 16, 16))])
@pytest.mark.long(5)
def test_memory_modes_match_autograd_in_float32_after_training(memory, network, shape, trained_float32_glow):
    """A 3-level, 32-step model, trained a few steps (not only at init), float32: < 1e-4 normwise. (With a 1x1
    top level, (3, 8, 8), three Adam steps on noise take either network to thousands of bits/dim; the reference
    network's ActNorms, initialized on 8 values per channel there, then leave it non-invertible in float32, so
    it is checked at 16x16, where it trains sanely.)"""
    cfg, weights, data, reference_step = trained_float32_glow(network, shape)
    model = Glow(dataclasses.replace(cfg, memory=memory))
    model.load_state_dict(weights)
    _assert_step_matches(model, data, reference_step, loss_tol=1e-6, grad_tol=1e-4)


def test_every_parameter_gets_a_gradient():
    """Of the training loss bits_x + weight_y * bits_y; bits/dim alone reaches everything but the class head."""
    model = _model("reversible", num_classes=2)
    x = torch.rand(4, 1, 4, 4, dtype=torch.float64)
    y = torch.tensor([0, 1, 1, 0])
    model(x, y).mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert missing and all(n.startswith("class_head.") for n in missing)
    model.zero_grad(set_to_none=True)
    out = model.losses(x, y)
    (out.bits_x.mean() + 0.01 * out.bits_y.mean()).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert missing == []


def test_state_dict_round_trip_without_reinitialization():
    model = _model("reversible")
    clone = Glow(model.config).double()
    assert not clone.is_initialized
    clone.load_state_dict(model.state_dict())
    assert clone.is_initialized
    x = torch.randint(0, 256, (4, 1, 4, 4), dtype=torch.uint8)
    before = {n: p.detach().clone() for n, p in clone.named_parameters()}
    torch.manual_seed(3)
    a = clone(x)
    torch.manual_seed(3)
    b = model(x)
    assert torch.equal(a, b)
    assert all(torch.equal(p, before[n]) for n, p in clone.named_parameters())


def test_first_training_forward_initializes_and_initialize_sets_unit_statistics():
    torch.manual_seed(0)
    model = Glow(GlowConfig(image_shape=(1, 8, 8), levels=2, depth=2, hidden=8))
    assert not model.is_initialized
    x = torch.randint(0, 256, (64, 1, 8, 8), dtype=torch.uint8)
    model(x)
    assert model.is_initialized
    # DDI: on the init batch, every ActNorm's output has zero mean and unit variance per channel
    inputs = {}
    for i, step in enumerate(model.flows[1].steps):
        step.register_forward_pre_hook(lambda mod, args, i=i: inputs.setdefault(i, args[0].detach()))
    model.initialize(x)
    for i, step in enumerate(model.flows[1].steps):
        y, _ = step.actnorm(inputs[i])
        assert y.mean(dim=(0, 2, 3)).abs().max() < 1e-5
        assert (y.std(dim=(0, 2, 3), unbiased=False) - 1).abs().max() < 1e-4


def test_sample_shapes_range_and_temperature_zero_is_deterministic():
    model = _model("reversible", dtype=torch.float32)
    imgs = model.sample(5, temperature=0.7)
    assert imgs.shape == (5, 1, 4, 4) and float(imgs.min()) >= 0 and float(imgs.max()) <= 1
    assert torch.equal(model.sample(2, temperature=0.0), model.sample(2, temperature=0.0))
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    assert torch.equal(model.sample(3, 1.0, generator=g1), model.sample(3, 1.0, generator=g2))


def test_conditional_sampling_uses_the_label():
    model = _model("autograd", num_classes=3, dtype=torch.float32)
    with torch.no_grad():
        model.top_prior.class_embedding.bias.zero_()
        model.top_prior.class_embedding.weight.normal_(std=2.0)
    a = model.sample(4, temperature=0.0, y=0)
    b = model.sample(4, temperature=0.0, y=torch.full((4,), 2))
    assert not torch.equal(a, b)


@pytest.mark.parametrize("check", ["raise", "warn"])
def test_reconstruction_check_of_a_real_glow_catches_a_changed_weight(check):
    """A weight changed between forward and backward (through .data) makes the rebuilt inputs wrong: the check of
    a real Glow model raises or warns, and the per-level errors say which level saw it."""
    from revglow import ReconstructionError, ReconstructionWarning

    model = Glow(GlowConfig(image_shape=(1, 8, 8), levels=2, depth=2, hidden=8, check_reconstruction=check,
                            kernels="torch"))
    x = torch.randint(0, 256, (4, 1, 8, 8), dtype=torch.uint8)
    model.initialize(x)
    loss = model(x).mean()
    with torch.no_grad():
        model.flows[1].steps[0].actnorm.bias.add_(1.0)   # the top level's first step
    if check == "raise":
        with pytest.raises(ReconstructionError):
            loss.backward()
    else:
        with pytest.warns(ReconstructionWarning):
            loss.backward()
        errors = model.reconstruction_errors()
        assert float(errors[1].max()) > 1e-2


def test_levels_invert_each_other_and_state_dict_keys_are_those_of_saved_checkpoints():
    """Each Level's inverse undoes its forward; the Level modules add no state_dict keys, so checkpoints saved
    before them (flows.L.*, splits.L.*, top_prior.*) still load."""
    model = Glow(GlowConfig(image_shape=(1, 8, 8), levels=2, depth=2, hidden=8, kernels="torch")).double()
    model.initialize(torch.randint(0, 256, (4, 1, 8, 8), dtype=torch.uint8))
    x = torch.rand(3, 1, 8, 8, dtype=torch.float64) - 0.5
    for level in model.levels:
        h, eps, _ = level(x)
        torch.testing.assert_close(level.inverse(h, eps), x, rtol=1e-10, atol=1e-10)
        x = h
    prefixes = {key.split(".")[0] for key in model.state_dict()}
    assert prefixes == {"flows", "splits", "top_prior"}
    fresh = Glow(model.config).double()
    fresh.load_state_dict(model.state_dict())
    assert fresh.is_initialized
