"""The coupling network op in either memory format (revglow.ops.coupling_network, `memory_format=`): channels_last
computes the contiguous path's map and gradients (float64, every option, both backward paths, the ReLU gradient
written over the ReLU output a slice at a time), keeps what it saves for backward in channels_last, answers in
NCHW, and keeps the low-precision handling under autocast; and the layout-aware convolutions underneath
(revglow.ops.conv_same) are exact in channels_last, the 1x1 layer's matrix products included."""
import itertools

import pytest
import torch
import torch.nn.functional as F

import revglow.ops.coupling_network as network_op
from network_weights import coupling_network_weights
from flow_checks import rel_err
from revglow.ops.conv_same import (add_edge_padding, conv1x1, conv2d_same, conv2d_same_backward,
                                   conv2d_same_input_grad, stored_channels_last)
from revglow.ops.coupling_network import coupling_network, coupling_network_reference, resolve_memory_format

CL = torch.channels_last
OPTIONS = list(itertools.product([True, False], [True, False], [True, False]))   # actnorm, edge padding, out scale


def _weights(c_in, c_out, hidden, actnorm, edge_padding, out_scale, dtype=torch.float64):
    return coupling_network_weights(c_in, c_out, hidden, actnorm, edge_padding, out_scale, dtype, seed=5)


def _run(x, weights, edge_padding, grad_out, **kwargs):
    inputs = [x] + [w for w in weights if w is not None]
    out = coupling_network(x, *weights, edge_padding, **kwargs)
    return out, torch.autograd.grad(out, inputs, grad_out)


@pytest.mark.parametrize("actnorm,edge_padding,out_scale", OPTIONS)
@pytest.mark.parametrize("release", [True, False])
def test_channels_last_is_the_contiguous_map_with_its_gradients(actnorm, edge_padding, out_scale, release):
    # batch 1 and 3, odd H x W, a strided x (the flow's channel slice), a hidden width that is not a power of two
    for n, c_in, c_out, hidden, h, w in ((1, 3, 4, 7, 5, 9), (3, 2, 6, 5, 4, 3)):
        weights = _weights(c_in, c_out, hidden, actnorm, edge_padding, out_scale)
        x = torch.randn(n, 2 * c_in, h, w, dtype=torch.float64)[:, :c_in].requires_grad_(True)
        grad_out = torch.randn(n, c_out, h, w, dtype=torch.float64)
        expected = coupling_network_reference(x, *weights, edge_padding)
        want = torch.autograd.grad(expected, [x] + [t for t in weights if t is not None], grad_out)
        for layout in ("contiguous", "channels_last"):
            out, got = _run(x, weights, edge_padding, grad_out, release=release, memory_format=layout)
            assert out.is_contiguous() and rel_err(out, expected) < 1e-13
            assert layout == "contiguous" or got[0].is_contiguous()   # dL/dx back in the flow's NCHW
            for a, b in zip(got, want):
                assert rel_err(a, b) < 1e-12, layout


@pytest.mark.parametrize("n", [5, 2])   # slices along the batch (5 samples, 4 pieces), along the channels (2 < 4)
@pytest.mark.parametrize("actnorm, edge_padding", [(False, False), (True, True)])
def test_relu_gradients_written_a_slice_at_a_time_in_channels_last(monkeypatch, n, actnorm, edge_padding):
    """Pieces small enough that the hidden tensors are cut into four: along the channels a slice of a
    channels_last tensor is strided, and the stand-in for its input is hidden's storage in channels_last."""
    monkeypatch.setattr(network_op, "_PIECE_BYTES", 64)
    weights = _weights(3, 4, 7, actnorm, edge_padding, True)
    x = torch.randn(n, 3, 5, 6, dtype=torch.float64, requires_grad=True)
    grad_out = torch.randn(n, 4, 5, 6, dtype=torch.float64)
    expected = coupling_network_reference(x, *weights, edge_padding)
    want = torch.autograd.grad(expected, [x] + [t for t in weights if t is not None], grad_out)
    _, got = _run(x, weights, edge_padding, grad_out, release=True, memory_format="channels_last")
    for a, b in zip(got, want):
        assert rel_err(a, b) < 1e-12


def test_the_stand_in_is_hidden_storage_in_its_layout():
    hidden = torch.randn(2, 8, 3, 5, dtype=torch.float64).contiguous(memory_format=CL)
    stand_in = network_op._stand_in(hidden, (2, 3, 3, 5))
    assert stand_in.shape == (2, 3, 3, 5) and stored_channels_last(stand_in)
    assert stand_in.untyped_storage().data_ptr() == hidden.untyped_storage().data_ptr()
    assert network_op._stand_in(hidden[:, :, :2], (2, 3, 2, 5)) is None   # neither layout: one is allocated


@pytest.mark.parametrize("release", [True, False])
def test_what_is_kept_for_backward_is_channels_last_and_the_output_nchw(release):
    weights = [None if w is None else w.detach().float().requires_grad_(True)
               for w in _weights(3, 4, 16, True, True, True, torch.float64)]
    x = torch.randn(2, 3, 6, 5, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = coupling_network(x, *weights, True, release=release, memory_format="channels_last")
    assert out.is_contiguous() and not stored_channels_last(out)
    wide = [t for t in saved if t.dim() == 4 and t.shape[1] == 16 and t.shape[2:] == (6, 5)]
    assert len(wide) == (0 if release else 2) and all(stored_channels_last(t) for t in wide)
    if release:   # held by the Function itself, freed as its backward goes
        hidden = out.grad_fn.hidden
        assert len(hidden) == 2 and all(stored_channels_last(t) for t in hidden)


def test_auto_takes_channels_last_where_the_hidden_tensor_is_large_against_the_weights():
    """The measured rule (revglow.ops.coupling_network, beside resolve_memory_format), at the 256x256 model's
    levels (batch 1, width 512, edge padding) and the 32x32 model's (batch 16, width 128): channels_last for the
    first three 256x256 levels (128x128 to 32x32, 6 to 96 channels in) and the first two 32x32 ones, contiguous
    where the input has many channels and few pixels (16x16 and 384 channels in, 4x4 and 96 at batch 16)."""
    def layout(n, c_in, side, hidden):
        x = torch.empty(n, c_in, side, side, device="meta")
        w_in = torch.empty(hidden, c_in + 1, 3, 3, device="meta")
        w_out = torch.empty(2 * c_in, hidden + 1, 3, 3, device="meta")
        return resolve_memory_format("auto", x, w_in, w_out)
    nchw = torch.contiguous_format
    assert [layout(1, 6 * 4 ** level, 128 >> level, 512) for level in range(6)] == [CL, CL, CL, nchw, nchw, nchw]
    assert [layout(16, 6 * 4 ** level, 16 >> level, 128) for level in range(3)] == [CL, CL, nchw]
    x, w = torch.empty(1, 6, 8, 8), torch.empty(4, 7, 3, 3)
    assert resolve_memory_format("channels_last", x, w, w) == CL
    assert resolve_memory_format("contiguous", x, w, w) == torch.contiguous_format
    with pytest.raises(ValueError, match="memory_format='nhwc' is not a known option"):
        resolve_memory_format("nhwc", x, w, w)


@pytest.mark.parametrize("kernel, edge_padding, c_out", [(1, False, 7), (3, True, 2), (3, True, 9), (3, False, 4)])
def test_convolutions_in_channels_last_are_exact(kernel, edge_padding, c_out):
    """conv2d_same / conv1x1 and their gradients (a slice of channels or of the batch too) answer in channels_last
    for a channels_last input, with autograd's NCHW numbers; the 1x1 kernel runs as matrix products."""
    n, c, h, w = 3, 5, 4, 7
    x = torch.randn(n, c, h, w, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(c_out, c + int(edge_padding and kernel > 1), kernel, kernel, dtype=torch.float64)
    bias = torch.randn(c_out, dtype=torch.float64)
    grad = torch.randn(n, c_out, h, w, dtype=torch.float64)
    want = conv2d_same(x, weight, bias, edge_padding)
    want_x, = torch.autograd.grad(want, x, grad)
    want_w = torch.autograd.grad(conv2d_same(x.detach(), weight.requires_grad_(True), bias, edge_padding), weight,
                                 grad)[0]
    weight = weight.detach()
    x_cl, grad_cl = x.detach().contiguous(memory_format=CL), grad.contiguous(memory_format=CL)
    out = conv1x1(x_cl, weight, bias) if kernel == 1 else conv2d_same(x_cl, weight, bias, edge_padding)
    assert stored_channels_last(out) and rel_err(out, want) < 1e-14
    got_x, got_w = conv2d_same_backward(grad_cl, x_cl, weight, edge_padding)
    assert rel_err(got_x, want_x) < 1e-14 and rel_err(got_w, want_w) < 1e-14
    assert got_x.stride(1) == 1   # channels innermost (from a padded input: a view of the padded input's gradient)
    part = slice(1, 4)
    got = conv2d_same_input_grad(grad_cl, (n, 3, h, w), weight, part)
    assert stored_channels_last(got) and rel_err(got, want_x[:, part]) < 1e-14
    got = conv2d_same_input_grad(grad_cl[1:], x_cl[1:], weight)
    assert rel_err(got, want_x[1:]) < 1e-14


def test_edge_padding_keeps_channels_last():
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    padded = add_edge_padding(x.contiguous(memory_format=CL), 1)
    assert stored_channels_last(padded) and torch.equal(padded, add_edge_padding(x, 1))


def test_the_1x1_layer_in_channels_last_runs_as_one_matrix_product():
    r = torch.randn(2, 16, 4, 4).contiguous(memory_format=CL)
    w, b = torch.randn(16, 16, 1, 1), torch.randn(16)
    with torch.profiler.profile() as prof:
        out = conv1x1(r, w, b)
    names = {e.name for e in prof.events()}   # (addmm's copy_ is the bias broadcast into its own output)
    assert "aten::addmm" in names and not names & {"aten::convolution", "aten::bmm", "aten::clone"}, names
    assert stored_channels_last(out)
    assert torch.allclose(out, F.conv2d(r, w, b), atol=1e-5)


def test_under_bf16_autocast_channels_last_matches_contiguous():
    """Autocast's handling (the weights folded in float32, the convolutions and what is kept for backward in
    bfloat16, gradients back in float32) in channels_last: within bfloat16's error of the contiguous path."""
    weights = [None if w is None else w.detach().float().requires_grad_(True)
               for w in _weights(3, 4, 32, True, True, True)]
    x = torch.randn(2, 3, 6, 7, requires_grad=True)
    grad_out = torch.randn(2, 4, 6, 7)
    results = {}
    for layout in ("contiguous", "channels_last"):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, grads = _run(x, weights, True, grad_out, release=True, memory_format=layout)
        assert out.dtype == torch.bfloat16 and out.is_contiguous()
        assert all(g.dtype == torch.float32 for g in grads)
        results[layout] = [out] + list(grads)
    for a, b in zip(results["channels_last"], results["contiguous"]):
        assert rel_err(a, b) < 2e-2   # bfloat16 rounds to 2**-8 relative; sums of products differ in order


@pytest.mark.parametrize("release, n", [(True, 4), (True, 2), (False, 4)])
def test_the_channels_last_backward_copies_no_wide_tensor(monkeypatch, release, n):
    """In channels_last nothing wide is converted between layouts: each stand-in for a slice's input is stored as
    the gradient is (else the convolution's backward copies the gradient to the stand-in's layout), the 1x1 layer
    reads the pixels as they are. Pieces of a quarter: along the batch (n=4), along the channels (n=2)."""
    monkeypatch.setattr(network_op, "_PIECE_BYTES", 1024)
    c_in, hidden, c_out, side = 3, 32, 6, 16
    weights = [w.detach().float().requires_grad_(True) if w is not None else None
               for w in _weights(c_in, c_out, hidden, True, True, True)]
    x = torch.randn(n, c_in, side, side, requires_grad=True)
    out = coupling_network(x, *weights, True, release=release, memory_format="channels_last")
    with torch.profiler.profile(record_shapes=True) as prof:
        out.backward(torch.randn_like(out))
    wide = n * hidden * side * side // 4   # a quarter (no copy of a piece either); the weights are smaller
    copies = [(e.name, e.input_shapes) for e in prof.events()
              if e.name in ("aten::copy_", "aten::clone", "aten::contiguous", "aten::to", "aten::_to_copy")
              and any(shape and torch.Size(shape).numel() >= wide for shape in e.input_shapes)]
    assert not copies, copies


@pytest.mark.parametrize("release", [True, False])
def test_channels_last_double_backward_and_a_second_backward(release):
    """create_graph differentiates the reference (the same map: gradcheck), and a second backward through the same
    graph (retain_graph) recomputes in channels_last what the first one overwrote: the same gradients."""
    weights = _weights(2, 4, 5, True, True, True)
    leaves = [w for w in weights if w is not None]
    slots = [i for i, w in enumerate(weights) if w is not None]
    x = torch.randn(2, 2, 3, 4, dtype=torch.float64, requires_grad=True)

    def fn(x, *leaves):
        full = list(weights)
        for i, t in zip(slots, leaves):
            full[i] = t
        return coupling_network(x, *full, True, release=release, memory_format="channels_last")

    assert torch.autograd.gradgradcheck(fn, [x] + leaves)
    grad_out = torch.randn(2, 4, 3, 4, dtype=torch.float64)
    out = fn(x, *leaves)
    first = torch.autograd.grad(out, [x] + leaves, grad_out, retain_graph=True)
    again = torch.autograd.grad(out, [x] + leaves, grad_out)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
