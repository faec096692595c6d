"""One step of flow (paper, Figure 2a): ActNorm, then a channel mixing, then a coupling.

ActNorm and the channel mixing run as one fused op, y = W (s * x + b) (revglow.ops.actnorm_conv1x1), so the
flow tensor is read and written once for both, forward, inverse and in the reversible backward.
"""
from __future__ import annotations

from typing import Optional

import torch

from revglow.glow.layers.actnorm import ActNorm
from revglow.engine.invertible import InverseVJPResult, InvertibleModule
from revglow.glow.layers.pixelwise import logdet_per_sample
from revglow.engine.coupling import float32_flow
from revglow.glow.layers.coupling import Coupling
from revglow.glow.layers.permutation import make_channel_mixing
from revglow.ops import actnorm_conv1x1 as ops
from revglow.ops.actnorm_conv1x1 import invert_weight
from revglow.ops.dispatch import resolve_backend

__all__ = ["FlowStep"]


class FlowStep(InvertibleModule):
    """ActNorm -> channel mixing (`permutation`) -> coupling (`coupling`), on `channels` channels.

    With `context_channels > 0` the coupling network also sees a conditioning map of that many channels at the
    step's spatial size: step(x, context), step.inverse(y, context). `nn_actnorm`, `edge_padding`,
    `zero_logscale_factor` shape the coupling network as the reference implementation does (see CouplingNetwork);
    `actnorm_logscale_factor` is the log-scale factor of every ActNorm of the step (revglow.glow.layers.actnorm.ActNorm).
    `memory_format` ("auto" | "channels_last" | "contiguous") is the layout the coupling network's convolutions run
    in (revglow.ops.coupling_network.resolve_memory_format); the step's input and output stay NCHW.

    Example:
        >>> step = FlowStep(4, hidden=8)
        >>> x = torch.randn(2, 4, 3, 3)
        >>> y, logdet = step(x)
        >>> torch.allclose(step.inverse(y)[0], x, atol=1e-5)
        True
    """

    def __init__(self, channels: int, hidden: int, coupling: str = "affine", permutation: str = "invconv_lu",
                 kernels: str = "auto", seed: int = 0, context_channels: int = 0, compile: bool = False,
                 nn_actnorm: bool = False, edge_padding: bool = False, zero_logscale_factor: Optional[float] = None,
                 actnorm_logscale_factor: float = 1.0, memory_format: str = "auto"):
        super().__init__()
        self.kernels = kernels
        self.compile = compile   # torch.compile the work of the step (revglow.ops.compiled)
        self.actnorm = ActNorm(channels, logscale_factor=actnorm_logscale_factor)
        self.mixing = make_channel_mixing(permutation, channels, seed)
        self.coupling = Coupling(channels, hidden, coupling, kernels, context_channels, compile, nn_actnorm=nn_actnorm,
                                 edge_padding=edge_padding, zero_logscale_factor=zero_logscale_factor,
                                 actnorm_logscale_factor=actnorm_logscale_factor, memory_format=memory_format)

    def _scale_bias_weight(self, x):
        return (self.actnorm.scale().to(x.dtype), self.actnorm.bias.to(x.dtype),
                self.mixing.weight_matrix().to(x.dtype))

    def _mixing_logdet_per_pixel(self):
        return self.actnorm.logdet_per_pixel() + self.mixing.logdet_per_pixel()

    def forward(self, x, context: Optional[torch.Tensor] = None):
        with float32_flow(x):
            if not self.actnorm.is_initialized:
                self.actnorm.initialize_from(x)
            s, b, w = self._scale_bias_weight(x)
            z = ops.actnorm_conv1x1(x, s, b, w, backend=resolve_backend(self.kernels, x), compile=self.compile)
            logdet = logdet_per_sample(self._mixing_logdet_per_pixel(), x)
        y, logdet_coupling = self.coupling(z, context)
        return y, logdet + logdet_coupling

    def inverse(self, y, context: Optional[torch.Tensor] = None):
        if not self.actnorm.is_initialized:
            raise RuntimeError("FlowStep is not initialized: run a forward pass on data (or Glow.initialize) first")
        z, logdet_coupling = self.coupling.inverse(y, context)
        with float32_flow(y):
            s, b, _ = self._scale_bias_weight(y)
            w_inv = self.mixing.weight_inverse().to(y.dtype)
            x = ops.actnorm_conv1x1_inverse(z, s, b, w_inv, resolve_backend(self.kernels, y), compile=self.compile)
            return x, logdet_per_sample(self._mixing_logdet_per_pixel(), y) + logdet_coupling

    def inverse_vjp(self, y: torch.Tensor, grad_y: torch.Tensor, grad_logdet: torch.Tensor,
                    context: Optional[torch.Tensor] = None) -> InverseVJPResult:
        out = self.coupling.inverse_vjp(y, grad_y, grad_logdet, context)
        z, grad_z, param_grads = out[:3]
        # Closed-form math throughout: no graph, and the parameters' gradients from ActNorm's and the mixing's
        # own closed forms (a nested autograd call per step cost more than the arithmetic itself).
        with float32_flow(y), torch.no_grad():
            s, b, w = self._scale_bias_weight(y)
            w_inv = invert_weight(w)
            x, grad_x, grad_s, grad_b, grad_w = ops.actnorm_conv1x1_reversible_backward(
                z, grad_z, s, b, w, w_inv, resolve_backend(self.kernels, y), compile=self.compile)
            # logdet_per_sample expands the per-pixel log-determinant over H * W pixels of every sample
            grad_per_pixel = grad_logdet.sum() * (y.shape[2] * y.shape[3])
            param_grads.update(self.actnorm.parameter_grads(grad_s, grad_b, grad_per_pixel))
            param_grads.update(self.mixing.parameter_grads(grad_w, grad_per_pixel))
        if context is None:
            return x, grad_x, param_grads
        return x, grad_x, param_grads, out[3]
