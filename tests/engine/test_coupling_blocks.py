"""Coupling building blocks around users' own networks: bijections with the right log-determinant, exact
gradients through the reversible engine, each network run once in the reversible backward, clear errors."""
import pytest
import torch
from torch import nn

from flow_checks import brute_force_logdet, flat_grads, perturb_, rel_err
from revglow import AdditiveCoupling, AffineCoupling, Glow, GlowConfig, ReversibleSequence, TwoNetworkCoupling
from revglow.engine.coupling import _OneNetworkCoupling


def _net(c_in, c_out, hidden=6):
    return nn.Sequential(nn.Conv2d(c_in, hidden, 3, padding=1), nn.Tanh(), nn.Conv2d(hidden, c_out, 3, padding=1))


def _block(kind, channels=5, split=None, context=0):
    b = channels // 2 if split is None else split
    a = channels - b
    if kind == "additive":
        return AdditiveCoupling(_net(b + context, a), split=split)
    if kind == "affine":
        return AffineCoupling(_net(b + context, 2 * a), split=split, kernels="torch")
    return TwoNetworkCoupling(_net(a + context, b), _net(b + context, a), split=split)


KINDS = ["additive", "affine", "two_network"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("split", [None, 1, 3])
def test_blocks_are_bijections_with_the_brute_force_logdet(kind, split):
    torch.manual_seed(0)
    block = perturb_(_block(kind, split=split).double(), std=0.2)
    x = torch.randn(2, 5, 3, 3, dtype=torch.float64)
    y, logdet = block(x)
    x_back, logdet_back = block.inverse(y)
    assert rel_err(x_back, x) < 1e-12 and rel_err(logdet_back, logdet) < 1e-12
    expected = brute_force_logdet(lambda v: block(v)[0], x)
    assert torch.allclose(logdet, expected, atol=1e-10)
    if kind != "affine":
        assert torch.equal(logdet, torch.zeros(2, dtype=torch.float64))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("with_context", [False, True])
def test_inverse_vjp_equals_autograd(kind, with_context):
    torch.manual_seed(1)
    block = perturb_(_block(kind, context=2 if with_context else 0).double(), std=0.2)
    x = torch.randn(3, 5, 4, 4, dtype=torch.float64, requires_grad=True)
    c = torch.randn(3, 2, 4, 4, dtype=torch.float64, requires_grad=True) if with_context else None
    y, logdet = block(x, c) if with_context else block(x)
    grad_y, grad_logdet = torch.randn_like(y), torch.randn_like(logdet)
    params = list(block.parameters())
    inputs = [x] + ([c] if with_context else []) + params
    expected = torch.autograd.grad([y, logdet] if logdet.requires_grad else [y],
                                   inputs, [grad_y, grad_logdet] if logdet.requires_grad else [grad_y])
    args = (y.detach(), grad_y, grad_logdet) + ((c.detach().requires_grad_(),) if with_context else ())
    out = block.inverse_vjp(*args)
    x_back, grad_x, param_grads = out[:3]
    assert rel_err(x_back, x) < 1e-12
    assert rel_err(grad_x, expected[0]) < 1e-12
    if with_context:
        assert rel_err(out[3], expected[1]) < 1e-12
    for p, g in zip(params, expected[1 + with_context:]):
        assert rel_err(param_grads[p], g) < 1e-12


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode", ["reversible", "checkpoint"])
def test_stacks_train_like_autograd_and_input_may_not_require_grad(kind, mode):
    def stack(memory):
        torch.manual_seed(2)
        return ReversibleSequence([perturb_(_block(kind, channels=4), std=0.1, seed=i) for i in range(4)],
                                  memory=memory).double()

    ref, seq = stack("autograd"), stack(mode)
    seq.load_state_dict(ref.state_dict())
    for requires_grad in (True, False):
        x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
        for s in (ref, seq):
            s.zero_grad()
            xi = x.clone().requires_grad_(requires_grad)
            y, logdet = s(xi)
            (y.square().sum() - logdet.sum()).backward()
            s.input_grad = xi.grad
        assert rel_err(flat_grads(seq), flat_grads(ref)) < 1e-10
        if requires_grad:
            assert rel_err(seq.input_grad, ref.input_grad) < 1e-10


@pytest.mark.parametrize("kind", KINDS)
def test_each_network_runs_once_in_the_reversible_backward(kind):
    torch.manual_seed(3)
    blocks = [_block(kind, channels=4) for _ in range(3)]
    seq = ReversibleSequence(blocks)
    calls = []
    for i, block in enumerate(blocks):
        for name, net in block.named_children():
            net.register_forward_hook(lambda m, inp, out, key=(i, name): calls.append(key))
    y, logdet = seq(torch.randn(2, 4, 3, 3))
    forward_calls = len(calls)
    (y.sum() + logdet.sum()).backward()
    backward_calls = calls[forward_calls:]
    assert sorted(backward_calls) == sorted(calls[:forward_calls])   # every network once more, no more


def test_glow_coupling_is_the_building_block_and_old_checkpoints_load():
    cfg = GlowConfig(image_shape=(1, 8, 8), levels=2, depth=2, hidden=8)
    model = Glow(cfg)
    coupling = model.flows[0].steps[0].coupling
    # one implementation: Glow's layer is the generic one-network block with its own CouplingNetwork
    assert isinstance(coupling, _OneNetworkCoupling) and coupling.kind == "affine"
    assert type(coupling).inverse_vjp is AffineCoupling.inverse_vjp
    model.initialize(torch.randint(0, 256, (8, 1, 8, 8), dtype=torch.uint8))
    perturb_(model, std=0.05)
    # a state_dict as written before the coupling network was named `net`
    old = {k.replace("coupling.net.", "coupling.nn."): v for k, v in model.state_dict().items()}
    assert any(".coupling.nn." in k for k in old)
    fresh = Glow(cfg)
    fresh.load_state_dict(old)
    for (k, a), (_, b) in zip(model.state_dict().items(), fresh.state_dict().items()):
        assert torch.equal(a, b), k


def test_bad_networks_and_splits_are_named():
    with pytest.raises(ValueError, match=r"must map \[N, 2, H, W\] to \[N, 6, H, W\].*got \(1, 3, 2, 2\)"):
        AffineCoupling(nn.Conv2d(2, 3, 1), kernels="torch")(torch.randn(1, 5, 2, 2))
    with pytest.raises(ValueError, match="split=5 leaves an empty half"):
        AdditiveCoupling(nn.Identity(), split=5)(torch.randn(1, 5, 2, 2))
    with pytest.raises(TypeError, match="expects the network as an nn.Module"):
        AdditiveCoupling(lambda x: x)
    with pytest.raises(TypeError, match="expects g as an nn.Module"):
        TwoNetworkCoupling(nn.Identity(), "g")


class _FGForwardInverseOnly(nn.Module):
    """The two-network block as a user first writes it: forward and inverse only."""

    def __init__(self, f, g, reuse):
        super().__init__()
        self.f, self.g = f, g
        self.reuse_inverse_computations = reuse

    def forward(self, x):
        x1, x2 = x.chunk(2, dim=1)
        y1 = x1 + self.f(x2)
        return torch.cat([y1, x2 + self.g(y1)], dim=1), x.new_zeros(x.shape[0])

    def inverse(self, y):
        y1, y2 = y.chunk(2, dim=1)
        x2 = y2 - self.g(y1)
        return torch.cat([y1 - self.f(x2), x2], dim=1), y.new_zeros(y.shape[0])


@pytest.mark.parametrize("reuse", [False, True])
def test_generic_blocks_that_opt_in_reuse_the_inverse_and_stay_exact(reuse):
    def stack(memory):
        torch.manual_seed(4)
        blocks = [_FGForwardInverseOnly(perturb_(_net(2, 2), seed=2 * i), perturb_(_net(2, 2), seed=2 * i + 1), reuse)
                  for i in range(3)]
        return ReversibleSequence(blocks, memory=memory).double()

    ref, seq = stack("autograd"), stack("reversible")
    calls = []   # executions of each network, seen by its first convolution (a reused call executes nothing)
    for block in seq.steps:
        for name, net in block.named_children():
            net[0].register_forward_hook(lambda m, inp, out, name=name: calls.append(name))
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    for s in (ref, seq):
        xi = x.clone().requires_grad_()
        y, logdet = s(xi)
        (y.square().sum() - logdet.sum()).backward()
        s.input_grad = xi.grad
    assert rel_err(flat_grads(seq), flat_grads(ref)) < 1e-10
    assert rel_err(seq.input_grad, ref.input_grad) < 1e-10
    # forward: 6 network calls; backward: the inverse's 6, plus 6 more for the replay unless it reuses them
    assert len(calls) == (12 if reuse else 18)
