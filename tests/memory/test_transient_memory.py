"""The coupling network as one memory-lean op (revglow.ops.coupling_network) and the transient it leaves in a
reversible training step: the same map and gradients as plain autograd of the reference composition (float64,
every option, every memory mode), higher-order and repeated backwards, and a peak that counts at most two wide
hidden tensors and a mask, in float32 and under bfloat16 autocast."""
import copy
import itertools

import pytest
import torch

from flow_checks import perturb_, rel_err
from revglow.glow.layers.coupling import CouplingNetwork
from revglow.glow.layers.flowstep import FlowStep
from revglow.ops.conv_same import add_edge_padding, conv2d_same, conv2d_same_backward
from revglow.ops.coupling_network import coupling_network, coupling_network_reference
from revglow.memory.live_storage import LiveStorageTracker
from revglow.engine.sequence import ReversibleSequence

OPTIONS = list(itertools.product([True, False], [True, False], [True, False]))   # actnorm, edge padding, out scale


def _weights(c_in, c_out, hidden, actnorm, edge_padding, out_scale, dtype=torch.float64):
    g = torch.Generator().manual_seed(1)

    def rand(*shape, low=None):
        t = torch.randn(*shape, generator=g, dtype=dtype) if low is None else \
            torch.rand(*shape, generator=g, dtype=dtype) + low
        return t.requires_grad_(True)

    e = int(edge_padding)
    return [rand(hidden, c_in + e, 3, 3) * 0.4, None if actnorm else rand(hidden),
            rand(hidden, low=0.5) if actnorm else None, rand(hidden) if actnorm else None,
            rand(hidden, hidden, 1, 1) * 0.4, None if actnorm else rand(hidden),
            rand(hidden, low=0.5) if actnorm else None, rand(hidden) if actnorm else None,
            rand(c_out, hidden + e, 3, 3) * 0.4, rand(c_out), rand(c_out, low=0.5) if out_scale else None]


def _leaves(weights):
    return [w for w in weights if w is not None]


@pytest.mark.parametrize("actnorm,edge_padding,out_scale", OPTIONS)
@pytest.mark.parametrize("release", [False, True])
def test_the_op_is_the_reference_map_with_its_gradients(actnorm, edge_padding, out_scale, release):
    # awkward shapes: batch 1, odd H x W, 3 input channels, a hidden width not a power of two
    for n, c_in, c_out, hidden, h, w in ((1, 3, 4, 7, 5, 9), (3, 2, 6, 5, 1, 4)):
        weights = _weights(c_in, c_out, hidden, actnorm, edge_padding, out_scale)
        x = torch.randn(n, c_in, h, w, dtype=torch.float64, requires_grad=True)
        grad_out = torch.randn(n, c_out, h, w, dtype=torch.float64)
        inputs = [x] + _leaves(weights)
        out = coupling_network(x, *weights, edge_padding, release=release)
        expected = coupling_network_reference(x, *weights, edge_padding)
        assert rel_err(out, expected) < 1e-13
        got = torch.autograd.grad(out, inputs, grad_out)
        want = torch.autograd.grad(expected, inputs, grad_out)
        for a, b in zip(got, want):
            assert rel_err(a, b) < 1e-12


@pytest.mark.parametrize("release", [False, True])
def test_gradcheck_double_backward_and_a_second_backward(release):
    weights = _weights(2, 4, 5, True, True, True)
    leaves = _leaves(weights)
    x = torch.randn(2, 2, 3, 4, dtype=torch.float64, requires_grad=True)
    slots = [i for i, w in enumerate(weights) if w is not None]

    def fn(x, *leaves):
        full = list(weights)
        for i, t in zip(slots, leaves):
            full[i] = t
        return coupling_network(x, *full, True, release=release)

    assert torch.autograd.gradcheck(fn, [x] + leaves)
    # create_graph: the higher-order gradient is that of the reference
    grad_out = torch.randn(2, 4, 3, 4, dtype=torch.float64)
    second = []
    for net in (lambda: fn(x, *leaves), lambda: coupling_network_reference(x, *weights, True)):
        gx, = torch.autograd.grad((net() * grad_out).sum(), x, create_graph=True)
        second.append(torch.autograd.grad(gx.square().sum(), [x] + leaves, allow_unused=True))
    for a, b in zip(*second):   # the output bias does not reach dL/dx: unused in both
        assert (a is None) == (b is None) and (a is None or rel_err(a, b) < 1e-12)
    # retain_graph: a second backward gets the same gradients (recomputing what the first one freed)
    out = fn(x, *leaves)
    first = torch.autograd.grad(out, [x] + leaves, grad_out, retain_graph=True)
    again = torch.autograd.grad(out, [x] + leaves, grad_out)
    assert all(torch.equal(a, b) for a, b in zip(first, again))


def test_edge_padded_convolution_backward_in_both_forms():
    for c_in, c_out in ((5, 2), (2, 5)):   # border added to the output, and padded input
        x = torch.randn(2, c_in, 4, 7, dtype=torch.float64, requires_grad=True)
        w = torch.randn(c_out, c_in + 1, 3, 3, dtype=torch.float64, requires_grad=True)
        out = conv2d_same(x, w, None, True)
        expected = torch.nn.functional.conv2d(add_edge_padding(x, 1), w)
        assert rel_err(out, expected) < 1e-14
        g = torch.randn_like(out)
        want = torch.autograd.grad(expected, [x, w], g)
        got = conv2d_same_backward(g, x.detach(), w.detach(), True)
        assert rel_err(got[0], want[0]) < 1e-13 and rel_err(got[1], want[1]) < 1e-13
        only_x = conv2d_same_backward(g, x.shape, w.detach(), True, weight_grad=False)
        assert only_x[1] is None and rel_err(only_x[0], want[0]) < 1e-13


def _sequence(memory, nn_actnorm, context_channels=0, channels=6, hidden=8, depth=3, dtype=torch.float64):
    torch.manual_seed(0)
    steps = [FlowStep(channels, hidden, coupling="affine", kernels="torch", seed=i, context_channels=context_channels,
                      nn_actnorm=nn_actnorm, edge_padding=True, zero_logscale_factor=3.0,
                      actnorm_logscale_factor=3.0) for i in range(depth)]
    return ReversibleSequence(steps, memory=memory).to(dtype)


def _through_submodules(seq):
    """The same model with every coupling network run through its submodules (a hook on a submodule turns the
    one-op path off): plain autograd of the reference composition, the oracle."""
    for m in seq.modules():
        if isinstance(m, CouplingNetwork):
            m.conv_in.register_forward_hook(lambda *args: None)
    return seq


@pytest.mark.parametrize("memory", ["reversible", "checkpoint", "autograd"])
@pytest.mark.parametrize("nn_actnorm", [True, False])
@pytest.mark.parametrize("context_channels", [0, 2])
def test_every_memory_mode_matches_plain_autograd_of_the_reference_network(memory, nn_actnorm, context_channels):
    seq = _sequence(memory, nn_actnorm, context_channels)
    x = torch.randn(3, 6, 5, 7, dtype=torch.float64)
    context = torch.randn(3, context_channels, 5, 7, dtype=torch.float64) if context_channels else None
    with torch.no_grad():
        seq(x, context)                       # data-dependent init of every ActNorm
    perturb_(seq, std=0.03)                   # a generic map that stays well conditioned (affine steps divide)
    oracle = _through_submodules(copy.deepcopy(seq))
    oracle.memory = "autograd"
    nets = [m for m in seq.modules() if isinstance(m, CouplingNetwork)]
    assert nets and all(m._runs_as_one_op([n for n in (m.norm_in, m.norm_hidden) if n is not None]) for m in nets)
    results = []
    for model in (seq, oracle):
        xi = x.clone().requires_grad_(True)
        ci = context.clone().requires_grad_(True) if context is not None else None
        y, logdet = model(xi, ci)
        (y.square().sum() + logdet.sum()).backward()
        extra = [ci.grad] if ci is not None else []
        results.append([y, logdet, xi.grad] + extra + [p.grad for p in model.parameters()])
    assert len(results[0]) == len(results[1])
    if memory == "reversible":
        assert seq.last_reconstruction_error.max() < 1e-10
    for a, b in zip(*results):
        assert rel_err(a, b) < 1e-10


def _peak_of_training_step(seq, x, autocast_dtype=None):
    with torch.no_grad():
        seq(x)
    with LiveStorageTracker() as tracker:
        with torch.autocast("cpu", dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
            y, logdet = seq(x.clone().requires_grad_(True))
        (y.square().sum() + logdet.sum()).backward()
    return tracker.peak


def test_reversible_step_keeps_at_most_two_wide_tensors_and_a_mask(monkeypatch):
    # The op writes a ReLU gradient over its output a piece at a time only for hidden tensors of 4 MiB and more
    # (below, one piece costs fewer calls and a 1 MiB transient does not matter; the size rule has its own test in
    # tests/ops/test_coupling_network_pieces.py). Here the pieces are made small, so that this step, small enough
    # for the suite, runs the piecewise path that the 256x256 model's 32 MiB hidden tensors take.
    from revglow.ops import coupling_network as network_op
    monkeypatch.setattr(network_op, "_PIECE_BYTES", 64 * 1024)
    channels, hidden, n, h, w = 4, 128, 2, 32, 32
    seq = _sequence("reversible", True, channels=channels, hidden=hidden, depth=3, dtype=torch.float32)
    x = torch.randn(n, channels, h, w)
    # sizes, counted here independently of the code: a hidden tensor of the network, its boolean mask, a flow
    # tensor (a step's input, output, their gradients, halves), the parameters (their gradients, the folded
    # weights and the gradients of those)
    wide = n * hidden * h * w * 4
    mask = n * hidden * h * w
    flow = n * channels * h * w * 4
    params = sum(p.numel() * 4 for p in seq.parameters())
    bound = 2 * wide + mask + 16 * flow + 3 * params
    lean = _peak_of_training_step(seq, x)
    assert lean <= bound, (lean / wide, bound / wide)
    # the bound tells the two apart: plain autograd of the network keeps about five wide tensors at its peak
    plain = _peak_of_training_step(_through_submodules(copy.deepcopy(seq)), x)
    assert plain > bound + 1.5 * wide, (plain / wide, bound / wide)
    assert 2 * wide < bound < 4 * wide


def test_under_bf16_autocast_the_step_keeps_the_lean_ops_saving():
    """Under autocast the op runs in bfloat16 and keeps its hidden tensors there: the peak of a reversible training
    step is at most float32's (the plain composition autocast would otherwise run keeps several times more)."""
    channels, hidden, n, h, w = 4, 128, 2, 32, 32
    seq = _sequence("reversible", True, channels=channels, hidden=hidden, depth=3, dtype=torch.float32)
    x = torch.randn(n, channels, h, w)
    wide = n * hidden * h * w * 4
    fp32 = _peak_of_training_step(seq, x)
    bf16 = _peak_of_training_step(seq, x, torch.bfloat16)
    assert bf16 <= fp32, (bf16 / wide, fp32 / wide)
    # the check tells the two apart: autocast's run of the plain composition keeps several hidden tensors, some of
    # them float32 (measured, in wide float32 tensors: 1.6 at the lean bfloat16 peak, 2.9 in float32, 6.5 plain)
    plain = _peak_of_training_step(_through_submodules(copy.deepcopy(seq)), x, torch.bfloat16)
    assert plain > bf16 + 1.5 * wide, (plain / wide, bf16 / wide)
