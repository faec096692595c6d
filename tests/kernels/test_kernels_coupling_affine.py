"""Triton kernels of the affine coupling against the pure-PyTorch reference.

h in float32 and bfloat16; for bfloat16 the oracle is the reference run on the same bfloat16 h (which it
upcasts), so both sides compute in float32 from identical inputs and the float32 tolerance applies.
Run on CPU under the Triton interpreter or on CUDA with REVGLOW_TEST_DEVICE=cuda.
"""
import pytest
import torch

try:
    from kernel_utils import FLOAT32_TOL, assert_kernel_close, kernel_device
except ImportError:  # tests/ imported as a package
    from tests.kernel_utils import FLOAT32_TOL, assert_kernel_close, kernel_device

from revglow.ops.coupling_affine import (
    coupling_affine,
    coupling_affine_inverse,
    coupling_affine_inverse_reference,
    coupling_affine_reference,
    coupling_affine_reversible_backward,
    coupling_affine_reversible_backward_reference,
)

SHAPES = [  # (channels of xa, batch, height, width); h has twice the channels
    (2, 3, 5, 7),
    (6, 1, 5, 7),
    (24, 3, 3, 3),
]
H_DTYPES = [torch.float32, torch.bfloat16]
# A gradient of h returned in bfloat16 is the float32 gradient rounded once: compare within bf16 rounding.
GRAD_H_TOL = {torch.float32: FLOAT32_TOL, torch.bfloat16: 2 ** -8}


@pytest.fixture
def device():
    return kernel_device()


def _inputs(shape, h_dtype, device):
    ca, n, hh, ww = shape
    xa = torch.randn(n, ca, hh, ww, device=device)
    # raw spread over several units so that s = sigmoid(raw + 2) is far from 1 on both sides
    h = (torch.randn(n, 2 * ca, hh, ww, device=device) * 2.0).to(h_dtype)
    return xa, h


@pytest.mark.parametrize("h_dtype", H_DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_and_inverse_match_reference(shape, h_dtype, device):
    from revglow.kernels.coupling_affine import coupling_affine_forward_launch, coupling_affine_inverse_launch

    xa, h = _inputs(shape, h_dtype, device)
    ya, logdet = coupling_affine_forward_launch(xa, h)
    ya_ref, logdet_ref = coupling_affine_reference(xa, h)
    assert ya.dtype == torch.float32 and logdet.shape == (shape[1],)
    assert_kernel_close(ya, ya_ref, name="ya")
    assert_kernel_close(logdet, logdet_ref, name="logdet")

    xa_rebuilt, logdet_inv = coupling_affine_inverse_launch(ya_ref, h)
    xa_ref, _ = coupling_affine_inverse_reference(ya_ref, h)
    assert_kernel_close(xa_rebuilt, xa_ref, name="xa")
    assert_kernel_close(logdet_inv, logdet_ref, name="logdet of the inverse call")
    assert_kernel_close(coupling_affine_inverse_launch(ya, h)[0], xa, name="round trip")


@pytest.mark.parametrize("h_dtype", H_DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_reversible_backward_matches_reference_and_autograd(shape, h_dtype, device):
    from revglow.kernels.coupling_affine import coupling_affine_reversible_backward_launch

    xa, h = _inputs(shape, h_dtype, device)
    ya, _ = coupling_affine_reference(xa, h)
    grad_ya = torch.randn_like(ya)
    grad_logdet = torch.randn(shape[1], device=device)
    got = coupling_affine_reversible_backward_launch(ya, h, grad_ya, grad_logdet)
    expected = coupling_affine_reversible_backward_reference(ya, h, grad_ya, grad_logdet)
    assert got[2].dtype == torch.float32 and got[2].shape == h.shape
    for name, a, b in zip(("xa", "grad_xa", "grad_h"), got, expected):
        assert_kernel_close(a, b, name=name)

    # Against torch autograd of the reference forward, with h upcast to float32 as a leaf.
    xa_leaf = xa.clone().requires_grad_()
    h_leaf = h.float().requires_grad_()
    ya_ref, logdet_ref = coupling_affine_reference(xa_leaf, h_leaf)
    torch.autograd.backward((ya_ref, logdet_ref), (grad_ya, grad_logdet))
    assert_kernel_close(got[0], xa, name="xa vs original")
    assert_kernel_close(got[1], xa_leaf.grad, name="grad_xa vs autograd")
    assert_kernel_close(got[2], h_leaf.grad, name="grad_h vs autograd")


@pytest.mark.parametrize("h_dtype", H_DTYPES)
@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[2]])
def test_autograd_function_matches_torch_autograd(shape, h_dtype, device):
    xa, h = _inputs(shape, h_dtype, device)
    grad_ya = torch.randn_like(xa)
    grad_logdet = torch.randn(shape[1], device=device)

    xa_ref, h_ref = xa.clone().requires_grad_(), h.clone().requires_grad_()
    ya_ref, logdet_ref = coupling_affine(xa_ref, h_ref, backend="torch")
    torch.autograd.backward((ya_ref, logdet_ref), (grad_ya, grad_logdet))

    xa_tri, h_tri = xa.clone().requires_grad_(), h.clone().requires_grad_()
    ya, logdet = coupling_affine(xa_tri, h_tri, backend="triton")
    assert ya.grad_fn.saved_tensors[0].data_ptr() == ya.data_ptr()  # keeps its output, not xa
    torch.autograd.backward((ya, logdet), (grad_ya, grad_logdet))

    assert_kernel_close(ya, ya_ref, name="ya")
    assert_kernel_close(logdet, logdet_ref, name="logdet")
    assert_kernel_close(xa_tri.grad, xa_ref.grad, name="grad xa")
    assert h_tri.grad.dtype == h_dtype
    assert_kernel_close(h_tri.grad, h_ref.grad, tol=GRAD_H_TOL[h_dtype], name="grad h")


def test_autograd_function_with_only_one_output_used(device):
    xa, h = _inputs(SHAPES[0], torch.float32, device)
    for use in ("ya", "logdet"):
        leaves_ref = [xa.clone().requires_grad_(), h.clone().requires_grad_()]
        leaves_tri = [xa.clone().requires_grad_(), h.clone().requires_grad_()]
        out_ref = coupling_affine(*leaves_ref, backend="torch")
        out_tri = coupling_affine(*leaves_tri, backend="triton")
        pick = 0 if use == "ya" else 1
        (out_ref[pick] ** 2).sum().backward()
        (out_tri[pick] ** 2).sum().backward()
        for a, b in zip(leaves_tri, leaves_ref):
            if b.grad is None or not b.grad.any():
                assert a.grad is None or not a.grad.any()
            else:
                assert_kernel_close(a.grad, b.grad, name=f"grad when only {use} is used")


def test_dispatch_entry_points_use_the_kernels(device):
    xa, h = _inputs(SHAPES[1], torch.bfloat16, device)
    ya, logdet = coupling_affine(xa, h, backend="triton")
    xa_rebuilt, logdet_inv = coupling_affine_inverse(ya, h, backend="triton")
    assert_kernel_close(xa_rebuilt, xa, name="xa")
    assert_kernel_close(logdet_inv, logdet, name="logdet")
    grad_ya, grad_logdet = torch.randn_like(ya), torch.randn(xa.shape[0], device=device)
    got = coupling_affine_reversible_backward(ya, h, grad_ya, grad_logdet, backend="triton")
    expected = coupling_affine_reversible_backward(ya, h, grad_ya, grad_logdet, backend="torch")
    for a, b in zip(got, expected):
        assert_kernel_close(a, b)


def test_channel_slices_in_and_out(device):
    """Halves sliced out of a full tensor are used in place; `out=` writes ya into a slice."""
    from revglow.kernels.coupling_affine import (
        coupling_affine_forward_launch,
        coupling_affine_reversible_backward_launch,
    )

    ca, n, hh, ww = SHAPES[0]
    x = torch.randn(n, 2 * ca, hh, ww, device=device)
    h_full = torch.randn(n, 3 * ca, hh, ww, device=device)  # h as the last 2*Ca channels of a larger tensor
    xa, h = x[:, ca:], h_full[:, ca:]
    y = torch.empty_like(x)
    y[:, :ca] = x[:, :ca]
    out, logdet = coupling_affine_forward_launch(xa, h, out=y[:, ca:])
    ya_ref, logdet_ref = coupling_affine_reference(xa, h)
    assert out.data_ptr() == y[:, ca:].data_ptr()
    assert torch.equal(y[:, :ca], x[:, :ca])
    assert_kernel_close(y[:, ca:], ya_ref, name="ya in a slice")
    assert_kernel_close(logdet, logdet_ref, name="logdet")

    grad_y = torch.randn_like(y)
    got = coupling_affine_reversible_backward_launch(y[:, ca:], h, grad_y[:, ca:], torch.ones(n, device=device))
    expected = coupling_affine_reversible_backward_reference(ya_ref, h.contiguous(), grad_y[:, ca:].contiguous(),
                                                             torch.ones(n, device=device))
    for a, b in zip(got, expected):
        assert_kernel_close(a, b)

    # the reversible backward writes xa and dL/dxa into the transformed halves of full-size tensors
    x_rebuilt = torch.full_like(x, float("nan"))
    grad_x = torch.full_like(x, float("nan"))
    xa_out, grad_xa_out, grad_h = coupling_affine_reversible_backward_launch(
        y[:, ca:], h, grad_y[:, ca:], torch.ones(n, device=device), out_xa=x_rebuilt[:, ca:],
        out_grad_xa=grad_x[:, ca:])
    assert xa_out.data_ptr() == x_rebuilt[:, ca:].data_ptr() and grad_xa_out.data_ptr() == grad_x[:, ca:].data_ptr()
    for a, b in zip((x_rebuilt[:, ca:], grad_x[:, ca:], grad_h), expected):
        assert_kernel_close(a, b)
    assert torch.isnan(x_rebuilt[:, :ca]).all() and torch.isnan(grad_x[:, :ca]).all()  # other half untouched

    with pytest.raises(ValueError, match="out"):
        coupling_affine_forward_launch(xa, h, out=torch.empty(n, ca, ww, hh, device=device).transpose(2, 3))
    with pytest.raises(ValueError, match="out_xa"):
        coupling_affine_reversible_backward_launch(y[:, ca:], h, grad_y[:, ca:], torch.ones(n, device=device),
                                                   out_xa=torch.empty(n, ca + 1, hh, ww, device=device))


def test_extreme_raw_values_stay_finite(device):
    """log s and 1 - s for s = sigmoid(raw + 2) saturated on either side."""
    from revglow.kernels.coupling_affine import (
        coupling_affine_forward_launch,
        coupling_affine_reversible_backward_launch,
    )

    xa = torch.randn(2, 3, 3, 5, device=device)
    h = torch.randn(2, 6, 3, 5, device=device)
    h[:, 3:] = torch.tensor([-60.0, -20.0, 30.0], device=device).view(1, 3, 1, 1) + h[:, 3:]
    ya, logdet = coupling_affine_forward_launch(xa, h)
    ya_ref, logdet_ref = coupling_affine_reference(xa, h)
    assert_kernel_close(ya, ya_ref, name="ya")
    assert_kernel_close(logdet, logdet_ref, name="logdet")
    grad_ya = torch.randn_like(ya)
    _, grad_xa, grad_h = coupling_affine_reversible_backward_launch(ya_ref, h, grad_ya, torch.ones(2, device=device))
    assert torch.isfinite(grad_xa).all() and torch.isfinite(grad_h).all()
    xa_leaf, h_leaf = xa.clone().requires_grad_(), h.clone().requires_grad_()
    torch.autograd.backward(coupling_affine_reference(xa_leaf, h_leaf), (grad_ya, torch.ones(2, device=device)))
    assert_kernel_close(grad_h, h_leaf.grad, name="grad_h")


def test_launchers_reject_bad_shapes(device):
    from revglow.kernels.coupling_affine import coupling_affine_forward_launch

    xa, h = _inputs(SHAPES[0], torch.float32, device)
    with pytest.raises(ValueError, match="h must have shape"):
        coupling_affine_forward_launch(xa, h[:, 1:])
    with pytest.raises(TypeError, match="float32"):
        coupling_affine_forward_launch(xa.double(), h)


def test_backward_without_rebuilt_input(device):
    from revglow.kernels.coupling_affine import coupling_affine_reversible_backward_launch

    xa, h = _inputs(SHAPES[0], torch.bfloat16, device)
    ya, _ = coupling_affine_reference(xa, h)
    grad_ya, grad_logdet = torch.randn_like(ya), torch.randn(xa.shape[0], device=device)
    full = coupling_affine_reversible_backward_launch(ya, h, grad_ya, grad_logdet)
    lean = coupling_affine_reversible_backward_launch(ya, h, grad_ya, grad_logdet, return_input=False)
    assert lean[0] is None
    assert torch.equal(lean[1], full[1]) and torch.equal(lean[2], full[2])
