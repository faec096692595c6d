"""Coupling layers (paper, section 3.3) as building blocks for any network a user writes, on tensors of any rank.

A block splits its input x [N, ...] along `dim` (1 by default: the channels of [N, C], [N, C, H, W] or
[N, C, D, H, W]; -1 for token-major [N, T, D]; never 0, the batch) at `split` (default: half of that dimension).
One network: the conditioning part xb (the first `split` entries along `dim`) passes through unchanged; h =
net(xb), or net(cat(xb, context)) along `dim` with a conditioning input, gives the shift (and raw scale) for the
transformed part xa (the rest); y = cat(xb, ya) along `dim`.
    AdditiveCoupling(net):  ya = xa + h                          (net: xb -> C - split entries along dim)
    AffineCoupling(net):    ya = (xa + shift) * sigmoid(raw + 2)  (net: xb -> 2 (C - split): shift, then raw)
Two networks (RevNet, as in memcnn and revlib): x1 = the first `split` entries along `dim`, x2 the rest,
    TwoNetworkCoupling(f, g):  y1 = x1 + f(x2),  y2 = x2 + g(y1),  y = cat(y1, y2)

Every block's `inverse_vjp` runs each network exactly once in the reversible backward (the network output that
rebuilds the input is the one differentiated through), so a stack of them trains at the cost of the best
reversible libraries. Glow's `Coupling` is an AffineCoupling / AdditiveCoupling over its CouplingNetwork. On
images ([N, C, H, W] split on dim 1) the elementwise part runs on the fused ops (Triton kernels on CUDA); every
other layout runs the pure-PyTorch reference.

Mixed precision: under torch.autocast only the networks run in low precision. The flow arithmetic (the add, the
scale, the log-determinant) runs inside `float32_flow`, in the input's dtype with autocast off, the network
outputs cast up to it, so a float32 input gives a float32 output that the reversible backward rebuilds to
float32 accuracy. Keep the stack's input float32 under autocast (a bfloat16 input is a bfloat16 flow).
"""
from __future__ import annotations

import contextlib
from typing import Callable, ContextManager, Dict, Optional, Tuple

import torch
from torch import nn

from revglow.engine.invertible import InverseVJPResult, InvertibleModule
from revglow.ops import coupling_affine as ops
from revglow.ops.dispatch import resolve_backend

__all__ = ["AdditiveCoupling", "AffineCoupling", "TwoNetworkCoupling", "float32_flow"]

_KERNEL_CHOICES = ("auto", "torch", "triton")
# What a network's vector-Jacobian product gives: dL/d(its input), dL/d(the context) or None, {parameter: gradient}
NetworkGrads = Tuple[Optional[torch.Tensor], Optional[torch.Tensor], Dict[nn.Parameter, torch.Tensor]]
_NOTHING_TO_TURN_OFF = contextlib.nullcontext()
_DIM_NAMES = {2: ("N", "C"), 3: ("N", "T", "D"), 4: ("N", "C", "H", "W"), 5: ("N", "C", "D", "H", "W")}


def float32_flow(x: torch.Tensor) -> ContextManager[None]:
    """A context in which autocast is off on x's device: the flow arithmetic of an invertible block runs there, in
    x's dtype, while its networks run outside it in the autocast dtype. Exact invertibility needs it: a float32
    flow rebuilds its input to about 1e-7, a bfloat16 one to about 1e-2.

    For a block of your own: call the networks outside, cast their outputs up to x's dtype, and do the add, the
    scale, the log-determinant (and any matmul of the flow path, which autocast would run in bfloat16) inside.

    Example:
        >>> from torch import nn
        >>> class MyCoupling(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.net = nn.Linear(2, 2)
        ...     def forward(self, x):
        ...         x1, x2 = x.chunk(2, dim=-1)
        ...         h = self.net(x2)                    # under autocast: bfloat16
        ...         with float32_flow(x):
        ...             y1 = x1 + h.to(x.dtype)         # the flow: in x's dtype
        ...             return torch.cat([y1, x2], dim=-1), x.new_zeros(x.shape[0])
        >>> with torch.autocast("cpu", dtype=torch.bfloat16):
        ...     y, logdet = MyCoupling()(torch.randn(3, 4))
        >>> y.dtype, logdet.dtype
        (torch.float32, torch.float32)
    """
    device_type = x.device.type
    if not torch.is_autocast_enabled(device_type):
        return _NOTHING_TO_TURN_OFF   # the common case costs no autocast context (a few microseconds each)
    return torch.autocast(device_type=device_type, enabled=False)


# ------------------------------------------------------------------------------------- layout of the split
def _check_options(owner: str, split: Optional[int], dim: int) -> None:
    if split is not None and (isinstance(split, bool) or not isinstance(split, int)):
        raise TypeError(f"{owner}: split must be an int or None; got {type(split).__name__}")
    if split is not None and split < 1:
        raise ValueError(f"{owner}: split={split} leaves the first half empty (need split >= 1)")
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise TypeError(f"{owner}: dim must be an int; got {type(dim).__name__}")
    if dim == 0:
        raise ValueError(f"{owner}: dim=0 is the batch dimension; a coupling splits a non-batch dimension (1 for "
                         f"channels, -1 for the features of token-major [N, T, D])")


def _layout(owner: str, x: torch.Tensor, split: Optional[int], dim: int) -> Tuple[int, int, int]:
    """(d, b, c) for input x: the split dimension d (>= 1), the size b of the first part, the size c of d."""
    if x.dim() < 2:
        raise ValueError(f"{owner} expects an input [N, ...] with at least 2 dimensions; got shape {tuple(x.shape)}")
    if not -x.dim() <= dim < x.dim():
        raise ValueError(f"{owner}: dim={dim} is out of range for a {x.dim()}-dimensional input of shape "
                         f"{tuple(x.shape)}")
    d = dim % x.dim()
    if d == 0:
        raise ValueError(f"{owner}: dim={dim} is the batch dimension of a {x.dim()}-dimensional input; a coupling "
                         f"splits a non-batch dimension")
    c = x.shape[d]
    b = c // 2 if split is None else split
    if not 0 < b < c:
        raise ValueError(f"{owner}: split={split} leaves an empty half of dimension {d} of size {c} of the input "
                         f"(shape {tuple(x.shape)}; need 0 < split < {c})")
    return d, b, c


def _shape_text(shape: torch.Size, d: int, at_d: str) -> str:
    """'[N, 6, H, W]': a shape with its batch and other dimensions named, `at_d` at the split dimension."""
    names = _DIM_NAMES.get(len(shape), ("N",) + tuple(f"d{i}" for i in range(1, len(shape))))
    return "[" + ", ".join(at_d if i == d else names[i] for i in range(len(shape))) + "]"


def _with_context(x: torch.Tensor, context: Optional[torch.Tensor], dim: int = 1) -> torch.Tensor:
    """x, or cat(x, context) along `dim` (the context cast to x's dtype)."""
    if context is None:
        return x
    if context.dim() != x.dim() or any(a != b for i, (a, b) in enumerate(zip(context.shape, x.shape)) if i != dim):
        raise ValueError(f"coupling: the context must match the input's shape except along the split dimension "
                         f"{dim} (concatenated there); got a context of shape {tuple(context.shape)} for a part of "
                         f"shape {tuple(x.shape)}")
    return torch.cat([x, context.to(x.dtype)], dim=dim)


# -------------------------------------------------------------------------------------- one network
class _OneNetworkCoupling(InvertibleModule):
    """y = cat(xb, T(xa; net(xb))) along `dim`, T affine or additive (see the module docstring)."""

    kind = "affine"

    def __init__(self, net: nn.Module, split: Optional[int] = None, dim: int = 1, kernels: str = "auto"):
        super().__init__()
        owner = type(self).__name__
        if not isinstance(net, nn.Module):
            raise TypeError(f"{owner} expects the network as an nn.Module; got {type(net).__name__}")
        _check_options(owner, split, dim)
        if kernels not in _KERNEL_CHOICES:
            raise ValueError(f"{owner}: kernels={kernels!r} is not a known option; choose one of {_KERNEL_CHOICES}")
        self.net = net
        self.split = split
        self.dim = dim
        self.kernels = kernels
        self.compile = False

    def _network(self, xb: torch.Tensor, context: Optional[torch.Tensor], release: bool = False) -> torch.Tensor:
        """net(xb) (or net(cat(xb, context))). `release=True`: the caller runs one backward through the output
        right away; a subclass whose network can free its intermediates then (Glow's Coupling) overrides this."""
        return self.net(_with_context(xb, context, self.dim % xb.dim()))

    def _network_output(self, xb: torch.Tensor, context: Optional[torch.Tensor], d: int, channels_a: int,
                        release: bool = False) -> torch.Tensor:
        net_out = self._network(xb, context, release)
        want = 2 * channels_a if self.kind == "affine" else channels_a
        expected = xb.shape[:d] + (want,) + xb.shape[d + 1:]
        if not isinstance(net_out, torch.Tensor) or net_out.shape != expected:
            got = tuple(net_out.shape) if isinstance(net_out, torch.Tensor) else type(net_out).__name__
            seen = f"{xb.shape[d]}{' + context' if context is not None else ''}"
            raise ValueError(f"{type(self).__name__}: the network must map {_shape_text(xb.shape, d, seen)} to "
                             f"{_shape_text(xb.shape, d, str(want))} "
                             f"({'shift and raw scale of' if self.kind == 'affine' else 'the shift of'} the "
                             f"{channels_a} transformed entries along dimension {d}); got {got}")
        return net_out

    def _backend(self, x: torch.Tensor, d: int) -> str:
        # The fused ops and their kernels serve images split on channels; every other layout runs the reference.
        return resolve_backend(self.kernels, x) if x.dim() == 4 and d == 1 else "torch"

    def _couple(self, x: torch.Tensor, context: Optional[torch.Tensor],
                inverse: bool) -> Tuple[torch.Tensor, torch.Tensor]:
        d, b, c = _layout(type(self).__name__, x, self.split, self.dim)
        net_out = self._network_output(x.narrow(d, 0, b), context, d, c - b)
        with float32_flow(x):
            return ops.couple(x, net_out, b, self.kind, self._backend(x, d), inverse=inverse, compile=self.compile,
                              dim=d)

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        return self._couple(x, context, inverse=False)

    def inverse(self, y: torch.Tensor, context: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        return self._couple(y, context, inverse=True)

    def _network_with_vjp(self, xb: torch.Tensor, context: Optional[torch.Tensor], d: int, channels_a: int
                          ) -> Tuple[torch.Tensor, Callable[[torch.Tensor], NetworkGrads]]:
        """(net_out, vjp): the network's output on xb (and the context), and a function that takes dL/dnet_out,
        once, and returns (dL/dxb, dL/dcontext or None, {parameter: gradient}). This one records the network's
        graph and differentiates it with autograd; a subclass whose network has a cheaper exact backward
        (Glow's Coupling) overrides it."""
        xb = xb.detach().requires_grad_(True)
        with torch.enable_grad():   # one backward through net_out, right below: the network may free as it goes
            net_out = self._network_output(xb, context, d, channels_a, release=True)

        def vjp(grad_net_out: torch.Tensor) -> NetworkGrads:
            params = [p for p in self.net.parameters() if p.requires_grad]
            wants_context = context is not None and context.requires_grad
            inputs = [xb] + ([context] if wants_context else []) + params
            grads = list(torch.autograd.grad(net_out, inputs, grad_net_out.to(net_out.dtype), allow_unused=True))
            grad_xb = grads.pop(0)
            grad_context = grads.pop(0) if wants_context else None
            return grad_xb, grad_context, {p: g for p, g in zip(params, grads) if g is not None}

        return net_out, vjp

    def inverse_vjp(self, y: torch.Tensor, grad_y: torch.Tensor, grad_logdet: torch.Tensor,
                    context: Optional[torch.Tensor] = None) -> InverseVJPResult:
        # The network output used to invert the step is the one differentiated through: the network runs once.
        d, b, c = _layout(type(self).__name__, y, self.split, self.dim)
        net_out, network_vjp = self._network_with_vjp(y.narrow(d, 0, b), context, d, c - b)
        with float32_flow(y), torch.no_grad():   # closed-form math: nothing to record
            x, grad_x, grad_net_out = ops.couple_reversible_backward(
                y, net_out.detach(), grad_y, grad_logdet, b, self.kind, self._backend(y, d), compile=self.compile,
                dim=d)
        grad_xb, grad_context, param_grads = network_vjp(grad_net_out)
        if grad_xb is not None:
            grad_x.narrow(d, 0, b).add_(grad_xb.to(grad_x.dtype))
        if context is None:
            return x, grad_x, param_grads
        return x, grad_x, param_grads, grad_context


class AdditiveCoupling(_OneNetworkCoupling):
    """ya = xa + net(xb): volume-preserving (logdet 0). x splits along `dim` (default 1, negative allowed, never
    0) at `split` (default half); `net` maps xb (with the context concatenated along `dim`) to the C - split
    entries of xa along `dim`, the other dimensions as they are: [N, split, H, W] -> [N, C - split, H, W] on images,
    [N, T, split] -> [N, T, D - split] on tokens with dim=-1.

    Example:
        >>> from torch import nn
        >>> block = AdditiveCoupling(nn.Conv2d(2, 2, 3, padding=1))
        >>> x = torch.randn(5, 4, 8, 8)
        >>> y, logdet = block(x)
        >>> torch.allclose(block.inverse(y)[0], x, atol=1e-6), logdet.abs().max().item()
        (True, 0.0)
        >>> tokens = AdditiveCoupling(nn.Linear(3, 5), dim=-1, split=3)   # [N, T, 8] split 3 + 5 along D
        >>> t = torch.randn(2, 7, 8)
        >>> torch.allclose(tokens.inverse(tokens(t)[0])[0], t, atol=1e-6)
        True
    """

    kind = "additive"


class AffineCoupling(_OneNetworkCoupling):
    """ya = (xa + shift) * sigmoid(raw + 2) with (shift, raw) = net(xb) split along `dim`, Glow's scale function
    (bounded in (0, 1), close to the identity at a zero-initialized last layer); logdet = sum of log sigmoid(raw + 2)
    over every non-batch dimension. `net` maps xb (split along `dim`, default 1, at `split`) to 2 (C - split) entries
    along `dim`: [N, split (+ context), H, W] -> [N, 2 (C - split), H, W] on images. On CUDA images the elementwise
    part runs on the fused Triton kernels (`kernels`).

    Example:
        >>> from torch import nn
        >>> block = AffineCoupling(nn.Linear(4, 8), dim=-1)   # [N, T, 8]: (shift, raw) for the last 4 features
        >>> x = torch.randn(2, 5, 8)
        >>> y, logdet = block(x)
        >>> torch.allclose(block.inverse(y)[0], x, atol=1e-5), tuple(logdet.shape)
        (True, (2,))
    """

    kind = "affine"


# -------------------------------------------------------------------------------------- two networks
class TwoNetworkCoupling(InvertibleModule):
    """RevNet coupling with two networks: y1 = x1 + f(x2), y2 = x2 + g(y1), y = cat(y1, y2), with x1 the first
    `split` entries of x along `dim` (default 1, negative allowed, never 0; split defaults to half) and x2 the rest;
    logdet 0. The form memcnn's AdditiveCoupling and revlib's ReversibleSequential use. `f` maps x2 (with the
    context concatenated along `dim`) to split entries along `dim`, `g` maps y1 (+ context) to C - split entries,
    the other dimensions as they are. In the reversible backward each network runs once.

    Example:
        >>> from torch import nn
        >>> block = TwoNetworkCoupling(nn.Conv2d(2, 2, 3, padding=1), nn.Conv2d(2, 2, 3, padding=1))
        >>> x = torch.randn(5, 4, 8, 8)
        >>> torch.allclose(block.inverse(block(x)[0])[0], x, atol=1e-6)
        True
        >>> mlp = TwoNetworkCoupling(nn.Linear(4, 4), nn.Linear(4, 4), dim=-1)   # token-major [N, T, 8]
        >>> t = torch.randn(2, 7, 8)
        >>> torch.allclose(mlp.inverse(mlp(t)[0])[0], t, atol=1e-6)
        True
    """

    def __init__(self, f: nn.Module, g: nn.Module, split: Optional[int] = None, dim: int = 1):
        super().__init__()
        for name, net in (("f", f), ("g", g)):
            if not isinstance(net, nn.Module):
                raise TypeError(f"TwoNetworkCoupling expects {name} as an nn.Module; got {type(net).__name__}")
        _check_options("TwoNetworkCoupling", split, dim)
        self.f, self.g, self.split, self.dim = f, g, split, dim

    def _run(self, net: nn.Module, name: str, x: torch.Tensor, context: Optional[torch.Tensor], d: int,
             want: int) -> torch.Tensor:
        out = net(_with_context(x, context, d))
        expected = x.shape[:d] + (want,) + x.shape[d + 1:]
        if not isinstance(out, torch.Tensor) or out.shape != expected:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            seen = f"{x.shape[d]}{' + context' if context is not None else ''}"
            raise ValueError(f"TwoNetworkCoupling: {name} must map {_shape_text(x.shape, d, seen)} to "
                             f"{_shape_text(x.shape, d, str(want))}; got {got}")
        return out

    def _couple(self, x: torch.Tensor, context: Optional[torch.Tensor], sign: int) -> torch.Tensor:
        d, b, c = _layout("TwoNetworkCoupling", x, self.split, self.dim)
        first, second = x.narrow(d, 0, b), x.narrow(d, b, c - b)
        if sign > 0:   # forward: y1 = x1 + f(x2), then y2 = x2 + g(y1)
            f_out = self._run(self.f, "f", second, context, d, b)
            with float32_flow(x):
                first = first + f_out.to(x.dtype)
            g_out = self._run(self.g, "g", first, context, d, c - b)
            with float32_flow(x):
                second = second + g_out.to(x.dtype)
        else:          # inverse: x2 = y2 - g(y1), then x1 = y1 - f(x2)
            g_out = self._run(self.g, "g", first, context, d, c - b)
            with float32_flow(x):
                second = second - g_out.to(x.dtype)
            f_out = self._run(self.f, "f", second, context, d, b)
            with float32_flow(x):
                first = first - f_out.to(x.dtype)
        return torch.cat([first, second], dim=d)

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        return self._couple(x, context, +1), x.new_zeros(x.shape[0])

    def inverse(self, y: torch.Tensor, context: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        return self._couple(y, context, -1), y.new_zeros(y.shape[0])

    def inverse_vjp(self, y: torch.Tensor, grad_y: torch.Tensor, grad_logdet: torch.Tensor,
                    context: Optional[torch.Tensor] = None) -> InverseVJPResult:
        d, b, c = _layout("TwoNetworkCoupling", y, self.split, self.dim)
        y1 = y.narrow(d, 0, b).detach().requires_grad_(True)
        y2 = y.narrow(d, b, c - b).detach()
        grad_y1, grad_y2 = grad_y.narrow(d, 0, b), grad_y.narrow(d, b, c - b)
        wants_context = context is not None and context.requires_grad
        extra = [context] if wants_context else []
        g_params = [p for p in self.g.parameters() if p.requires_grad]
        f_params = [p for p in self.f.parameters() if p.requires_grad]
        # g: x2 = y2 - g(y1); dL/dy1 gains g's vector-Jacobian product with dL/dy2.
        with torch.enable_grad():
            g_out = self._run(self.g, "g", y1, context, d, c - b)
        with float32_flow(y):
            x2 = (y2 - g_out.detach().to(y.dtype)).requires_grad_(True)
        g_grads = list(torch.autograd.grad(g_out, [y1] + extra + g_params, grad_y2.to(g_out.dtype),
                                           allow_unused=True))
        grad_y1_total = grad_y1 + _or_zeros(g_grads.pop(0), y1).to(grad_y1.dtype)
        grad_context = g_grads.pop(0) if wants_context else None
        # f: x1 = y1 - f(x2); dL/dx2 = dL/dy2 + f's vector-Jacobian product with dL/dy1 (all of it).
        with torch.enable_grad():
            f_out = self._run(self.f, "f", x2, context, d, b)
        f_grads = list(torch.autograd.grad(f_out, [x2] + extra + f_params, grad_y1_total.to(f_out.dtype),
                                           allow_unused=True))
        grad_x2 = grad_y2 + _or_zeros(f_grads.pop(0), x2).to(grad_y2.dtype)
        if wants_context:
            grad_context = _add(grad_context, f_grads.pop(0))
        with float32_flow(y), torch.no_grad():
            x = torch.cat([y1.detach() - f_out.detach().to(y.dtype), x2.detach()], dim=d)
            grad_x = torch.cat([grad_y1_total, grad_x2], dim=d)
        param_grads = {p: g for p, g in zip(g_params + f_params, g_grads + f_grads) if g is not None}
        if context is None:
            return x, grad_x, param_grads
        return x, grad_x, param_grads, grad_context


def _or_zeros(grad: Optional[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    return grad if grad is not None else torch.zeros_like(like)


def _add(a: Optional[torch.Tensor], b: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return b if a is None else a if b is None else a + b
