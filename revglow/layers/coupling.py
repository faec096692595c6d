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
import torch.nn.functional as F
from torch import nn

from revglow.layers.actnorm import ActNorm
from revglow.layers.base import InverseVJPResult, InvertibleModule
from revglow.layers.conv import Conv2dSame, ZeroConv2d
from revglow.ops import coupling_affine as ops
from revglow.ops import coupling_network as network_op
from revglow.ops.coupling_network import coupling_network_reference as coupling_network   # the pure function
from revglow.ops.compiled import compiled
from revglow.ops.dispatch import resolve_backend

__all__ = ["AdditiveCoupling", "AffineCoupling", "TwoNetworkCoupling", "Coupling", "CouplingNetwork",
           "flow_autocast_off", "coupling_network"]


def flow_autocast_off(x: torch.Tensor):
    """Flow tensors stay float32 for exact invertibility: only the coupling networks run under autocast."""
    return torch.autocast(device_type=x.device.type, enabled=False)


class CouplingNetwork(nn.Module):
    """NN() of the paper: 3x3 conv, ReLU, 1x1 conv, ReLU, zero-initialized 3x3 conv.

    The last convolution starts at zero, so at initialization shift = 0 and every coupling starts close to
    the identity (affine: scale sigmoid(2) ~ 0.88, as in the reference implementation). The options follow the
    reference implementation (GlowConfig turns them all on by default; here they default to off):
    `actnorm`: the two hidden convolutions have no bias and are each followed by an ActNorm (data-dependent init,
    log-scale factor `actnorm_logscale_factor`): conv3x3 -> ActNorm -> ReLU -> conv1x1 -> ActNorm -> ReLU -> conv3x3;
    `edge_padding`: the 3x3 convolutions see the border channel (revglow.layers.conv);
    `zero_logscale_factor` f: the last convolution's output is multiplied by exp(f * logs) per channel.

    Once its ActNorms are initialized, the forward runs as one op (revglow.ops.coupling_network: the same map,
    differentiated keeping about a third of the memory of plain autograd) unless a submodule has hooks or was
    replaced; `compile` runs the pure function `coupling_network` under torch.compile instead.
    """

    def __init__(self, in_channels: int, out_channels: int, hidden: int, actnorm: bool = False,
                 edge_padding: bool = False, zero_logscale_factor: Optional[float] = None,
                 actnorm_logscale_factor: float = 1.0):
        super().__init__()
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
            return network_op.coupling_network(x, *self.weights(), release=release)
        # through the submodules: the data-dependent init, and hooks on them or submodules a user swapped in
        h = self.conv_in(x)
        if self.norm_in is not None:
            h = self.norm_in(h)[0]
        h = self.conv_hidden(F.relu(h))
        if self.norm_hidden is not None:
            h = self.norm_hidden(h)[0]
        return self.conv_out(F.relu(h))

    def _runs_as_one_op(self, norms) -> bool:
        """Whether the forward may run as revglow.ops.coupling_network (the same map, computed with a fraction of
        the memory): the submodules are the ones built here, initialized, with no hooks of their own."""
        parts = ((self.conv_in, Conv2dSame), (self.conv_hidden, Conv2dSame), (self.conv_out, ZeroConv2d),
                 *((m, ActNorm) for m in norms))
        return all(type(m) is kind and not (m._forward_hooks or m._forward_pre_hooks) for m, kind in parts) \
            and all(m.is_initialized for m in norms)


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
        net_input = _with_context(xb, context)
        if isinstance(self.net, CouplingNetwork):
            return self.net(net_input, compile=self.compile, release=release)
        return self.net(net_input)

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


class Coupling(_OneNetworkCoupling):
    """Glow's coupling layer: an AffineCoupling (`kind="affine"`) or AdditiveCoupling (`kind="additive"`) over
    its own CouplingNetwork, with the split at channels // 2.

    With `context_channels > 0` the coupling network sees the conditioning map concatenated to the untouched
    half: h = NN(cat(xb, context)); forward/inverse/inverse_vjp then take the context as their last argument.
    `kernels` ("auto" | "torch" | "triton") picks the implementation of the elementwise part (revglow.ops).
    `nn_actnorm`, `edge_padding`, `zero_logscale_factor`, `actnorm_logscale_factor`: the reference network's
    options (see CouplingNetwork).
    """

    def __init__(self, channels: int, hidden: int, kind: str = "affine", kernels: str = "auto",
                 context_channels: int = 0, compile: bool = False, nn_actnorm: bool = False,
                 edge_padding: bool = False, zero_logscale_factor: Optional[float] = None,
                 actnorm_logscale_factor: float = 1.0):
        if channels < 2:
            raise ValueError(f"a coupling layer needs at least 2 channels; got {channels}")
        if kind not in ("affine", "additive"):
            raise ValueError(f"unknown coupling {kind!r}; choose 'affine' or 'additive'")
        channels_b = channels // 2
        channels_a = channels - channels_b
        net = CouplingNetwork(channels_b + context_channels, 2 * channels_a if kind == "affine" else channels_a,
                              hidden, actnorm=nn_actnorm, edge_padding=edge_padding,
                              zero_logscale_factor=zero_logscale_factor,
                              actnorm_logscale_factor=actnorm_logscale_factor)
        super().__init__(net, split=channels_b, kernels=kernels)
        self.kind = kind
        self.channels_b, self.channels_a = channels_b, channels_a
        self.context_channels = context_channels
        self.compile = compile

    def _network(self, xb: torch.Tensor, context: Optional[torch.Tensor], release: bool = False) -> torch.Tensor:
        if (context is None) != (self.context_channels == 0):
            raise ValueError(f"Coupling with context_channels={self.context_channels} was called "
                             f"{'without' if context is None else 'with'} a context")
        return super()._network(xb, context, release)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Checkpoints written before the network was named `net` hold it under `nn.`.
        old = prefix + "nn."
        for key in [k for k in state_dict if k.startswith(old)]:
            state_dict[prefix + "net." + key[len(old):]] = state_dict.pop(key)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


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
