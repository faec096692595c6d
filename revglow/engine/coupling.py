"""Coupling layers (paper, section 3.3) as building blocks for any network a user writes.

One network: the input is split along channels into the conditioning part xb = x[:, :split] (passed through
unchanged; split defaults to C // 2) and the transformed part xa = x[:, split:]; h = net(xb), or
net(cat(xb, context)) with a conditioning input, gives the shift (and raw scale) for xa; y = cat(xb, ya).
    AdditiveCoupling(net):  ya = xa + h                                   (net: xb -> C - split channels)
    AffineCoupling(net):    ya = (xa + h[:, :Ca]) * sigmoid(h[:, Ca:] + 2)  (net: xb -> 2 (C - split) channels)
Two networks (RevNet, as in memcnn and revlib): x1 = x[:, :split], x2 = x[:, split:],
    TwoNetworkCoupling(f, g):  y1 = x1 + f(x2),  y2 = x2 + g(y1),  y = cat(y1, y2)

Every block's `inverse_vjp` runs each network exactly once in the reversible backward (the network output that
rebuilds the input is the one differentiated through), so a stack of them trains at the cost of the best
reversible libraries. Glow's `Coupling` is an AffineCoupling / AdditiveCoupling over its CouplingNetwork.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import nn

from revglow.engine.invertible import InverseVJPResult, InvertibleModule
from revglow.ops import coupling_affine as ops
from revglow.ops.dispatch import resolve_backend

__all__ = ["AdditiveCoupling", "AffineCoupling", "TwoNetworkCoupling", "flow_autocast_off"]


def flow_autocast_off(x: torch.Tensor):
    """Flow tensors stay float32 for exact invertibility: only the coupling networks run under autocast."""
    return torch.autocast(device_type=x.device.type, enabled=False)


def _split_point(split: Optional[int], channels: int) -> int:
    b = channels // 2 if split is None else split
    if not 0 < b < channels:
        raise ValueError(f"coupling: split={split} leaves an empty half of a {channels}-channel input "
                         f"(need 0 < split < {channels})")
    return b


def _with_context(x: torch.Tensor, context: Optional[torch.Tensor]) -> torch.Tensor:
    return x if context is None else torch.cat([x, context.to(x.dtype)], dim=1)


class _OneNetworkCoupling(InvertibleModule):
    """y = cat(xb, T(xa; net(xb))) with T affine or additive (see the module docstring)."""

    kind = "affine"

    def __init__(self, net: nn.Module, split: Optional[int] = None, kernels: str = "auto"):
        super().__init__()
        if not isinstance(net, nn.Module):
            raise TypeError(f"{type(self).__name__} expects the network as an nn.Module; got {type(net).__name__}")
        if split is not None and (isinstance(split, bool) or not isinstance(split, int)):
            raise TypeError(f"{type(self).__name__}: split must be an int or None; got {type(split).__name__}")
        self.net = net
        self.split = split
        self.kernels = kernels
        self.compile = False

    def _network(self, xb: torch.Tensor, context: Optional[torch.Tensor], release: bool = False) -> torch.Tensor:
        """net(xb) (or net(cat(xb, context))). `release=True`: the caller runs one backward through the output
        right away; a subclass whose network can free its intermediates then (Glow's Coupling) overrides this."""
        return self.net(_with_context(xb, context))

    def _network_output(self, xb: torch.Tensor, context: Optional[torch.Tensor], channels_a: int,
                        release: bool = False) -> torch.Tensor:
        net_out = self._network(xb, context, release)
        want = 2 * channels_a if self.kind == "affine" else channels_a
        if not isinstance(net_out, torch.Tensor) or net_out.shape[0] != xb.shape[0] or net_out.shape[1] != want \
                or net_out.shape[2:] != xb.shape[2:]:
            got = tuple(net_out.shape) if isinstance(net_out, torch.Tensor) else type(net_out).__name__
            raise ValueError(f"{type(self).__name__}: the network must map [N, {xb.shape[1]}"
                             f"{' + context' if context is not None else ''}, H, W] to [N, {want}, H, W] "
                             f"({'shift and raw scale of' if self.kind == 'affine' else 'the shift of'} the "
                             f"{channels_a} transformed channels); got {got}")
        return net_out

    def _couple(self, x: torch.Tensor, context: Optional[torch.Tensor],
                inverse: bool) -> Tuple[torch.Tensor, torch.Tensor]:
        b = _split_point(self.split, x.shape[1])
        net_out = self._network_output(x[:, :b], context, x.shape[1] - b)
        with flow_autocast_off(x):
            return ops.couple(x, net_out, b, self.kind, resolve_backend(self.kernels, x), inverse=inverse,
                              compile=self.compile)

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        return self._couple(x, context, inverse=False)

    def inverse(self, y: torch.Tensor, context: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        return self._couple(y, context, inverse=True)

    def inverse_vjp(self, y: torch.Tensor, grad_y: torch.Tensor, grad_logdet: torch.Tensor,
                    context: Optional[torch.Tensor] = None) -> InverseVJPResult:
        # The network output used to invert the step is the one differentiated through: the network runs once.
        b = _split_point(self.split, y.shape[1])
        xb = y[:, :b].detach().requires_grad_(True)
        with torch.enable_grad():   # one backward through net_out, right below: the network may free as it goes
            net_out = self._network_output(xb, context, y.shape[1] - b, release=True)
        with flow_autocast_off(y), torch.no_grad():   # closed-form math: nothing to record
            x, grad_x, grad_net_out = ops.couple_reversible_backward(
                y, net_out.detach(), grad_y, grad_logdet, b, self.kind, resolve_backend(self.kernels, y),
                compile=self.compile)
        params = [p for p in self.net.parameters() if p.requires_grad]
        wants_context = context is not None and context.requires_grad
        inputs = [xb] + ([context] if wants_context else []) + params
        grads = list(torch.autograd.grad(net_out, inputs, grad_net_out.to(net_out.dtype), allow_unused=True))
        grad_xb = grads.pop(0)
        grad_context = grads.pop(0) if wants_context else None
        if grad_xb is not None:
            grad_x[:, :b] += grad_xb.to(grad_x.dtype)
        param_grads = {p: g for p, g in zip(params, grads) if g is not None}
        if context is None:
            return x, grad_x, param_grads
        return x, grad_x, param_grads, grad_context


class AdditiveCoupling(_OneNetworkCoupling):
    """ya = xa + net(xb): volume-preserving (logdet 0). `net` is any module mapping [N, split (+ context), H, W]
    to [N, C - split, H, W].

    Example:
        >>> from torch import nn
        >>> block = AdditiveCoupling(nn.Conv2d(2, 2, 3, padding=1))
        >>> x = torch.randn(5, 4, 8, 8)
        >>> y, logdet = block(x)
        >>> torch.allclose(block.inverse(y)[0], x, atol=1e-6), logdet.abs().max().item()
        (True, 0.0)
    """

    kind = "additive"


class AffineCoupling(_OneNetworkCoupling):
    """ya = (xa + shift) * sigmoid(raw + 2) with (shift, raw) = net(xb) split along channels, Glow's scale function
    (bounded in (0, 1), close to the identity at a zero-initialized last layer); logdet = sum log sigmoid(raw + 2).
    `net` maps [N, split (+ context), H, W] to [N, 2 (C - split), H, W]. On CUDA the elementwise part runs on the
    fused Triton kernels (`kernels`)."""

    kind = "affine"



class TwoNetworkCoupling(InvertibleModule):
    """RevNet coupling with two networks: y1 = x1 + f(x2), y2 = x2 + g(y1) for x = cat(x1, x2), x1 = x[:, :split]
    (split defaults to C // 2); logdet 0. The form memcnn's AdditiveCoupling and revlib's ReversibleSequential
    use. `f` maps [N, C - split (+ context), H, W] to [N, split, H, W]; `g` maps [N, split (+ context), H, W] to
    [N, C - split, H, W]. In the reversible backward each network runs once.

    Example:
        >>> from torch import nn
        >>> block = TwoNetworkCoupling(nn.Conv2d(2, 2, 3, padding=1), nn.Conv2d(2, 2, 3, padding=1))
        >>> x = torch.randn(5, 4, 8, 8)
        >>> torch.allclose(block.inverse(block(x)[0])[0], x, atol=1e-6)
        True
    """

    def __init__(self, f: nn.Module, g: nn.Module, split: Optional[int] = None):
        super().__init__()
        for name, net in (("f", f), ("g", g)):
            if not isinstance(net, nn.Module):
                raise TypeError(f"TwoNetworkCoupling expects {name} as an nn.Module; got {type(net).__name__}")
        self.f, self.g, self.split = f, g, split

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        b = _split_point(self.split, x.shape[1])
        x1, x2 = x[:, :b], x[:, b:]
        y1 = x1 + self.f(_with_context(x2, context))
        y2 = x2 + self.g(_with_context(y1, context))
        return torch.cat([y1, y2], dim=1), x.new_zeros(x.shape[0])

    def inverse(self, y: torch.Tensor, context: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        b = _split_point(self.split, y.shape[1])
        y1, y2 = y[:, :b], y[:, b:]
        x2 = y2 - self.g(_with_context(y1, context))
        x1 = y1 - self.f(_with_context(x2, context))
        return torch.cat([x1, x2], dim=1), y.new_zeros(y.shape[0])

    def inverse_vjp(self, y: torch.Tensor, grad_y: torch.Tensor, grad_logdet: torch.Tensor,
                    context: Optional[torch.Tensor] = None) -> InverseVJPResult:
        b = _split_point(self.split, y.shape[1])
        y1 = y[:, :b].detach().requires_grad_(True)
        y2 = y[:, b:].detach()
        grad_y1, grad_y2 = grad_y[:, :b], grad_y[:, b:]
        wants_context = context is not None and context.requires_grad
        g_params = [p for p in self.g.parameters() if p.requires_grad]
        f_params = [p for p in self.f.parameters() if p.requires_grad]
        # g: x2 = y2 - g(y1); dL/dy1 gains g's vector-Jacobian product with dL/dy2.
        with torch.enable_grad():
            g_out = self.g(_with_context(y1, context))
        x2 = (y2 - g_out.detach()).requires_grad_(True)
        g_grads = list(torch.autograd.grad(g_out, [y1] + ([context] if wants_context else []) + g_params,
                                           grad_y2.to(g_out.dtype), allow_unused=True))
        grad_y1_total = grad_y1 + _or_zeros(g_grads.pop(0), y1).to(grad_y1.dtype)
        grad_context = g_grads.pop(0) if wants_context else None
        # f: x1 = y1 - f(x2); dL/dx2 = dL/dy2 + f's vector-Jacobian product with dL/dy1 (all of it).
        with torch.enable_grad():
            f_out = self.f(_with_context(x2, context))
        f_grads = list(torch.autograd.grad(f_out, [x2] + ([context] if wants_context else []) + f_params,
                                           grad_y1_total.to(f_out.dtype), allow_unused=True))
        grad_x2 = grad_y2 + _or_zeros(f_grads.pop(0), x2).to(grad_y2.dtype)
        if wants_context:
            grad_context = _add(grad_context, f_grads.pop(0))
        with torch.no_grad():
            x = torch.cat([y1.detach() - f_out.detach(), x2.detach()], dim=1)
            grad_x = torch.cat([grad_y1_total, grad_x2], dim=1)
        param_grads = {p: g for p, g in zip(g_params + f_params, g_grads + f_grads) if g is not None}
        if context is None:
            return x, grad_x, param_grads
        return x, grad_x, param_grads, grad_context


def _or_zeros(grad, like):
    return grad if grad is not None else torch.zeros_like(like)


def _add(a, b):
    return b if a is None else a if b is None else a + b
