"""Glow's coupling layer (paper, section 3.3): an affine or additive coupling (revglow.engine.coupling) over the
paper's coupling network NN()."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from revglow.engine.coupling import _OneNetworkCoupling, _with_context
from revglow.glow.layers.actnorm import ActNorm
from revglow.glow.layers.conv import Conv2dSame, ZeroConv2d
from revglow.ops import coupling_network as network_op
from revglow.ops.compiled import compiled
from revglow.ops.coupling_network_vjp import coupling_network_with_vjp
from revglow.ops.coupling_network import coupling_network_reference as coupling_network   # the pure function

__all__ = ["Coupling", "CouplingNetwork"]


class CouplingNetwork(nn.Module):
    """NN() of the paper: 3x3 conv, ReLU, 1x1 conv, ReLU, zero-initialized 3x3 conv.

    The last convolution starts at zero, so at initialization shift = 0 and every coupling starts close to
    the identity (affine: scale sigmoid(2) ~ 0.88, as in the reference implementation). The options follow the
    reference implementation (GlowConfig turns them all on by default; here they default to off):
    `actnorm`: the two hidden convolutions have no bias and are each followed by an ActNorm (data-dependent init,
    log-scale factor `actnorm_logscale_factor`): conv3x3 -> ActNorm -> ReLU -> conv1x1 -> ActNorm -> ReLU -> conv3x3;
    `edge_padding`: the 3x3 convolutions see the border channel (revglow.glow.layers.conv);
    `zero_logscale_factor` f: the last convolution's output is multiplied by exp(f * logs) per channel.

    Once its ActNorms are initialized, the forward runs as one op (revglow.ops.coupling_network: the same map,
    differentiated keeping about a third of the memory of plain autograd) unless a submodule has hooks or was
    replaced; `compile` runs the pure function `coupling_network` under torch.compile instead. `memory_format`
    ("auto" | "channels_last" | "contiguous", revglow.ops.coupling_network.MEMORY_FORMATS) is the layout that op
    stores its wide tensors in; the input and output stay NCHW, and the parameters are the same either way.
    """

    def __init__(self, in_channels: int, out_channels: int, hidden: int, actnorm: bool = False,
                 edge_padding: bool = False, zero_logscale_factor: Optional[float] = None,
                 actnorm_logscale_factor: float = 1.0, memory_format: str = "auto"):
        super().__init__()
        if memory_format not in network_op.MEMORY_FORMATS:
            raise ValueError(f"memory_format={memory_format!r} is not a known option; choose one of "
                             f"{network_op.MEMORY_FORMATS}")
        self.memory_format = memory_format
        self.edge_padding = bool(edge_padding)
        self.conv_in = Conv2dSame(in_channels, hidden, 3, bias=not actnorm, edge_padding=edge_padding)
        self.norm_in = ActNorm(hidden, logscale_factor=actnorm_logscale_factor) if actnorm else None
        self.conv_hidden = Conv2dSame(hidden, hidden, 1, bias=not actnorm)
        self.norm_hidden = ActNorm(hidden, logscale_factor=actnorm_logscale_factor) if actnorm else None
        self.conv_out = ZeroConv2d(hidden, out_channels, 3, edge_padding=edge_padding,
                                   logscale_factor=zero_logscale_factor)
        for conv in (self.conv_in, self.conv_hidden):
            nn.init.normal_(conv.weight, std=0.05)
            if conv.bias is not None:
                nn.init.zeros_(conv.bias)

    def weights(self):
        """The arguments of `coupling_network` after the input, in its order."""
        def norm(m):
            return (None, None) if m is None else (m.scale(), m.bias)
        return (self.conv_in.weight, self.conv_in.bias, *norm(self.norm_in),
                self.conv_hidden.weight, self.conv_hidden.bias, *norm(self.norm_hidden),
                self.conv_out.weight, self.conv_out.bias, self.conv_out.output_scale(), self.edge_padding)

    def forward(self, x: torch.Tensor, compile: bool = False, release: bool = False) -> torch.Tensor:
        """`release=True`: the caller runs one backward through the output right away (the reversible engine's
        recomputation), so the network's wide intermediates may be freed as that backward uses them."""
        norms = [m for m in (self.norm_in, self.norm_hidden) if m is not None]
        if compile and all(m.is_initialized for m in norms):   # the data-dependent init runs eagerly
            return compiled(coupling_network)(x, *self.weights())
        if self._runs_as_one_op(norms):
            return network_op.coupling_network(x, *self.weights(), release=release, memory_format=self.memory_format)
        # through the submodules: the data-dependent init, and hooks on them or submodules a user swapped in
        h = self.conv_in(x)
        if self.norm_in is not None:
            h = self.norm_in(h)[0]
        h = self.conv_hidden(F.relu(h))
        if self.norm_hidden is not None:
            h = self.norm_hidden(h)[0]
        return self.conv_out(F.relu(h))

    def forward_with_vjp(self, x: torch.Tensor, compile: bool = False):
        """(out, vjp) where the forward runs as one op (not compiled, not under autocast): the output, computed
        without a graph, and vjp(dL/dout), to call once, giving (dL/dx, {parameter: gradient}) in closed form
        (revglow.ops.coupling_network_vjp); else None, and the caller differentiates forward() with autograd."""
        norms = [m for m in (self.norm_in, self.norm_hidden) if m is not None]
        if compile or not self._runs_as_one_op(norms):
            return None
        found = coupling_network_with_vjp(x, *self.weights(), memory_format=self.memory_format)
        if found is None:
            return None
        out, network_vjp = found

        def vjp(grad_out: torch.Tensor):
            grad_x, grads = network_vjp(grad_out)
            gw_in, gb_in, gs_in, gt_in, gw_hidden, gb_hidden, gs_hidden, gt_hidden, gw_out, gb_out, gs_out = grads
            pairs = [(self.conv_in.weight, gw_in), (self.conv_in.bias, gb_in), (self.conv_hidden.weight, gw_hidden),
                     (self.conv_hidden.bias, gb_hidden), (self.conv_out.weight, gw_out), (self.conv_out.bias, gb_out)]
            if gs_out is not None:   # output scale exp(f * logs)
                with torch.no_grad():
                    pairs.append((self.conv_out.logs,
                                  gs_out * self.conv_out.output_scale() * self.conv_out.logscale_factor))
            param_grads = {p: g.to(p.dtype) for p, g in pairs if p is not None and g is not None and p.requires_grad}
            for norm, grad_scale, grad_shift in ((self.norm_in, gs_in, gt_in), (self.norm_hidden, gs_hidden,
                                                                                  gt_hidden)):
                if norm is not None:
                    param_grads.update(norm.parameter_grads(grad_scale, grad_shift, grad_scale.new_zeros(())))
            return grad_x, param_grads

        return out, vjp

    def _runs_as_one_op(self, norms) -> bool:
        """Whether the forward may run as revglow.ops.coupling_network (the same map, computed with a fraction of
        the memory): the submodules are the ones built here, initialized, with no hooks of their own."""
        parts = ((self.conv_in, Conv2dSame), (self.conv_hidden, Conv2dSame), (self.conv_out, ZeroConv2d),
                 *((m, ActNorm) for m in norms))
        return all(type(m) is kind and not (m._forward_hooks or m._forward_pre_hooks) for m, kind in parts) \
            and all(m.is_initialized for m in norms)


class Coupling(_OneNetworkCoupling):
    """Glow's coupling layer: an AffineCoupling (`kind="affine"`) or AdditiveCoupling (`kind="additive"`) over
    its own CouplingNetwork, with the split at channels // 2.

    With `context_channels > 0` the coupling network sees the conditioning map concatenated to the untouched
    half: h = NN(cat(xb, context)); forward/inverse/inverse_vjp then take the context as their last argument.
    `kernels` ("auto" | "torch" | "triton") picks the implementation of the elementwise part (revglow.ops).
    `nn_actnorm`, `edge_padding`, `zero_logscale_factor`, `actnorm_logscale_factor`: the reference network's
    options; `memory_format`: the layout its convolutions run in (see CouplingNetwork).
    """

    def __init__(self, channels: int, hidden: int, kind: str = "affine", kernels: str = "auto",
                 context_channels: int = 0, compile: bool = False, nn_actnorm: bool = False,
                 edge_padding: bool = False, zero_logscale_factor: Optional[float] = None,
                 actnorm_logscale_factor: float = 1.0, memory_format: str = "auto"):
        if channels < 2:
            raise ValueError(f"a coupling layer needs at least 2 channels; got {channels}")
        if kind not in ("affine", "additive"):
            raise ValueError(f"unknown coupling {kind!r}; choose 'affine' or 'additive'")
        channels_b = channels // 2
        channels_a = channels - channels_b
        net = CouplingNetwork(channels_b + context_channels, 2 * channels_a if kind == "affine" else channels_a,
                              hidden, actnorm=nn_actnorm, edge_padding=edge_padding,
                              zero_logscale_factor=zero_logscale_factor,
                              actnorm_logscale_factor=actnorm_logscale_factor, memory_format=memory_format)
        super().__init__(net, split=channels_b, kernels=kernels)
        self.kind = kind
        self.channels_b, self.channels_a = channels_b, channels_a
        self.context_channels = context_channels
        self.compile = compile

    def _network(self, xb: torch.Tensor, context: Optional[torch.Tensor], release: bool = False) -> torch.Tensor:
        if (context is None) != (self.context_channels == 0):
            raise ValueError(f"Coupling with context_channels={self.context_channels} was called "
                             f"{'without' if context is None else 'with'} a context")
        return self.net(_with_context(xb, context), compile=self.compile, release=release)

    def _network_with_vjp(self, xb, context, d, channels_a):
        # The network's own exact backward, without a nested autograd call (see CouplingNetwork.forward_with_vjp);
        # the generic autograd path where it does not apply.
        found = None
        if (context is None) == (self.context_channels == 0):
            found = self.net.forward_with_vjp(_with_context(xb, context).detach(), compile=self.compile)
        if found is None:
            return super()._network_with_vjp(xb, context, d, channels_a)
        net_out, network_vjp = found
        wants_context = context is not None and context.requires_grad

        def vjp(grad_net_out):
            grad_in, param_grads = network_vjp(grad_net_out.to(net_out.dtype))
            grad_xb = grad_in.narrow(1, 0, xb.shape[1])
            grad_context = grad_in.narrow(1, xb.shape[1], self.context_channels).to(context.dtype) \
                if wants_context else None
            return grad_xb, grad_context, param_grads

        return net_out, vjp

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Checkpoints written before the network was named `net` hold it under `nn.`.
        old = prefix + "nn."
        for key in [k for k in state_dict if k.startswith(old)]:
            state_dict[prefix + "net." + key[len(old):]] = state_dict.pop(key)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

