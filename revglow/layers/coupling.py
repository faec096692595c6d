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
from revglow.ops.dispatch import resolve_backend

__all__ = ["CouplingNetwork", "Coupling", "flow_autocast_off"]


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

    def forward(self, x):
        h = F.relu(self.conv_in(x))
        h = F.relu(self.conv_hidden(h))
        return self.conv_out(h)


class Coupling(InvertibleModule):
    """Affine (`kind="affine"`) or additive (`kind="additive"`) coupling over `channels` channels.

    `kernels` ("auto" | "torch" | "triton") picks the implementation of the elementwise part.
    """

    def __init__(self, channels: int, hidden: int, kind: str = "affine", kernels: str = "auto"):
        super().__init__()
        if channels < 2:
            raise ValueError(f"a coupling layer needs at least 2 channels; got {channels}")
        if kind not in ("affine", "additive"):
            raise ValueError(f"unknown coupling {kind!r}; choose 'affine' or 'additive'")
        self.kind = kind
        self.kernels = kernels
        self.channels_b = channels // 2
        self.channels_a = channels - self.channels_b
        out = 2 * self.channels_a if kind == "affine" else self.channels_a
        self.nn = CouplingNetwork(self.channels_b, out, hidden)
        if kind == "affine":
            self._fwd, self._inv, self._rev = (ops.coupling_affine, ops.coupling_affine_inverse,
                                               ops.coupling_affine_reversible_backward)
        else:
            self._fwd, self._inv, self._rev = (ops.coupling_additive, ops.coupling_additive_inverse,
                                               ops.coupling_additive_reversible_backward)

    def _split(self, x):
        return x[:, :self.channels_b], x[:, self.channels_b:]

    def _couple(self, x, transform):
        """cat(xb, transform(xa, h)) with h = NN(xb). Outside autograd the Triton kernel writes the transformed
        half straight into the output, in place of a torch.cat (one read and one write of it fewer)."""
        xb, xa = self._split(x)
        h = self.nn(xb)
        backend = resolve_backend(self.kernels, x)
        with flow_autocast_off(x):
            builds_graph = torch.is_grad_enabled() and (x.requires_grad or h.requires_grad)
            if backend == "triton" and self.kind == "affine" and not builds_graph:
                out = torch.empty_like(x, memory_format=torch.contiguous_format)
                out[:, :self.channels_b].copy_(xb)
                _, logdet = transform(xa, h, backend, out=out[:, self.channels_b:])
                return out, logdet
            za, logdet = transform(xa, h, backend)
            return torch.cat([xb, za], dim=1), logdet

    def forward(self, x):
        return self._couple(x, self._fwd)

    def inverse(self, y):
        return self._couple(y, self._inv)

    def inverse_vjp(self, y, grad_y, grad_logdet):
        # The network output used to invert the step is the one differentiated through: NN runs once.
        yb, ya = self._split(y)
        grad_yb, grad_ya = self._split(grad_y)
        xb = yb.detach().requires_grad_(True)
        with torch.enable_grad():
            h = self.nn(xb)
        backend = resolve_backend(self.kernels, y)
        # On the Triton path the kernel writes xa and dL/dxa straight into the rebuilt input and its gradient,
        # in place of two torch.cat.
        in_place = backend == "triton" and self.kind == "affine"
        with flow_autocast_off(y):
            if in_place:
                x = torch.empty_like(y, memory_format=torch.contiguous_format)
                grad_x = torch.empty_like(x)
                x[:, :self.channels_b].copy_(yb)
                _, _, grad_h = self._rev(ya, h.detach(), grad_ya, grad_logdet, backend,
                                         out_xa=x[:, self.channels_b:], out_grad_xa=grad_x[:, self.channels_b:])
            else:
                xa, grad_xa, grad_h = self._rev(ya, h.detach(), grad_ya, grad_logdet, backend)
        params = [p for p in self.nn.parameters() if p.requires_grad]
        grads = torch.autograd.grad(h, [xb] + params, grad_h.to(h.dtype), allow_unused=True)
        param_grads = {p: g for p, g in zip(params, grads[1:]) if g is not None}
        grad_xb = grads[0].to(grad_yb.dtype)
        if in_place:
            torch.add(grad_yb, grad_xb, out=grad_x[:, :self.channels_b])
            return x, grad_x, param_grads
        x = torch.cat([yb.detach(), xa], dim=1)
        grad_x = torch.cat([grad_yb + grad_xb, grad_xa], dim=1)
        return x, grad_x, param_grads
