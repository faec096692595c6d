"""Checks of the model's constants against computations that share no code or formula with it.

Each test here fails for one specific, plausible slip that the property tests cannot see because every
implementation (reference, kernel, model) would make it together: the `+ 2` inside the affine coupling's sigmoid,
the log n_bins of the discretization constant in bits/dim, and the width of the dequantization noise.
"""
import math

import numpy as np
import pytest
import torch

try:
    from kernel_utils import kernel_device
except ImportError:  # tests/ imported as a package
    from tests.kernel_utils import kernel_device

from revglow import Glow, GlowConfig
from revglow.ops.coupling_affine import (coupling_affine, coupling_affine_inverse,
                                         coupling_affine_reversible_backward)

SIGMOID_2 = 0.8807970779778823       # 1 / (1 + e**-2): the scale of a zero-initialized affine coupling (Glow's code)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_affine_coupling_scale_is_sigmoid_of_h_plus_2(backend):
    """Against numpy (forward, inverse, the rebuilt input of the reversible backward), and at h = 0 against the
    literal sigmoid(2): the network's zero initialization must give a scale of 0.8808, not 0.5."""
    if backend == "triton":
        device, dtype = kernel_device(), torch.float32
    else:
        device, dtype = torch.device("cpu"), torch.float64
    g = torch.Generator().manual_seed(0)
    n, ca, hh, ww = 2, 3, 5, 7
    xa = torch.randn(n, ca, hh, ww, generator=g, dtype=torch.float64)
    h = torch.randn(n, 2 * ca, hh, ww, generator=g, dtype=torch.float64)
    shift, raw = h[:, :ca].numpy(), h[:, ca:].numpy()
    scale = 1.0 / (1.0 + np.exp(-(raw + 2.0)))
    ya_np = (xa.numpy() + shift) * scale
    logdet_np = np.log(scale).reshape(n, -1).sum(1)
    tol = 1e-12 if dtype == torch.float64 else 1e-5

    ya, logdet = coupling_affine(xa.to(device, dtype), h.to(device, dtype), backend=backend)
    np.testing.assert_allclose(ya.double().cpu().numpy(), ya_np, rtol=tol, atol=tol)
    np.testing.assert_allclose(logdet.double().cpu().numpy(), logdet_np, rtol=tol, atol=tol * ca * hh * ww)
    xa_back, logdet_inv = coupling_affine_inverse(torch.from_numpy(ya_np).to(device, dtype), h.to(device, dtype),
                                                  backend=backend)
    np.testing.assert_allclose(xa_back.double().cpu().numpy(), xa.numpy(), rtol=10 * tol, atol=10 * tol)
    np.testing.assert_allclose(logdet_inv.double().cpu().numpy(), logdet_np, rtol=tol, atol=tol * ca * hh * ww)
    rebuilt, _, _ = coupling_affine_reversible_backward(
        torch.from_numpy(ya_np).to(device, dtype), h.to(device, dtype), torch.ones(n, ca, hh, ww, device=device,
                                                                                  dtype=dtype),
        torch.ones(n, device=device, dtype=dtype), backend=backend)
    np.testing.assert_allclose(rebuilt.double().cpu().numpy(), xa.numpy(), rtol=10 * tol, atol=10 * tol)

    zero = torch.zeros(n, 2 * ca, hh, ww, device=device, dtype=dtype)
    ya0, logdet0 = coupling_affine(xa.to(device, dtype), zero, backend=backend)
    np.testing.assert_allclose(ya0.double().cpu().numpy(), xa.numpy() * SIGMOID_2, rtol=tol, atol=tol)
    np.testing.assert_allclose(logdet0.double().cpu().numpy(), [ca * hh * ww * math.log(SIGMOID_2)] * n, rtol=tol)


def test_fresh_affine_glow_log_determinant_is_that_of_sigmoid_2():
    """A fresh model's couplings output zero (zero-initialized last layer), so each step's coupling contributes
    log sigmoid(2) per transformed value; with ActNorm and the 1x1 convolutions made identities the whole flow's
    log-determinant is a count of transformed values times log(0.8808), plus the split priors' standardization."""
    torch.manual_seed(0)
    model = Glow(GlowConfig(image_shape=(2, 4, 4), levels=1, depth=3, hidden=8, permutation="reverse",
                            learn_top=False, kernels="torch")).double()
    for module in model.modules():
        if hasattr(module, "reset_initialization"):
            with torch.no_grad():
                for name, p in module.named_parameters():
                    p.zero_()          # ActNorm: log-scale 0 and bias 0, the identity
            module.initialized.fill_(True)
            module._initialized = True
    xc = torch.rand(3, 2, 4, 4, dtype=torch.float64) - 0.5
    latents, logdet, _ = model._encode(xc, None)
    transformed_per_step = (2 * 4 * 4) // 2            # half of the 8 channels at 2x2 after the squeeze
    expected = 3 * transformed_per_step * math.log(SIGMOID_2)
    torch.testing.assert_close(logdet, torch.full((3,), expected, dtype=torch.float64), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("n_bits", [3, 5, 8])
def test_bits_per_dim_of_the_uniform_density_is_n_bits(n_bits, monkeypatch):
    """The uniform density on [-0.5, 0.5]^D (log p = 0) gives each of the 2**(n_bits D) bins probability
    2**(-n_bits D), hence exactly n_bits bits per dimension: the discretization constant is D log 2**n_bits."""
    model = Glow(GlowConfig(image_shape=(1, 4, 4), levels=1, depth=1, hidden=4, n_bits=n_bits))
    monkeypatch.setattr(Glow, "log_prob", lambda self, xc, y=None, context=None: torch.zeros(xc.shape[0]))
    bpd = model.bits_per_dim(torch.zeros(2, 1, 4, 4))
    torch.testing.assert_close(bpd, torch.full((2,), float(n_bits)), rtol=0, atol=1e-6)


@pytest.mark.parametrize("n_bits", [2, 5])
def test_dequantization_noise_fills_exactly_one_bin(n_bits):
    """Noise is uniform over the whole bin [k / n_bins, (k + 1) / n_bins) - 0.5 of each n-bit value k: it never
    leaves the bin, and its spread covers the bin (not 1/256 of the range)."""
    n_bins = 2 ** n_bits
    model = Glow(GlowConfig(image_shape=(1, 4, 4), levels=1, depth=1, hidden=4, n_bits=n_bits))
    x = torch.randint(0, 256, (512, 1, 4, 4), dtype=torch.uint8)
    k = (x.long() // 2 ** (8 - n_bits)).double()              # the n-bit value, by integer division
    generator = torch.Generator().manual_seed(1)
    u = (model.preprocess(x, generator=generator).double() + 0.5) * n_bins - k   # position inside the bin, in bins
    assert float(u.min()) >= 0.0 and float(u.max()) < 1.0
    assert float(u.max()) > 0.99 and float(u.min()) < 0.01
    assert abs(float(u.mean()) - 0.5) < 0.01 and abs(float(u.var()) - 1 / 12) < 0.005


def test_dequantization_noise_from_a_generator_is_reproducible_and_leaves_the_global_rng_alone():
    model = Glow(GlowConfig(image_shape=(1, 4, 4), levels=1, depth=1, hidden=4, n_bits=5))
    x = torch.randint(0, 256, (4, 1, 4, 4), dtype=torch.uint8)
    state = torch.get_rng_state()
    a = model.preprocess(x, generator=torch.Generator().manual_seed(3))
    assert torch.equal(torch.get_rng_state(), state)
    b = model.preprocess(x, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    torch.manual_seed(3)
    assert torch.equal(model.preprocess(x), a)       # on the CPU: the global stream of the same seed
