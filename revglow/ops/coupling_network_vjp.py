"""Glow's coupling network and its vector-Jacobian product without autograd: what the reversible backward of a
coupling needs, one network forward and one backward, with no nested autograd call.

`coupling_network_with_vjp` takes the arguments of revglow.ops.coupling_network (the unfolded weights, ActNorm's
scales and shifts, the last layer's output scale) and returns the output and a function that maps dL/dout to dL/dx
and the gradient of every one of those arguments. Inside, the same pieces as the lean autograd Function: the
weights folded, the wide ReLU outputs kept in the chosen layout, the gradients written over them a piece at a time
(`backward_from_hidden`). The folding is undone in closed form, per output channel o:
    w' = s w, b' = s b + t    =>    dL/dw = s dL/dw',  dL/db = s dL/db',  dL/dt = dL/db',
                                    dL/ds = sum_{i,k} dL/dw'[o, i, k] w[o, i, k] + dL/db' b.
Why: in a reversible backward the network's own graph lives a few microseconds, and autograd.grad over it (with
the few small folding ops) cost about 0.2 ms of engine overhead per call; a 32x32 Glow step makes 24 of them.
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch

from revglow.ops.coupling_network import (_autocast_dtype, backward_from_hidden, fold_weights, hidden_and_output,
                                          resolve_memory_format)

__all__ = ["coupling_network_with_vjp"]

Tensor = torch.Tensor
# dL/dx, then the gradients of (w_in, b_in, s_in, t_in, w_hidden, b_hidden, s_hidden, t_hidden, w_out, b_out, s_out)
NetworkVJP = Callable[[Tensor], Tuple[Tensor, Tuple[Optional[Tensor], ...]]]


def _unfold(weight: Tensor, bias: Optional[Tensor], scale: Optional[Tensor], shift: Optional[Tensor],
            grad_w: Tensor, grad_b: Optional[Tensor]) -> Tuple[Optional[Tensor], ...]:
    """(dL/dweight, dL/dbias, dL/dscale, dL/dshift) from the folded weight's and bias's gradients (None for an
    argument that is None)."""
    if scale is None:
        return grad_w, grad_b if bias is not None else None, None, grad_b if shift is not None else None
    grad_scale = (grad_w * weight).flatten(1).sum(1)
    grad_bias = None
    if bias is not None:
        grad_scale = grad_scale + grad_b * bias
        grad_bias = grad_b * scale
    return grad_w * scale.view(-1, *([1] * (weight.dim() - 1))), grad_bias, grad_scale, \
        grad_b if shift is not None else None


def coupling_network_with_vjp(x, w_in, b_in, s_in, t_in, w_hidden, b_hidden, s_hidden, t_hidden, w_out, b_out,
                              s_out, edge_padding: bool, memory_format: str = "auto"
                              ) -> Optional[Tuple[Tensor, NetworkVJP]]:
    """(out, vjp) for revglow.ops.coupling_network's arguments, computed without a graph; `vjp(dL/dout)`, to call
    once, returns (dL/dx, the 11 weight arguments' gradients, None for an argument that is None). None under
    autocast (the caller differentiates the autograd op there, which handles the casts)."""
    if _autocast_dtype(x) is not None:
        return None
    raw = (w_in, b_in, s_in, t_in, w_hidden, b_hidden, s_hidden, t_hidden, w_out, b_out, s_out)
    with torch.no_grad():
        raw = tuple(None if t is None else t.detach() for t in raw)
        (w_in, b_in, s_in, t_in, w_hidden, b_hidden, s_hidden, t_hidden, w_out, b_out, s_out) = raw
        folded = fold_weights(*raw)
        layout = resolve_memory_format(memory_format, x, w_in, w_out)
        x_in, *kept, out = hidden_and_output(x.detach(), *folded, edge_padding, layout)   # kept: [r1, r2]

    def vjp(grad_out: Tensor) -> Tuple[Tensor, Tuple[Optional[Tensor], ...]]:
        if not kept:
            raise RuntimeError("coupling_network_with_vjp: vjp called twice (its first call overwrote the hidden "
                               "tensors)")
        needs = (True,) + tuple(t is not None for t in folded)
        with torch.no_grad():   # empties `kept`: r1 and r2 are freed as the backward finishes with each
            grad_x, gw1, gb1, gw2, gb2, gw3, gb3 = backward_from_hidden(
                grad_out, x_in, folded, kept, True, needs, edge_padding, layout)
            grads = (*_unfold(w_in, b_in, s_in, t_in, gw1, gb1), *_unfold(w_hidden, b_hidden, s_hidden, t_hidden,
                                                                        gw2, gb2),
                     *_unfold(w_out, b_out, s_out, None, gw3, gb3)[:3])
        return grad_x, grads

    return out, vjp
