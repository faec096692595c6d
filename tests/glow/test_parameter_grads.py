"""The closed-form parameter gradients of ActNorm and the channel mixings (what a flow step's reversible backward
uses instead of a nested autograd call) against autograd through the same maps, in float64."""
import pytest
import torch

from revglow.glow.layers.actnorm import ActNorm
from revglow.glow.layers.permutation import ChannelMixing, make_channel_mixing


def _perturbed(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """The module in float64 with its parameters moved off their initial values (a zero log-scale or an identity
    factor would hide a wrong factor in a formula)."""
    module = module.double()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return module


def _autograd_grads(outputs, grad_outputs, module):
    params = [p for p in module.parameters() if p.requires_grad]
    grads = torch.autograd.grad(outputs, params, grad_outputs, allow_unused=True)
    return {p: g for p, g in zip(params, grads) if g is not None}


def _assert_same(got, want):
    assert set(got) == set(want)
    for p, g in want.items():
        assert got[p].dtype == p.dtype
        torch.testing.assert_close(got[p], g, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("factor", [1.0, 3.0])
def test_actnorm_parameter_grads_match_autograd(factor):
    layer = _perturbed(ActNorm(5, logscale_factor=factor), seed=1)
    g = torch.Generator().manual_seed(2)
    grad_scale, grad_bias = torch.randn(5, generator=g, dtype=torch.float64), torch.randn(5, generator=g,
                                                                                          dtype=torch.float64)
    grad_logdet = torch.tensor(0.7, dtype=torch.float64)
    want = _autograd_grads([layer.scale(), layer.bias, layer.logdet_per_pixel()], [grad_scale, grad_bias, grad_logdet],
                           layer)
    _assert_same(layer.parameter_grads(grad_scale, grad_bias, grad_logdet), want)


@pytest.mark.parametrize("kind", ["invconv_lu", "invconv", "reverse", "shuffle"])
def test_mixing_parameter_grads_match_autograd(kind):
    mixing = _perturbed(make_channel_mixing(kind, 6, seed=3), seed=4)
    g = torch.Generator().manual_seed(5)
    grad_weight = torch.randn(6, 6, generator=g, dtype=torch.float64)
    grad_logdet = torch.tensor(-1.3, dtype=torch.float64)
    got = mixing.parameter_grads(grad_weight, grad_logdet)
    params = [p for p in mixing.parameters() if p.requires_grad]
    if not params:
        assert got == {}
        return
    want = _autograd_grads([mixing.weight_matrix(), mixing.logdet_per_pixel()], [grad_weight, grad_logdet], mixing)
    _assert_same(got, want)
    # the generic version (autograd through weight_matrix and logdet_per_pixel) agrees with each closed form
    _assert_same(ChannelMixing.parameter_grads(mixing, grad_weight, grad_logdet), want)


def test_frozen_parameters_get_no_gradient():
    mixing = _perturbed(make_channel_mixing("invconv_lu", 4), seed=6)
    mixing.log_s.requires_grad_(False)
    layer = _perturbed(ActNorm(4), seed=7)
    layer.bias.requires_grad_(False)
    got = mixing.parameter_grads(torch.ones(4, 4, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64))
    assert set(got) == {mixing.lower, mixing.upper}
    got = layer.parameter_grads(torch.ones(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64),
                                torch.tensor(1.0, dtype=torch.float64))
    assert set(got) == {layer.log_scale}


@pytest.mark.parametrize("permutation", ["invconv_lu", "invconv", "shuffle"])
def test_flow_step_inverse_vjp_matches_autograd(permutation):
    """A whole flow step's reversible backward (closed-form parameter gradients inside) against autograd."""
    from revglow.glow.layers.flowstep import FlowStep

    torch.manual_seed(0)
    step = FlowStep(4, hidden=8, permutation=permutation, kernels="torch", actnorm_logscale_factor=3.0).double()
    x = torch.randn(3, 4, 5, 3, dtype=torch.float64, requires_grad=True)
    with torch.no_grad():
        step(x)   # data-dependent init
    _perturbed(step, seed=8)
    y, logdet = step(x)
    grad_y, grad_logdet = torch.randn_like(y), torch.randn(3, dtype=torch.float64)
    params = list(step.parameters())
    want = torch.autograd.grad([y, logdet], [x] + params, [grad_y, grad_logdet], allow_unused=True)
    x_rebuilt, grad_x, grads = step.inverse_vjp(y.detach(), grad_y, grad_logdet)
    torch.testing.assert_close(x_rebuilt, x.detach(), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(grad_x, want[0], rtol=1e-10, atol=1e-10)
    assert set(grads) == {p for p, g in zip(params, want[1:]) if g is not None}
    for p, g in zip(params, want[1:]):
        if g is not None:
            torch.testing.assert_close(grads[p], g, rtol=1e-10, atol=1e-10)
