"""The one contract every invertible piece of revglow follows.

    forward(x)  -> (y, logdet)   logdet = log|det dy/dx| per sample, shape [N]
    inverse(y)  -> (x, logdet)   logdet = log|det dy/dx| of the *forward* map at x, per sample, shape [N]

so `inverse` returns the same logdet as `forward` would (the change of variables of y = f(x) adds it).
A conditional piece takes its conditioning input as a second argument: forward(x, context), inverse(y, context).

For the reversible engine a module also offers

    inverse_vjp(y, grad_y, grad_logdet) -> (x, grad_x, param_grads)
    inverse_vjp(y, grad_y, grad_logdet, context) -> (x, grad_x, param_grads, grad_context)

which rebuilds the input x from the output y and returns dL/dx and, for each parameter that requires grad,
dL/dparam (a dict keyed by the parameter), given dL/dy and dL/dlogdet (and dL/dcontext, or None when the
context does not require grad). The default below inverts, then replays the forward with autograd; layers with
structure (couplings, fused ActNorm + 1x1 conv) override it to avoid the extra work.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple, Union

import torch
from torch import nn

from revglow.engine.contract import inverse_vjp_by_replay, vjp

__all__ = ["InvertibleModule", "ParamGrads", "InverseVJPResult", "grads_for"]

ParamGrads = Dict[nn.Parameter, torch.Tensor]
# (x, dL/dx, param_grads) without a context; (x, dL/dx, param_grads, dL/dcontext or None) with one.
InverseVJPResult = Union[Tuple[torch.Tensor, torch.Tensor, ParamGrads],
                         Tuple[torch.Tensor, torch.Tensor, ParamGrads, Optional[torch.Tensor]]]



def grads_for(outputs, grad_outputs, params) -> ParamGrads:
    """dL/dparam for `params` by a vector-Jacobian product of `outputs`; unused parameters get no entry."""
    params = [p for p in params if p.requires_grad]
    if not params:
        return {}
    return {p: g for p, g in zip(params, vjp(outputs, grad_outputs, params)) if g is not None}


class InvertibleModule(nn.Module):
    """Base class: subclasses implement forward and inverse; inverse_vjp comes for free."""

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def inverse(self, y: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def inverse_vjp(self, y: torch.Tensor, grad_y: torch.Tensor, grad_logdet: torch.Tensor,
                    context: Optional[torch.Tensor] = None) -> InverseVJPResult:
        """Generic: invert, then replay the forward under autograd. Subclasses with structure override it."""
        return inverse_vjp_by_replay(self, y, grad_y, grad_logdet, context)

    inverse_vjp.replays_forward = True   # the engine then restores the forward's RNG state before each part
