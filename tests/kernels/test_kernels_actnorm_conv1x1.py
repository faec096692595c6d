"""Triton kernels of the fused ActNorm + 1x1 convolution against the pure-PyTorch reference.

Run on CPU under the Triton interpreter (TRITON_INTERPRET=1, set by tests/conftest.py without a GPU) or on
CUDA with REVGLOW_TEST_DEVICE=cuda. Every comparison is normwise and element by element (assert_kernel_close).
Channel counts cover each path and the points where the kernels switch: fewer than tl.dot's 16 (4, the
broadcast product), 16 (the first tl.dot width, unpadded), 12 and 48 (padded to a power of two), 64 (the widest
single-pass backward), 96 and 128 (the two-pass backward, with a padded and a full second channel block);
odd H x W; batch 1.
"""
import pytest
import torch

try:
    from kernel_utils import assert_kernel_close, kernel_device, random_actnorm_conv1x1_params
except ImportError:  # tests/ imported as a package
    from tests.kernel_utils import assert_kernel_close, kernel_device, random_actnorm_conv1x1_params

from revglow.ops.actnorm_conv1x1 import (
    actnorm_conv1x1,
    actnorm_conv1x1_inverse,
    actnorm_conv1x1_inverse_reference,
    actnorm_conv1x1_reference,
    actnorm_conv1x1_reversible_backward,
    actnorm_conv1x1_reversible_backward_reference,
)

SHAPES = [  # (channels, batch, height, width)
    (4, 1, 5, 7),
    (4, 3, 3, 3),
    (12, 1, 5, 7),
    (12, 3, 3, 3),
    (48, 1, 5, 7),
    (48, 3, 3, 3),
    (96, 2, 5, 7),  # C > 64: the two-pass backward (35 pixels: several pixel tiles)
    (16, 2, 3, 5),  # tl.dot's smallest width, no channel padding
    (64, 2, 3, 5),  # the single-pass backward's widest (C_BLOCK = FUSED_BACKWARD_MAX_C_BLOCK)
    (128, 1, 3, 5),  # the first width above it with full 64-channel blocks
]


@pytest.fixture
def device():
    return kernel_device()


def _inputs(shape, device):
    c, n, h, w = shape
    x = torch.randn(n, c, h, w, device=device)
    scale, bias, weight, weight_inv = random_actnorm_conv1x1_params(c, device)
    return x, scale, bias, weight, weight_inv


@pytest.mark.parametrize("shape", SHAPES)
def test_forward_and_inverse_match_reference(shape, device):
    from revglow.kernels.actnorm_conv1x1 import actnorm_conv1x1_forward_launch, actnorm_conv1x1_inverse_launch

    x, scale, bias, weight, weight_inv = _inputs(shape, device)
    y = actnorm_conv1x1_forward_launch(x, scale, bias, weight)
    y_ref = actnorm_conv1x1_reference(x, scale, bias, weight)
    assert_kernel_close(y, y_ref, name="y")

    x_rebuilt = actnorm_conv1x1_inverse_launch(y_ref, scale, bias, weight_inv)
    assert_kernel_close(x_rebuilt, actnorm_conv1x1_inverse_reference(y_ref, scale, bias, weight_inv), name="x")
    # Round trip through the kernels only.
    assert_kernel_close(actnorm_conv1x1_inverse_launch(y, scale, bias, weight_inv), x, name="round trip")


@pytest.mark.parametrize("shape", SHAPES)
def test_reversible_backward_matches_reference_and_autograd(shape, device):
    from revglow.kernels.actnorm_conv1x1_backward import actnorm_conv1x1_reversible_backward_launch

    x, scale, bias, weight, weight_inv = _inputs(shape, device)
    y = actnorm_conv1x1_reference(x, scale, bias, weight)
    grad_y = torch.randn_like(y)
    got = actnorm_conv1x1_reversible_backward_launch(y, grad_y, scale, bias, weight, weight_inv)
    expected = actnorm_conv1x1_reversible_backward_reference(y, grad_y, scale, bias, weight, weight_inv)
    for name, a, b in zip(("x", "grad_x", "grad_scale", "grad_bias", "grad_weight"), got, expected):
        assert_kernel_close(a, b, name=name)

    # The same gradients from torch autograd of the reference forward.
    leaves = [t.detach().clone().requires_grad_() for t in (x, scale, bias, weight)]
    actnorm_conv1x1_reference(*leaves).backward(grad_y)
    assert_kernel_close(got[0], x, name="x vs original")
    for name, a, leaf in zip(("grad_x", "grad_scale", "grad_bias", "grad_weight"), got[1:], leaves):
        assert_kernel_close(a, leaf.grad, name=name + " vs autograd")


@pytest.mark.parametrize("shape", [SHAPES[1], SHAPES[2], SHAPES[5], SHAPES[6], SHAPES[9]])
def test_autograd_function_matches_torch_autograd(shape, device):
    x, scale, bias, weight, weight_inv = _inputs(shape, device)
    grad_y = torch.randn(x.shape, device=device)

    ref = [t.clone().requires_grad_() for t in (x, scale, bias, weight)]
    y_ref = actnorm_conv1x1(*ref, weight_inv, backend="torch")
    y_ref.backward(grad_y)

    tri = [t.clone().requires_grad_() for t in (x, scale, bias, weight, weight_inv)]
    y = actnorm_conv1x1(*tri, backend="triton")
    # The Function keeps its output (which the reversible backward rebuilds x from), not its input.
    assert y.grad_fn.saved_tensors[0].data_ptr() == y.data_ptr()
    y.backward(grad_y)

    assert_kernel_close(y, y_ref, name="y")
    for name, a, b in zip(("x", "scale", "bias", "weight"), tri[:4], ref):
        assert_kernel_close(a.grad, b.grad, name=f"grad {name}")
    assert tri[4].grad is None  # weight_inv is a constant derived from weight


def test_dispatch_entry_points_use_the_kernels(device):
    x, scale, bias, weight, weight_inv = _inputs((12, 2, 3, 5), device)
    y = actnorm_conv1x1(x, scale, bias, weight, weight_inv, backend="triton")
    assert_kernel_close(actnorm_conv1x1_inverse(y, scale, bias, weight_inv, backend="triton"), x, name="x")
    grad_y = torch.randn_like(y)
    got = actnorm_conv1x1_reversible_backward(y, grad_y, scale, bias, weight, weight_inv, backend="triton")
    expected = actnorm_conv1x1_reversible_backward(y, grad_y, scale, bias, weight, weight_inv, backend="torch")
    for a, b in zip(got, expected):
        assert_kernel_close(a, b)


def test_backward_reduction_is_deterministic(device):
    from revglow.kernels.actnorm_conv1x1_backward import actnorm_conv1x1_reversible_backward_launch

    x, scale, bias, weight, weight_inv = _inputs((12, 3, 5, 7), device)
    y = actnorm_conv1x1_reference(x, scale, bias, weight)
    grad_y = torch.randn_like(y)
    first = actnorm_conv1x1_reversible_backward_launch(y, grad_y, scale, bias, weight, weight_inv)
    second = actnorm_conv1x1_reversible_backward_launch(y, grad_y, scale, bias, weight, weight_inv)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_launchers_reject_bad_shapes(device):
    from revglow.kernels.actnorm_conv1x1 import actnorm_conv1x1_forward_launch
    from revglow.kernels.actnorm_conv1x1_backward import actnorm_conv1x1_reversible_backward_launch

    x, scale, bias, weight, weight_inv = _inputs((12, 1, 3, 3), device)
    with pytest.raises(ValueError, match="weight"):
        actnorm_conv1x1_forward_launch(x, scale, bias, weight[:8, :8])
    with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
        actnorm_conv1x1_forward_launch(x[0], scale, bias, weight)
    with pytest.raises(TypeError, match="float32"):
        actnorm_conv1x1_forward_launch(x.double(), scale, bias, weight)
    with pytest.raises(ValueError, match="grad_y"):
        actnorm_conv1x1_reversible_backward_launch(x, x[:, :4], scale, bias, weight, weight_inv)


def test_non_contiguous_input(device):
    from revglow.kernels.actnorm_conv1x1 import actnorm_conv1x1_forward_launch

    x, scale, bias, weight, _ = _inputs((12, 2, 5, 7), device)
    x_t = x.transpose(2, 3).contiguous().transpose(2, 3)  # same values, channels-last-like strides
    assert not x_t.is_contiguous()
    assert_kernel_close(actnorm_conv1x1_forward_launch(x_t, scale, bias, weight),
                          actnorm_conv1x1_reference(x, scale, bias, weight))


def test_dot_precision_knob(device, monkeypatch):
    from revglow.kernels import actnorm_conv1x1 as k

    x, scale, bias, weight, _ = _inputs((48, 1, 3, 5), device)
    monkeypatch.setattr(k, "DOT_INPUT_PRECISION", "tf32")
    with pytest.raises(ValueError, match="DOT_INPUT_PRECISION"):
        k.actnorm_conv1x1_forward_launch(x, scale, bias, weight)
    if device.type == "cuda" and torch.version.hip is None:  # tf32x3 exists on NVIDIA only
        monkeypatch.setattr(k, "DOT_INPUT_PRECISION", "tf32x3")
        assert_kernel_close(k.actnorm_conv1x1_forward_launch(x, scale, bias, weight),
                              actnorm_conv1x1_reference(x, scale, bias, weight), tol=1e-5)


@pytest.mark.parametrize("c", [12, 64, 96])
def test_backward_without_rebuilt_input(c, device):
    from revglow.kernels.actnorm_conv1x1_backward import actnorm_conv1x1_reversible_backward_launch

    x, scale, bias, weight, weight_inv = _inputs((c, 2, 3, 5), device)
    y = actnorm_conv1x1_reference(x, scale, bias, weight)
    grad_y = torch.randn_like(y)
    full = actnorm_conv1x1_reversible_backward_launch(y, grad_y, scale, bias, weight, weight_inv)
    lean = actnorm_conv1x1_reversible_backward_launch(y, grad_y, scale, bias, weight, weight_inv, return_input=False)
    assert lean[0] is None
    for a, b in zip(lean[1:], full[1:]):
        assert torch.equal(a, b)
