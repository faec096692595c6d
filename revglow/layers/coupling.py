"""Affine and additive coupling layers (paper, section 3.3).

The input is split along channels into the conditioning half xb = x[:, :Cb] (passed through unchanged) and
the transformed half xa = x[:, Cb:]; h = NN(xb) gives the shift (and raw scale) for xa; y = cat(xb, ya).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from revglow.layers.base import InvertibleModule
from revglow.ops import coupling_affine as ops
from revglow.ops.compiled import compiled
from revglow.ops.dispatch import resolve_backend

__all__ = ["CouplingNetwork", "Coupling", "flow_autocast_off", "coupling_network"]


def flow_autocast_off(x: torch.Tensor):
    """Flow tensors stay float32 for exact invertibility: only the coupling networks run under autocast."""
    return torch.autocast(device_type=x.device.type, enabled=False)


class CouplingNetwork(nn.Module):
    """NN() of the paper: 3x3 conv, ReLU, 1x1 conv, ReLU, zero-initialized 3x3 conv.

    The last convolution starts at zero, so at initialization shift = 0 and every coupling starts close to
    the identity (affine: scale sigmoid(2) ~ 0.88, as in the reference implementation).
    """

    def __init__(self, in_channels: int, out_channels: int, hidden: int):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, hidden, 3, padding=1)
        self.conv_hidden = nn.Conv2d(hidden, hidden, 1)
        self.conv_out = nn.Conv2d(hidden, out_channels, 3, padding=1)
        nn.init.normal_(self.conv_in.weight, std=0.05)
        nn.init.zeros_(self.conv_in.bias)
        nn.init.normal_(self.conv_hidden.weight, std=0.05)
        nn.init.zeros_(self.conv_hidden.bias)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def weights(self):
        return (self.conv_in.weight, self.conv_in.bias, self.conv_hidden.weight, self.conv_hidden.bias,
                self.conv_out.weight, self.conv_out.bias)

    def forward(self, x, compile: bool = False):
        if compile:
            return compiled(coupling_network)(x, *self.weights())
        # eager: through the submodules, so hooks on them and submodules a user swapped in keep working
        h = F.relu(self.conv_in(x))
        h = F.relu(self.conv_hidden(h))
        return self.conv_out(h)


def coupling_network(x, w_in, b_in, w_hidden, b_hidden, w_out, b_out):
    """CouplingNetwork's computation as a pure function of its weights (what torch.compile compiles once for
    every step of a level)."""
    h = F.relu(F.conv2d(x, w_in, b_in, padding=1))
    h = F.relu(F.conv2d(h, w_hidden, b_hidden))
    return F.conv2d(h, w_out, b_out, padding=1)


class Coupling(InvertibleModule):
    """Affine (`kind="affine"`) or additive (`kind="additive"`) coupling over `channels` channels.

    With `context_channels > 0` the coupling network sees the conditioning map concatenated to the untouched
    half: h = NN(cat(xb, context)); forward/inverse/inverse_vjp then take the context as their last argument.
    `kernels` ("auto" | "torch" | "triton") picks the implementation of the elementwise part (revglow.ops).
    """

    def __init__(self, channels: int, hidden: int, kind: str = "affine", kernels: str = "auto",
                 context_channels: int = 0, compile: bool = False):
        super().__init__()
        if channels < 2:
            raise ValueError(f"a coupling layer needs at least 2 channels; got {channels}")
        if kind not in ("affine", "additive"):
            raise ValueError(f"unknown coupling {kind!r}; choose 'affine' or 'additive'")
        self.kind = kind
        self.kernels = kernels
        self.context_channels = context_channels
        self.compile = compile
        self.channels_b = channels // 2
        self.channels_a = channels - self.channels_b
        out = 2 * self.channels_a if kind == "affine" else self.channels_a
        self.nn = CouplingNetwork(self.channels_b + context_channels, out, hidden)

    def _network_input(self, xb, context):
        if (context is None) != (self.context_channels == 0):
            raise ValueError(f"Coupling with context_channels={self.context_channels} was called "
                             f"{'without' if context is None else 'with'} a context")
        return xb if context is None else torch.cat([xb, context.to(xb.dtype)], dim=1)

    def _network(self, xb, context):
        net_input = self._network_input(xb, context)
        if isinstance(self.nn, CouplingNetwork):
            return self.nn(net_input, compile=self.compile)
        return self.nn(net_input)   # a network the user put in its place

    def _couple(self, x, context, inverse: bool):
        h = self._network(x[:, :self.channels_b], context)
        with flow_autocast_off(x):
            return ops.couple(x, h, self.channels_b, self.kind, resolve_backend(self.kernels, x), inverse=inverse,
                              compile=self.compile)

    def forward(self, x, context=None):
        return self._couple(x, context, inverse=False)

    def inverse(self, y, context=None):
        return self._couple(y, context, inverse=True)

    def inverse_vjp(self, y, grad_y, grad_logdet, context=None):
        # The network output used to invert the step is the one differentiated through: NN runs once.
        xb = y[:, :self.channels_b].detach().requires_grad_(True)
        with torch.enable_grad():
            h = self._network(xb, context)
        with flow_autocast_off(y), torch.no_grad():   # closed-form math: nothing to record
            x, grad_x, grad_h = ops.couple_reversible_backward(y, h.detach(), grad_y, grad_logdet, self.channels_b,
                                                               self.kind, resolve_backend(self.kernels, y),
                                                               compile=self.compile)
        params = [p for p in self.nn.parameters() if p.requires_grad]
        wants_context = context is not None and context.requires_grad
        inputs = [xb] + ([context] if wants_context else []) + params
        grads = list(torch.autograd.grad(h, inputs, grad_h.to(h.dtype), allow_unused=True))
        grad_xb = grads.pop(0)
        grad_context = grads.pop(0) if wants_context else None
        if grad_xb is not None:
            grad_x[:, :self.channels_b] += grad_xb.to(grad_x.dtype)
        param_grads = {p: g for p, g in zip(params, grads) if g is not None}
        if context is None:
            return x, grad_x, param_grads
        return x, grad_x, param_grads, grad_context
