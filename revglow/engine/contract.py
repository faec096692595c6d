"""The step contract as the engine checks it, and the generic backward of a step that offers only forward and inverse.

A step returns (tensor, logdet [N]) from `forward` and `inverse`, and (x, grad_x, param_grads[, grad_context])
from `inverse_vjp` (see revglow.engine.invertible). Every call the engine makes goes through the checks here, so a
step that breaks the contract gets a StepContractError naming it (its index and class) and what it returned,
instead of an unpacking error deep inside autograd.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch
from torch import nn

from revglow.engine.replay_reuse import ChildCallMemo, reuses_inverse

__all__ = ["StepContractError", "step_name", "checked_pair", "call_step", "call_inverse", "checked_vjp_result",
           "vjp", "inverse_vjp_by_replay", "replays_forward"]

Tensor = torch.Tensor


class StepContractError(TypeError):
    """A step of a sequence broke the contract of `revglow.engine.invertible` (what it returns, or what it offers)."""


def step_name(step: nn.Module, index: Optional[int]) -> str:
    return f"step {index} ({type(step).__name__})" if index is not None else f"step ({type(step).__name__})"


def _describe(value) -> str:
    if isinstance(value, Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    if isinstance(value, (tuple, list)):
        return f"a {type(value).__name__} of {len(value)} values"
    return f"{type(value).__name__} {value!r}"[:80]


def checked_pair(out, step: nn.Module, index: Optional[int], method: str, batch: int) -> Tuple[Tensor, Tensor]:
    """The (tensor, logdet [N]) that forward and inverse must return, or a StepContractError naming the step."""
    expected = f"{step_name(step, index)}.{method} must return (tensor, logdet) with logdet of shape [{batch}]"
    if not isinstance(out, (tuple, list)) or len(out) != 2:
        raise StepContractError(f"{expected}; got {_describe(out)}")
    y, logdet = out
    if not isinstance(y, Tensor):
        raise StepContractError(f"{expected}; its first value is {_describe(y)}")
    if not isinstance(logdet, Tensor):
        raise StepContractError(f"{expected}; its logdet is {_describe(logdet)} (return a tensor, e.g. "
                                f"x.new_zeros(x.shape[0]) for a volume-preserving step)")
    if tuple(logdet.shape) != (batch,):
        raise StepContractError(f"{expected}; its logdet has shape {tuple(logdet.shape)}")
    return y, logdet


def call_step(step: nn.Module, index: int, x: Tensor, context: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    out = step(x) if context is None else step(x, context)
    return checked_pair(out, step, index, "forward", x.shape[0])


def call_inverse(step: nn.Module, index: int, y: Tensor, context: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    out = step.inverse(y) if context is None else step.inverse(y, context)
    return checked_pair(out, step, index, "inverse", y.shape[0])


def checked_vjp_result(out, step: nn.Module, index: Optional[int], y: Tensor, with_context: bool):
    """(x, grad_x, param_grads, grad_context or None) from what `inverse_vjp(y, ...)` returned, or a
    StepContractError."""
    n = 4 if with_context else 3
    expected = (f"{step_name(step, index)}.inverse_vjp must return (x, grad_x, param_grads"
                f"{', grad_context' if with_context else ''})")
    if not isinstance(out, (tuple, list)) or len(out) != n:
        raise StepContractError(f"{expected}; got {_describe(out)}")
    x, grad_x, param_grads = out[:3]
    if not isinstance(x, Tensor) or not isinstance(grad_x, Tensor) or grad_x.shape != x.shape \
            or x.shape[:1] != y.shape[:1]:
        raise StepContractError(f"{expected} with x and grad_x tensors of one shape, of y's batch "
                                f"{y.shape[0]}; got {_describe(x)} and {_describe(grad_x)}")
    if not isinstance(param_grads, dict):
        raise StepContractError(f"{expected} with param_grads a dict {{parameter: gradient}}; got "
                                f"{_describe(param_grads)}")
    return x, grad_x, param_grads, (out[3] if with_context else None)


# ------------------------------------------------------------------------------------ generic backward
def vjp(outputs, grad_outputs, inputs):
    """torch.autograd.grad over the outputs that have a graph (a constant logdet has none); unused inputs get None."""
    pairs = [(o, g) for o, g in zip(outputs, grad_outputs) if o is not None and o.requires_grad and g is not None]
    if not pairs:
        return (None,) * len(inputs)
    return torch.autograd.grad([o for o, _ in pairs], inputs, [g for _, g in pairs], allow_unused=True)


def inverse_vjp_by_replay(step: nn.Module, y: Tensor, grad_y: Tensor, grad_logdet: Tensor,
                          context: Optional[Tensor] = None, before_each: Optional[Callable[[], None]] = None,
                          index: Optional[int] = None, extra_inputs: Sequence[Tensor] = ()):
    """Backward of a step that offers only forward and inverse: invert, then replay the forward under autograd.

    Returns (x, dL/dx, {param: dL/dparam}) like `inverse_vjp`, plus dL/dcontext when a context is given; costs
    one inverse and one forward more than a step that computes its backward from the inverse directly, or only
    the inverse when the step sets `reuse_inverse_computations = True` (see revglow.engine.replay_reuse).
    `before_each` runs before the inverse and before the replay (the engine restores the forward's RNG state
    there, so both see the random numbers of the forward). `extra_inputs`: tensors the forward uses besides its
    input, context and parameters (the engine passes the ones a step uses without registering them); their
    gradients join the parameters' in the dict, keyed by the tensor.
    """
    memo = ChildCallMemo(step) if reuses_inverse(step) else None
    if before_each is not None:
        before_each()
    with torch.no_grad(), (memo.recording() if memo else contextlib.nullcontext()):
        x, _ = checked_pair(step.inverse(y) if context is None else step.inverse(y, context.detach()), step, index,
                            "inverse", y.shape[0])
    x = x.detach().requires_grad_(True)
    if before_each is not None:
        before_each()
    with torch.enable_grad(), (memo.replaying() if memo else contextlib.nullcontext()):
        y_again, logdet = checked_pair(step(x) if context is None else step(x, context), step, index, "forward",
                                       x.shape[0])
    params = [p for p in step.parameters() if p.requires_grad]
    known = {id(p) for p in params}
    params += [t for t in extra_inputs if t.requires_grad and id(t) not in known]
    wants_context = context is not None and context.requires_grad
    inputs = [x] + ([context] if wants_context else []) + params
    result = list(vjp([y_again, logdet], [grad_y, grad_logdet], inputs))
    grad_x = result.pop(0)
    grad_x = grad_x if grad_x is not None else torch.zeros_like(x)
    grad_context = result.pop(0) if wants_context else None
    param_grads: Dict[Tensor, Tensor] = {p: g for p, g in zip(params, result) if g is not None}
    if context is None:
        return x.detach(), grad_x, param_grads
    return x.detach(), grad_x, param_grads, grad_context


inverse_vjp_by_replay.replays_forward = True  # marks the generic path (see replays_forward)


def replays_forward(step: nn.Module) -> bool:
    """Whether the step's backward is the generic replay (it has no inverse_vjp, or InvertibleModule's)."""
    method = getattr(type(step), "inverse_vjp", None)
    return method is None or getattr(method, "replays_forward", False)
