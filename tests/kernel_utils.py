"""Helpers shared by the kernel tests: device choice, normwise errors, well-conditioned random parameters.

Kernel tests run the real Triton kernels: on CUDA when REVGLOW_TEST_DEVICE=cuda (or, unset, when a GPU is
present), else on CPU tensors under the Triton interpreter, set up by tests/triton_env.py (imported by
conftest.py, and here, so that a test module that imports this one first also works without the conftest).
"""
from __future__ import annotations

import os

try:
    import triton_env  # noqa: F401  (first: sets TRITON_INTERPRET before anything imports triton)
except ImportError:  # tests/ imported as a package
    from tests import triton_env  # noqa: F401

import pytest  # noqa: E402
import torch  # noqa: E402

from flow_checks import rel_err  # noqa: E402,F401  (re-exported for the kernel tests)

__all__ = ["kernel_device", "rel_err", "assert_kernel_close", "random_actnorm_conv1x1_params"]

# Tolerance of float32 kernels against the float32 reference: normwise, ||a - b|| / ||b||, and element by element,
# |a_i - b_i| <= tol * (|b_i| + rms(b)) (relative where b_i is large, against the tensor's scale where it is
# near zero). The element-wise check catches what a whole-tensor norm dilutes: one wrong masked element,
# one mis-indexed tile, in a tensor of thousands.
FLOAT32_TOL = 1e-5


def kernel_device() -> torch.device:
    """The device the kernel tests run on; skips when Triton cannot run there."""
    name = os.environ.get("REVGLOW_TEST_DEVICE", "") or ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        pytest.skip("REVGLOW_TEST_DEVICE=cuda but no CUDA device is available")
    if device.type == "cpu" and not triton_env.interpreting():
        pytest.skip("Triton kernels run on CPU tensors only under TRITON_INTERPRET=1 (set before importing triton)")
    pytest.importorskip("triton")
    return device


def assert_kernel_close(actual: torch.Tensor, expected: torch.Tensor, tol: float = FLOAT32_TOL, name: str = ""):
    """Normwise and element-wise closeness within `tol` (see FLOAT32_TOL), naming the worst element on failure."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{name}: non-finite values"
    err = rel_err(actual, expected)
    assert err <= tol, f"{name}: normwise relative error {err:.3e} > {tol:.1e}"
    a, b = actual.detach().double(), expected.detach().double()
    scale = b.square().mean().sqrt()
    excess = (a - b).abs() / (b.abs() + scale).clamp_min(1e-30)
    worst = excess.argmax()
    assert excess.flatten()[worst] <= tol, (
        f"{name}: element {tuple(int(i) for i in torch.unravel_index(worst, excess.shape))} is "
        f"{a.flatten()[worst].item():.6g}, expected {b.flatten()[worst].item():.6g} (error "
        f"{excess.flatten()[worst].item():.2e} of |expected| + rms > {tol:.1e})")


def random_actnorm_conv1x1_params(c: int, device, dtype=torch.float32):
    """(scale, bias, weight, weight_inv): scales spread around 1 (in [0.4, 2.5], never 1 exactly), nonzero
    bias, and a well-conditioned weight (a random rotation plus a small perturbation)."""
    scale = torch.exp(torch.rand(c, dtype=torch.float64) * 1.8 - 0.9)
    bias = torch.randn(c, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(c, c, dtype=torch.float64))
    weight = q + 0.1 * torch.randn(c, c, dtype=torch.float64) / c ** 0.5
    weight_inv = torch.linalg.inv(weight)
    return tuple(t.to(device=device, dtype=dtype) for t in (scale, bias, weight, weight_inv))
