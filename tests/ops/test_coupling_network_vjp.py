"""coupling_network_with_vjp (the network's output and vector-Jacobian product without autograd, what Glow's
coupling uses in the reversible backward) against autograd through the plain composition, in float64; and Glow's
Coupling taking that path (with a context too) against autograd."""
import pytest
import torch

from network_weights import coupling_network_weights
from revglow.glow.layers.coupling import Coupling
from revglow.ops.coupling_network import coupling_network_reference
from revglow.ops.coupling_network_vjp import coupling_network_with_vjp


def _weights(c_in, c_out, hidden, actnorm, edge_padding, output_scale):
    return coupling_network_weights(c_in, c_out, hidden, actnorm, edge_padding, output_scale, seed=3)


@pytest.mark.parametrize("memory_format", ["contiguous", "channels_last"])
@pytest.mark.parametrize("actnorm, edge_padding, output_scale", [(False, False, False), (True, True, True),
                                                                   (True, False, False), (False, True, True)])
def test_output_and_every_gradient_match_autograd(memory_format, actnorm, edge_padding, output_scale):
    weights = _weights(3, 4, 7, actnorm, edge_padding, output_scale)
    x = torch.randn(5, 3, 6, 4, dtype=torch.float64, requires_grad=True)
    grad_out = torch.randn(5, 4, 6, 4, dtype=torch.float64)
    want_out = coupling_network_reference(x, *weights, edge_padding)
    present = [w for w in weights if w is not None]
    want = torch.autograd.grad(want_out, [x] + present, grad_out)
    out, vjp = coupling_network_with_vjp(x, *weights, edge_padding, memory_format=memory_format)
    assert not out.requires_grad and out.is_contiguous()
    torch.testing.assert_close(out, want_out.detach(), rtol=1e-12, atol=1e-12)
    grad_x, grads = vjp(grad_out)
    assert [g is None for g in grads] == [w is None for w in weights]
    torch.testing.assert_close(grad_x, want[0], rtol=1e-11, atol=1e-11)
    for got, expected in zip([g for g in grads if g is not None], want[1:]):
        torch.testing.assert_close(got, expected, rtol=1e-11, atol=1e-11)
    with pytest.raises(RuntimeError, match="called twice"):
        vjp(grad_out)


def test_under_autocast_it_leaves_the_network_to_autograd():
    weights = _weights(3, 4, 7, True, True, True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert coupling_network_with_vjp(torch.randn(2, 3, 4, 4), *weights, True) is None


@pytest.mark.parametrize("context_channels", [0, 2])
def test_glow_coupling_inverse_vjp_through_it_matches_autograd(context_channels):
    torch.manual_seed(0)
    layer = Coupling(6, hidden=8, kind="affine", kernels="torch", context_channels=context_channels, nn_actnorm=True,
                     edge_padding=True, zero_logscale_factor=3.0, actnorm_logscale_factor=3.0).double()
    x = torch.randn(3, 6, 5, 4, dtype=torch.float64, requires_grad=True)
    context = torch.randn(3, context_channels, 5, 4, dtype=torch.float64, requires_grad=True) \
        if context_channels else None
    with torch.no_grad():
        layer(x, context)   # the network's ActNorm: data-dependent init
        for p in layer.parameters():   # off the zero-initialized last layer, so every gradient is nonzero
            p.add_(0.1 * torch.randn_like(p))
    assert layer.net.forward_with_vjp(x[:, :3].detach() if not context_channels else
                                      torch.cat([x[:, :3], context], 1).detach()) is not None
    y, logdet = layer(x, context)
    grad_y, grad_logdet = torch.randn_like(y), torch.randn(3, dtype=torch.float64)
    params = list(layer.parameters())
    inputs = [x] + ([context] if context_channels else []) + params
    want = torch.autograd.grad([y, logdet], inputs, [grad_y, grad_logdet])
    out = layer.inverse_vjp(y.detach(), grad_y, grad_logdet, context)
    x_rebuilt, grad_x, grads = out[:3]
    torch.testing.assert_close(x_rebuilt, x.detach(), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(grad_x, want[0], rtol=1e-10, atol=1e-10)
    if context_channels:
        torch.testing.assert_close(out[3], want[1], rtol=1e-10, atol=1e-10)
    assert set(grads) == set(params)
    for p, g in zip(params, want[1 + bool(context_channels):]):
        torch.testing.assert_close(grads[p], g, rtol=1e-10, atol=1e-10)
