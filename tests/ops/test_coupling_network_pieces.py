"""The coupling network op's backward (revglow.ops.coupling_network): the input gradient of each convolution
(revglow.ops.conv_same.conv2d_same_input_grad) for a slice of channels or of the batch, the ReLU gradient written
over the ReLU output a slice at a time, and what the backward no longer does (a boolean mask applied by masked_fill_,
a full-size copy of a stand-in input), which made the small training step 20% slower."""
import pytest
import torch

import revglow.ops.coupling_network as network_op
from flow_checks import rel_err
from network_weights import coupling_network_weights
from revglow.ops.conv_same import conv2d_same, conv2d_same_input_grad
from revglow.ops.coupling_network import coupling_network, coupling_network_reference

SHAPES = [(3, 5, 4, 7), (1, 6, 5, 3)]   # (batch, input channels, H, W): odd sizes, batch 1


@pytest.mark.parametrize("n, c, h, w", SHAPES)
@pytest.mark.parametrize("kernel, edge_padding, out_channels", [(3, True, 2), (3, True, 9), (3, False, 4),
                                                                  (1, False, 7)])
def test_input_grad_of_a_slice_of_channels_or_of_the_batch(n, c, h, w, kernel, edge_padding, out_channels):
    """Both edge-padding forms (border added to a narrow output, or a padded wide input), zero padding and 1x1:
    the input gradient of any slice is that slice of autograd's, whatever stands for the input."""
    x = torch.randn(n, c, h, w, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(out_channels, c + int(edge_padding and kernel > 1), kernel, kernel, dtype=torch.float64)
    grad = torch.randn(n, out_channels, h, w, dtype=torch.float64)
    want, = torch.autograd.grad(conv2d_same(x, weight, None, edge_padding), x, grad)
    x = x.detach()
    assert rel_err(conv2d_same_input_grad(grad, x.shape, weight), want) < 1e-13
    assert rel_err(conv2d_same_input_grad(grad, x, weight), want) < 1e-13
    part = slice(1, c - 1)
    strided = x[:, part]   # a strided view stands in as well as a shape
    got = conv2d_same_input_grad(grad, strided, weight, part)
    assert got.shape == strided.shape and rel_err(got, want[:, part]) < 1e-13
    first = max(1, n - 1)
    got = conv2d_same_input_grad(grad[:first], x[:first], weight)
    assert rel_err(got, want[:first]) < 1e-13
    with pytest.raises(ValueError, match="input of 2 channels"):
        conv2d_same_input_grad(grad, (n, 2, h, w), weight, slice(0, 1))


def _weights(c_in, c_out, hidden, actnorm, edge_padding):
    return coupling_network_weights(c_in, c_out, hidden, actnorm, edge_padding, seed=3)


@pytest.mark.parametrize("n", [5, 2])   # slices along the batch (5 samples, 4 pieces), along the channels (2 < 4)
@pytest.mark.parametrize("actnorm, edge_padding", [(False, False), (True, True)])
def test_gradients_written_over_the_relu_outputs_a_slice_at_a_time(monkeypatch, n, actnorm, edge_padding):
    """With pieces small enough that a small network is cut into four (along the batch, or along the channels when
    the batch is smaller), the release path's gradients are the reference's (float64)."""
    monkeypatch.setattr(network_op, "_PIECE_BYTES", 64)
    hidden = 7
    weights = _weights(3, 4, hidden, actnorm, edge_padding)
    x = torch.randn(n, 3, 5, 6, dtype=torch.float64, requires_grad=True)
    r = torch.empty(n, hidden, 5, 6, dtype=torch.float64)
    assert network_op._pieces(r) == ((0, 2) if n == 5 else (1, 2))
    grad_out = torch.randn(n, 4, 5, 6, dtype=torch.float64)
    inputs = [x] + [w for w in weights if w is not None]
    want = torch.autograd.grad(coupling_network_reference(x, *weights, edge_padding), inputs, grad_out)
    for release in (True, False):
        got = torch.autograd.grad(coupling_network(x, *weights, edge_padding, release=release), inputs, grad_out)
        for a, b in zip(got, want):
            assert rel_err(a, b) < 1e-12


def test_pieces_are_a_quarter_of_a_wide_tensor_or_one_small_one():
    assert network_op._pieces(torch.empty(1, 512, 128, 128)) == (1, 128)   # 32 MiB at batch 1: four of 8 MiB
    assert network_op._pieces(torch.empty(16, 512, 32, 32)) == (0, 4)      # 32 MiB: four slices of 4 samples
    assert network_op._pieces(torch.empty(16, 128, 32, 32)) == (0, 8)      # 8 MiB: two of 4 MiB
    assert network_op._pieces(torch.empty(1, 512, 64, 64)) == (1, 256)     # 8 MiB at batch 1: two of 256 channels
    assert network_op._pieces(torch.empty(16, 128, 16, 16)) == (0, 16)     # 2 MiB: one
    assert network_op._pieces(torch.empty(2, 128, 32, 32)) == (0, 2)       # 1 MiB: one


@pytest.mark.parametrize("release", [True, False])
def test_the_backward_runs_no_mask_and_copies_no_wide_tensor(release):
    """What made the op slower than plain autograd at 32x32: masked_fill_ with a boolean mask (ten times slower
    than ReLU's own threshold_backward on the CPU), and the convolutions' input gradients computed from an expanded
    scalar standing for the input, which the CPU backend copies to full size. Neither runs any more."""
    n, c_in, hidden, c_out, side = 4, 3, 32, 6, 8
    weights = [w.detach().float().requires_grad_(True) if w is not None else None
               for w in _weights(c_in, c_out, hidden, False, False)]
    x = torch.randn(n, c_in, side, side, requires_grad=True)
    out = coupling_network(x, *weights, False, release=release)
    with torch.profiler.profile(record_shapes=True) as prof:
        out.backward(torch.randn_like(out))
    ops = [(e.name, e.input_shapes) for e in prof.events()]
    names = {name for name, _ in ops}
    assert "aten::threshold_backward" in names
    assert not names & {"aten::masked_fill_", "aten::le", "aten::gt", "aten::where"}, names
    wide = n * hidden * side * side
    copies = [(name, shapes) for name, shapes in ops if name in ("aten::copy_", "aten::clone", "aten::contiguous")
              and any(shape and torch.Size(shape).numel() >= wide for shape in shapes)]
    assert not copies, copies
